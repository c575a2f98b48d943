"""The attention-mask family: which positions a query may attend to, per model variant.

One backbone serves every variant (docs/ARCHITECTURE.md, "Model family"); what differs is the mask. Each
variant has a *base* mask over positions, built once per (variant, seq_len, block_size, device)
and cached, and `attention_mask` combines it with a per-batch key-padding mask.

Convention: boolean masks, True = "may attend" (what `scaled_dot_product_attention` expects).
A base mask of None means all-to-all; the combined result of (None, is_causal) lets SDPA take its
fastest path (flash attention on GPUs) whenever no dense mask is really needed. `block_size` 0
means one block spanning the whole sequence. Below, blk(p) = p // block_size and
off(p) = p % block_size (the offset of p inside its contiguous block).

Single-stream masks ([L, L], query i, key j):

    ar       causal: j <= i (SDPA's `is_causal`, no dense mask without padding)
    mdm      bidirectional: every query sees every key (None)
    block    block-causal: blk(j) <= blk(i). What BD3-LM's sampler uses when the earlier blocks are
             clean and the current one is being denoised (without a KV cache).
    scatter  offset-causal (seed 000, arXiv 2604.24832, "Scatter"; the authors' BOP-AR code,
             `BOPARPromptRespond._create_scatdiff_attention_bias`: "Query i can see Key j if j is in
             the Prompt region (always visible), OR (j % block) <= (i % block)"):
                 prompt(j)  or  off(j) <= off(i).
             Offsets are generated in order 0, 1, ..., B-1, all blocks at once: left to right inside
             every block, parallel iterative refinement across blocks. B = 1 gives `mdm`, B = L gives
             `ar`'s pattern. Without a prompt (language data) the mask is the same for every sequence
             and cached; with one (`prompt_mask`, task data) it is per sequence (`scatter_mask`).
             The rule applies to prompt queries too (as in the authors' code: a prompt position has an
             offset like any other), so a prompt position at offset k sees the response's offsets <= k
             and, from the second layer on, offset o depends on higher offsets through the prompt. The
             offset-causal order holds for what a response position attends to directly, not across
             layers. (Issue 17: keeping the prompt to itself trained no better on path-finding.)
    jigsaw   Jigsaw before any block is committed: blk(j) == blk(i) and j <= i. The training/decoding
             mask depends on which blocks are masked (`jigsaw_mask`, below).

Prompt (task data, `prompt_mask` Bool[B, L], True = prompt token incl. BOS and the separator; a
prefix of each row): the prompt is always clean and visible. For `scatter` and `jigsaw` the response
is cut into blocks *from the response start* s (the first non-prompt position): blk(p) = (p - s) // B,
off(p) = (p - s) mod B (prompt positions: blk = -1). The authors compute position % B over the whole
sequence; in their configs the prompt length is a multiple of B, so the two agree, and measuring from
the response start keeps every response block whole whatever the prompt length (our choice). Without
a prompt s = 0 and everything is as above. `block` (BD3-LM) keeps absolute blocks p // B: the prompt
tokens of a block are simply never noised (BD3-LM/LLaDA-style SFT), so its masks need no prompt.

Jigsaw single stream (the authors' BAD-AR, `BADARPromptRespond._create_bad_ar_attention_bias`; the
default, `model.jigsaw_streams: 1`), per sequence, from which response blocks are masked this pass
(a masked block holds only mask tokens in training):
             key j is visible to every query when j is not in a masked block (the prompt and the
             unmasked, visible blocks); a query i in a masked block also sees keys j <= i of its own
             block (causal among the block's positions). Different masked blocks never see each
             other; there is no clean copy.

Two-stream training masks ([2L, 2L]; rows/columns 0..L-1 are the noised copy x_t, L..2L-1 the
clean copy x_0, both at rotary positions 0..L-1), used to train every block in one pass:

    block    BD3-LM (arXiv 2503.09573, vectorised training). x_t block b sees x_t block b
             (block-diagonal) and x_0 blocks < b (offset block-causal); x_0 block b sees x_0
             blocks <= b (block-causal); x_0 never sees x_t.
    jigsaw   ours, `model.jigsaw_streams: 2` (teacher-forced left to right inside a masked block):
             per sequence, from which blocks are revealed (committed, clean) this step:
             x_t query i: x_t keys of revealed blocks (and the prompt), itself, and x_0 keys j < i of
             its own masked block (the teacher-forced left-to-right prefix); x_0 query i: x_t keys of
             revealed blocks and x_0 keys j <= i of its own block. Masked blocks never see each other.
             Built per batch (`jigsaw_two_stream_mask`).

Padding and the no-empty-row guarantee are handled once, in `with_padding`, for every variant.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch


def block_len(seq_len: int, block_size: int) -> int:
    """Tokens per block: block_size, or the whole sequence when block_size is 0."""
    return block_size if block_size > 0 else seq_len


def _index(seq_len: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(position, block id, offset in block), each Long[L]."""
    pos = torch.arange(seq_len, device=device)
    bl = block_len(seq_len, block_size)
    return pos, pos // bl, pos % bl


