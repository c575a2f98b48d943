"""Caching the keys and values of a clean prefix, for decoding left to right.

When a sampler commits tokens left to right (AR decoding; BD3-LM's block-by-block decoding), the
committed prefix no longer changes. If, in addition, the attention mask never lets a prefix
position look *past* the prefix, every layer's keys and values at those positions are final: they
can be computed once and reused by every later forward, which then runs only on the new positions
(the next token; the block being denoised) against [cached prefix | new] keys:

    cache = KVCache(model.cfg.n_layers)
    model.prefill(x[:, :P], cache)                        # committed prefix: K/V stored, no logits
    logits = model(x[:, P:P + n], kv_cache=cache)         # the block being denoised; cache unchanged
    logits = model(x[:, P:P + n], kv_cache=cache, extend_cache=True)  # AR: new tokens join the cache

Exactness needs the prefix to be *closed* under the mask: no query at a position < P may attend to
a key >= P. Per variant (masks in attention_masks.py):

    ar       causal (j <= i): closed at every P.                                    -> cacheable
    block    block-causal (blk(j) <= blk(i)): closed when P is a multiple of the block size, i.e. the
             prefix is whole committed blocks, which is exactly BD3-LM's decoding state. A
             committed block's clean K/V equal what the two-stream x_0 copy computes in training
             (x_0 block b sees x_0 blocks <= b).                                   -> cacheable
    mdm      bidirectional: every position sees every later one; committing a token changes the
             hidden states of all earlier ones (semi-AR decoding of an mdm model re-runs the prefix
             by design).                                                            -> not cacheable
    scatter  offset-causal (off(j) <= off(i)): position 1 (offset 1) sees position B (offset 0, a
             later block), and decoding goes offset by offset across all blocks at once: no
             left-to-right prefix is ever closed.                                   -> not cacheable
    jigsaw   every query sees every *committed* block, and blocks are committed in any order
             (entropy): committing a block changes the hidden states of the blocks committed
             before it (single stream, the default), and with two streams the teacher-forced x_0
             prefix is also re-read with the new context.                           -> not cacheable
    Both scatter and jigsaw also let the prompt see later positions' keys (scatter: the authors'
    rule holds for prompt queries too), so not even the prompt is a closed prefix.
Time conditioning (adaLN on t) also rules the cache out: the sampler feeds t = the masked fraction,
which changes at every step and modulates every layer, so a prefix's K/V go stale.

Keys are stored after rotary embedding (at their absolute positions), so a cached pass only needs
the rotary angles of the new positions. With tensor parallelism each rank caches its local heads.
"""

from __future__ import annotations

import torch

from pretrain.model.attention_masks import base_mask

# the variants a clean-prefix cache is exact for (pretrain/variants.py's register_variant adds a new
# variant whose entry says kv_cache=True)
CACHEABLE_VARIANTS = {"ar", "block"}


def cache_support(variant: str, block_size: int, time_conditioning: bool) -> str | None:
    """None when a clean-prefix KV cache is exact for this model, else the reason it is not."""
    if time_conditioning:
        return "the model is time-conditioned: every layer depends on t, which changes at every decoding step"
    if variant not in CACHEABLE_VARIANTS:
        return (f"variant {variant!r} lets earlier positions attend to later ones during decoding "
                f"(see pretrain/model/kv_cache.py); only {', '.join(sorted(CACHEABLE_VARIANTS))} are cacheable")
    if variant == "block" and block_size <= 0:
        return "variant 'block' with block_size 0 is one bidirectional block: there is no clean prefix"
    return None


class LayerKV:
    """One layer's cached keys and values, [B, H, P, D] each (rotary already applied)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.extend = False  # set per pass by KVCache.begin: keep this pass's keys/values too

    def attach(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[cached | this pass] keys and values; stored back when the pass extends the cache."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        if self.extend:
            self.k, self.v = k, v
        return k, v


class KVCache:
    """Per-layer keys/values of the clean prefix (positions 0..length-1) and which of them are real
    tokens (padding keys stay hidden from every later query, as in the uncached pass)."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(n_layers)]
        self.real: torch.Tensor | None = None  # Bool[B, length]

    @property
    def length(self) -> int:
        return 0 if self.real is None else self.real.shape[1]

    def begin(self, real_new: torch.Tensor, extend: bool) -> torch.Tensor:
        """Start a pass over new positions with key padding real_new Bool[B, n]; returns the key
        padding of [prefix | new], Bool[B, length + n]."""
        if self.real is not None and self.real.shape[0] != real_new.shape[0]:
            raise ValueError(f"KV cache holds {self.real.shape[0]} sequences, the batch has {real_new.shape[0]}")
        keys_real = real_new if self.real is None else torch.cat([self.real, real_new], dim=1)
        for layer in self.layers:
            layer.extend = extend
        if extend:
            self.real = keys_real
        return keys_real


def cached_attention_mask(
    variant: str, start: int, n: int, block_size: int, keys_real: torch.Tensor
) -> torch.Tensor | None:
    """Mask for queries at positions start..start+n-1 over keys 0..start+n-1 ([cached | new]):
    the rows of the variant's full base mask, with padding keys hidden and a padding query keeping
    its own diagonal (as `with_padding`). None (all-to-all) when nothing is hidden, e.g. one whole
    block of `block`, or one new token of `ar`."""
    rows = base_mask(variant, start + n, block_size, keys_real.device)
    rows = None if rows is None else rows[start:]  # [n, start + n]
    if rows is not None and bool(rows.all()):
        rows = None
    if bool(keys_real.all()):
        return rows
    allowed = keys_real[:, None, None, :]  # [B, 1, 1, start + n]
    allowed = allowed & rows if rows is not None else allowed.expand(-1, 1, n, -1)
    diag = torch.zeros(n, start + n, dtype=torch.bool, device=keys_real.device)
    diag[:, start:] = torch.eye(n, dtype=torch.bool, device=keys_real.device)
    return allowed | (diag & ~keys_real[:, None, start:, None])
