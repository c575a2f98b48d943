"""Which attention kernel a batch takes, and the mask in the form that kernel wants (issue 18 item 14).

The LM1B recipes pack with padding (`data.packing: pad`): every row is one document followed by
padding, so a dense [B, 1, L, L] mask built from the key padding would go to
`scaled_dot_product_attention` on every batch, and a dense mask rules out the flash kernel on a GPU.
Padding here is always a suffix of the row, so it is described by one length per row, and the
variant's rule (attention_masks.py) is a function of (query, key) positions. The kernels, in the
order they are preferred:

    sdpa:no-mask     no padding and an all-to-all variant (mdm): SDPA gets no mask -> flash on a GPU
    sdpa:causal      no padding and `ar`: SDPA's is_causal -> flash on a GPU
    flex:block-mask  CUDA: FlexAttention (`torch.nn.attention.flex_attention`, compiled) with a block
                     mask made from the per-row lengths and the variant's rule; fully masked tiles
                     (padding, the variant's zeros) are skipped, nothing [L, L] is materialised
    sdpa:dense-mask  otherwise (CPU, where FlexAttention runs only eagerly and has no backward;
                     attention dropout during training (model.attention_dropout, 0 in every
                     recipe as in MDLM), which FlexAttention lacks; per-sequence masks:
                     scatter/jigsaw with a prompt or revealed blocks, two-stream passes; padding
                     that is not a suffix): the dense boolean mask through SDPA, whose
                     memory-efficient kernel takes masks on a GPU and whose math path runs on CPU

The flex mask is exactly `attention_masks.with_padding` of the variant's base mask: real keys that
the rule allows, plus the diagonal for padding queries (no empty softmax row); tests compare the
two kernels' outputs on padded batches for every variant. `attention_kernel` says which kernel a
batch took; each kernel is logged once per process the first time it runs (`kernels_used()`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

import torch

from pretrain.model.attention_masks import attention_mask, block_len

log = logging.getLogger(__name__)

KERNELS = ("sdpa:no-mask", "sdpa:causal", "flex:block-mask", "sdpa:dense-mask")
_USED: dict[str, int] = {}  # kernel -> batches that took it (this process)


def kernels_used() -> dict[str, int]:
    """Kernels that ran in this process, with how many forward passes took each."""
    return dict(_USED)


def note_kernel(kernel: str) -> None:
    """Count a forward pass that took `kernel`; the first one of each kernel is logged."""
    if kernel not in _USED:
        log.info("attention kernel: %s", kernel)
    _USED[kernel] = _USED.get(kernel, 0) + 1


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def variant_rule(variant: str, seq_len: int, block_size: int) -> Callable | None:
    """The variant's single-stream base mask as a (query, key) -> bool rule on position tensors
    (attention_masks.py's module docstring); None = all-to-all."""
    bl = block_len(seq_len, block_size)
    rules = {
        "mdm": None,
        "ar": lambda q, k: k <= q,
        "block": lambda q, k: k // bl <= q // bl,
        "scatter": lambda q, k: k % bl <= q % bl,
        "jigsaw": lambda q, k: (k // bl == q // bl) & (k <= q),
    }
    if variant not in rules:
        raise ValueError(f"unknown attention variant {variant!r}; known: {', '.join(rules)}")
    return rules[variant]


def suffix_lengths(key_padding_mask: torch.Tensor) -> torch.Tensor | None:
    """Long[B] real tokens per row when the padding of every row is a suffix, else None."""
    real = key_padding_mask.bool()
    n = real.sum(dim=1)
    pos = torch.arange(real.shape[1], device=real.device)
    if not bool((real == (pos[None, :] < n[:, None])).all()):
        return None
    return n


def flex_block_mask(variant: str, seq_len: int, block_size: int, lengths: torch.Tensor | None,
                    batch: int, device: torch.device):
    """FlexAttention BlockMask of the variant's rule with per-row lengths (None = no padding)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rule = variant_rule(variant, seq_len, block_size)

    def mask_mod(b, h, q, k):
        ok = rule(q, k) if rule is not None else q >= 0
        if lengths is None:
            return ok
        n = lengths[b]
        return (ok & (k < n)) | ((q == k) & (q >= n))  # attention_masks.with_padding, as a rule

    if lengths is None:
        return _shared_block_mask(variant, seq_len, block_size, device)
    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device)


@lru_cache(maxsize=32)
def _shared_block_mask(variant: str, seq_len: int, block_size: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    rule = variant_rule(variant, seq_len, block_size)
    return create_block_mask(lambda b, h, q, k: rule(q, k), None, None, seq_len, seq_len, device=device)


def attention_inputs(
    variant: str,
    seq_len: int,
    block_size: int,
    device: torch.device,
    key_padding_mask: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    revealed_blocks: torch.Tensor | None = None,
    dropout_active: bool = False,
    use_flex: bool | None = None,
) -> tuple[object, bool, str]:
    """(mask, is_causal, kernel) for one single-stream forward pass (module docstring).

    mask is None, a dense Bool mask (attention_masks.attention_mask) or a FlexAttention BlockMask;
    `Attention.forward` dispatches on its type. use_flex: None = on CUDA when available (the
    default); True forces it (tests on CPU run it eagerly), False never."""
    device = torch.device(device)
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    has_prompt = prompt_mask is not None and variant in ("scatter", "jigsaw") and bool(prompt_mask.any())
    per_sequence = has_prompt or (variant == "jigsaw" and revealed_blocks is not None)
    if key_padding_mask is None and not per_sequence and variant in ("mdm", "ar"):
        return None, variant == "ar", "sdpa:no-mask" if variant == "mdm" else "sdpa:causal"
    flex = (device.type == "cuda" and flex_available()) if use_flex is None else use_flex
    lengths = None
    if flex and not per_sequence and not dropout_active and key_padding_mask is not None:
        lengths = suffix_lengths(key_padding_mask.to(device))
    if flex and not per_sequence and not dropout_active and (key_padding_mask is None or lengths is not None):
        B = 1 if key_padding_mask is None else key_padding_mask.shape[0]
        return flex_block_mask(variant, seq_len, block_size, lengths, B, device), False, "flex:block-mask"
    mask, is_causal = attention_mask(variant, seq_len, block_size, device, key_padding_mask, prompt_mask,
                                     revealed_blocks)
    return mask, is_causal, "sdpa:dense-mask" if mask is not None else ("sdpa:causal" if is_causal else "sdpa:no-mask")


def is_block_mask(mask: object) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return False
    return isinstance(mask, BlockMask)


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention, compiled on CUDA (its fused kernel); eager elsewhere (a reference
    implementation that materialises the scores: used on CPU by tests only)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type != "cuda":
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)