def response_start(prompt_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Long[B, 1]: where each row's response starts (the prompt's length; 0 without a prompt)."""
    if prompt_mask is None:
        return torch.zeros(batch, 1, dtype=torch.long, device=device)
    return prompt_mask.to(device).bool().sum(dim=1, keepdim=True)


def check_prompt_prefix(prompt_mask: torch.Tensor) -> None:
    """A prompt must be a prefix of its row (task rows are `[BOS] prompt answer [EOS] PAD...`)."""
    pm = prompt_mask.bool()
    pos = torch.arange(pm.shape[1], device=pm.device)
    if not bool((pm == (pos[None, :] < pm.sum(dim=1, keepdim=True))).all()):
        raise ValueError("prompt_mask must mark a prefix of each row (the prompt, then the response); "
                         "packed rows with several documents (data.packing=wrap) cannot train on responses")


def response_index(prompt_mask: torch.Tensor | None, seq_len: int, block_size: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset), each Long[B, L] ([1, L] without a prompt), counted from the response
    start s: blk = (p - s) // B (-1 on the prompt), off = (p - s) mod B (module docstring)."""
    device = torch.device(device)
    bl = block_len(seq_len, block_size)
    pos = torch.arange(seq_len, device=device)[None, :]
    rel = pos if prompt_mask is None else pos - response_start(prompt_mask, prompt_mask.shape[0], device)
    blk = torch.where(rel >= 0, torch.div(rel, bl, rounding_mode="floor"), torch.full_like(rel, -1))
    return blk, rel.remainder(bl)


def response_blocks(prompt_mask: torch.Tensor | None, batch: int, seq_len: int, block_size: int) -> torch.Tensor:
    """Long[B] (CPU): response blocks per row, ceil((L - s) / B); L // B rows without a prompt."""
    bl = block_len(seq_len, block_size)
    start = response_start(prompt_mask, batch, torch.device("cpu") if prompt_mask is None else prompt_mask.device)
    return torch.div(seq_len - start[:, 0] + bl - 1, bl, rounding_mode="floor").cpu()


def max_blocks(seq_len: int, block_size: int) -> int:
    """Columns of a per-sequence block tensor (masked / revealed blocks): ceil(L / B)."""
    bl = block_len(seq_len, block_size)
    return -(-seq_len // bl)


def scatter_mask(prompt_mask: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Scatter's per-sequence Bool[B, 1, L, L]: prompt(j) or off(j) <= off(i), offsets from the
    response start (module docstring)."""
    _, off = response_index(prompt_mask, seq_len, block_size, prompt_mask.device)
    return (prompt_mask.bool()[:, None, :] | (off[:, None, :] <= off[:, :, None]))[:, None]


def jigsaw_mask(masked_blocks: torch.Tensor, seq_len: int, block_size: int,
                prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Jigsaw's single-stream Bool[B, 1, L, L] (the authors' BAD-AR rule, module docstring);
    masked_blocks Bool[B, n >= max_blocks] (True = the response block is masked this pass)."""
    device = masked_blocks.device
    blk, _ = response_index(prompt_mask, seq_len, block_size, device)
    blk = blk.expand(masked_blocks.shape[0], -1)
    masked = (blk >= 0) & masked_blocks.bool().gather(1, blk.clamp(min=0))  # [B, L]
    pos = torch.arange(seq_len, device=device)
    causal = pos[None, :] <= pos[:, None]
    intra = masked[:, :, None] & masked[:, None, :] & (blk[:, :, None] == blk[:, None, :]) & causal
    return (~masked[:, None, :] | intra)[:, None]


def causal_mask(seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def bidirectional_mask(seq_len: int, block_size: int, device: torch.device) -> None:
    return None


def block_causal_mask(seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    _, blk, _ = _index(seq_len, block_size, device)
    return blk[None, :] <= blk[:, None]


def offset_causal_mask(seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    _, _, off = _index(seq_len, block_size, device)
    return off[None, :] <= off[:, None]


def block_diagonal_causal_mask(seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    pos, blk, _ = _index(seq_len, block_size, device)
    return (blk[None, :] == blk[:, None]) & (pos[None, :] <= pos[:, None])


# variant -> builder of its single-stream [L, L] base mask (None = all-to-all). The variant table
# (pretrain/variants.py) names the same builders, and its register_variant installs a new variant's
# here (the model cannot import the table: the table imports the model; test_variant_registry.py
# checks that the two agree).
BASE_MASKS: dict[str, Callable[[int, int, torch.device], torch.Tensor | None]] = {
    "ar": causal_mask,
    "mdm": bidirectional_mask,
    "block": block_causal_mask,
    "scatter": offset_causal_mask,
    "jigsaw": block_diagonal_causal_mask,
}

# Variants whose base mask is exactly causal: without padding SDPA's `is_causal=True` replaces it.
_CAUSAL_VARIANTS = frozenset({"ar"})

# Variants that have a two-stream mask over [x_t | x_0] (length 2L); jigsaw uses it only with
# model.jigsaw_streams 2 (`is_two_stream`).
TWO_STREAM_VARIANTS = frozenset({"block", "jigsaw"})


def is_two_stream(variant: str, jigsaw_streams: int = 1) -> bool:
    """Whether the model trains on the two-stream input: block always, jigsaw with 2 streams."""
    return variant == "block" or (variant == "jigsaw" and jigsaw_streams == 2)


@lru_cache(maxsize=64)
def _cached_base(variant: str, seq_len: int, block_size: int, device: torch.device) -> torch.Tensor | None:
    return BASE_MASKS[variant](seq_len, block_size, device)


def base_mask(
    variant: str, seq_len: int, block_size: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """The variant's [L, L] boolean mask (True = may attend), or None for all-to-all. Cached."""
    if variant not in BASE_MASKS:
        raise ValueError(f"unknown attention variant {variant!r}; known: {', '.join(BASE_MASKS)}")
    return _cached_base(variant, seq_len, block_size, torch.device(device))


def with_padding(base: torch.Tensor | None, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Combine a [N, N] base mask (None = all-to-all) or a per-sequence [B, 1, N, N] mask with
    key_padding_mask Bool[B, N] (True = real token) -> Bool[B, 1, N, N].

    Padding keys are hidden from every query. A padding query keeps its own diagonal entry so that
    no row is fully masked (a fully masked row makes softmax produce NaN, which would then leak
    into gradients); what padding positions output is never used. Real queries never see padding
    keys, so the logits of real tokens do not depend on what sits in the padded positions."""
    real = key_padding_mask.bool()
    n = real.shape[1]
    allowed = real[:, None, None, :]  # [B, 1, 1, N]: keys that are real tokens
    allowed = allowed & base if base is not None else allowed.expand(-1, 1, n, -1)
    eye = torch.eye(n, dtype=torch.bool, device=real.device)
    return allowed | (eye & ~real[:, None, :, None])


def attention_mask(
    variant: str,
    seq_len: int,
    block_size: int = 0,
    device: torch.device | str = "cpu",
    key_padding_mask: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    revealed_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) to pass to `scaled_dot_product_attention` (single stream).

    key_padding_mask: Bool[B, L], True = real token (see `with_padding`). prompt_mask: Bool[B, L],
    True = prompt (scatter and jigsaw only: the other variants' masks do not depend on it).
    revealed_blocks: Bool[B, n] (jigsaw: which response blocks are clean, visible context; None =
    none is). Returns (None, True) or (None, False) when no dense mask is needed: this is the fast
    path, taken when key_padding_mask is None or all True. Checking "all True" costs one host sync;
    it buys flash attention for packed (`wrap`) batches, which have no padding.
    """
    device = torch.device(device)
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    if prompt_mask is not None and (variant not in ("scatter", "jigsaw") or not bool(prompt_mask.any())):
        prompt_mask = None  # no prompt: the shared, cached mask
    if prompt_mask is not None:
        prompt_mask = prompt_mask.to(device).bool()
    if variant == "scatter" and prompt_mask is not None:
        base = scatter_mask(prompt_mask, seq_len, block_size)
    elif variant == "jigsaw" and (prompt_mask is not None or revealed_blocks is not None):
        if revealed_blocks is None:
            masked = torch.ones(prompt_mask.shape[0], max_blocks(seq_len, block_size), dtype=torch.bool, device=device)
        else:
            masked = ~revealed_blocks.to(device).bool()
        base = jigsaw_mask(masked, seq_len, block_size, prompt_mask)
    else:
        base = base_mask(variant, seq_len, block_size, device)
    if key_padding_mask is None:
        if variant in _CAUSAL_VARIANTS:
            return None, True
        return base, False  # None for mdm; a dense [L, L] or [B, 1, L, L] mask for other variants
    return with_padding(base, key_padding_mask.to(device)), False


# ---------------------------------------------------------------------------------------------
# Two-stream masks ([x_t | x_0], length 2L)
# ---------------------------------------------------------------------------------------------


def _bd3lm_two_stream(seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    _, blk, _ = _index(seq_len, block_size, device)
    q, k = blk[:, None], blk[None, :]
    none = torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    top = torch.cat([q == k, k < q], dim=1)  # x_t queries: [x_t keys | x_0 keys]
    bottom = torch.cat([none, k <= q], dim=1)  # x_0 queries: [x_t keys | x_0 keys]
    return torch.cat([top, bottom], dim=0)


@lru_cache(maxsize=32)
def block_two_stream_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """BD3-LM's [2L, 2L] vectorised-training mask (module docstring). Cached per shape."""
    return _bd3lm_two_stream(seq_len, block_size, torch.device(device))


def jigsaw_two_stream_mask(revealed_blocks: torch.Tensor, seq_len: int, block_size: int,
                           prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Jigsaw's per-sequence [B, 1, 2L, 2L] two-stream mask (ours, `model.jigsaw_streams: 2`);
    revealed_blocks Bool[B, n] (True = the response block is committed, clean context this step);
    the prompt is always revealed. See the module docstring."""
    device = revealed_blocks.device
    B = revealed_blocks.shape[0]
    blk, _ = response_index(prompt_mask, seq_len, block_size, device)
    blk = blk.expand(B, -1)
    revealed = (blk < 0) | revealed_blocks.bool().gather(1, blk.clamp(min=0))  # [B, L]
    pos = torch.arange(seq_len, device=device)
    same = (blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0)
    before = same & (pos[None, :] < pos[:, None])
    upto = same & (pos[None, :] <= pos[:, None])
    eye = torch.eye(seq_len, dtype=torch.bool, device=device)
    revealed_key = revealed[:, None, :]  # [B, 1, L]: x_t key j is clean context
    top = torch.cat([revealed_key | eye, before], dim=2)
    bottom = torch.cat([revealed_key.expand(-1, seq_len, -1), upto], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]  # [B, 1, 2L, 2L]


def two_stream_mask(
    variant: str,
    seq_len: int,
    block_size: int = 0,
    device: torch.device | str = "cpu",
    key_padding_mask: torch.Tensor | None = None,
    revealed_blocks: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense mask for a two-stream pass over [x_t | x_0] (2L positions).

    key_padding_mask: Bool[B, L] for one copy (it applies to both); revealed_blocks: Bool[B, n]
    and prompt_mask Bool[B, L] (jigsaw only: `block` keeps absolute blocks and a clean prompt
    needs nothing of its mask). Returns [2L, 2L] (block, no padding) or [B, 1, 2L, 2L]."""
    device = torch.device(device)
    if variant == "block":
        mask = block_two_stream_mask(seq_len, block_size, device)
    elif variant == "jigsaw":
        if revealed_blocks is None:
            raise ValueError("the jigsaw two-stream pass needs revealed_blocks (which blocks are clean context)")
        mask = jigsaw_two_stream_mask(revealed_blocks.to(device), seq_len, block_size,
                                      None if prompt_mask is None else prompt_mask.to(device))
    else:
        raise ValueError(f"variant {variant!r} has no two-stream mask; two-stream variants: block, jigsaw")
    if key_padding_mask is None or bool(key_padding_mask.all()):
        return mask
    real = key_padding_mask.to(device).bool()
    return with_padding(mask, torch.cat([real, real], dim=1))
