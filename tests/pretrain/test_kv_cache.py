"""Clean-prefix KV cache: exact where the variant allows it (ar, block), refused elsewhere; the
samplers give the same samples with it and run fewer token positions through the model."""

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model import KVCache, build_model, cache_support
from pretrain.model.attention_masks import base_mask, jigsaw_two_stream_mask
from pretrain.sample import SamplerConfig, generate

MASK, L, V, BL = 3, 16, 12, 4


def tiny(variant: str, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=2, block_size=BL, **kw), V, L).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, V, (4, L), generator=g)
    kpm = torch.ones(4, L, dtype=torch.bool)
    kpm[2, 13:] = False  # a padded row: padding keys must stay hidden with the cache too
    return x, kpm


@pytest.mark.parametrize("variant", ["ar", "block"])
@torch.no_grad()
def test_cached_pass_equals_the_full_forward(variant):
    model = tiny(variant)
    x, kpm = batch()
    full = model(x, key_padding_mask=kpm)
    cache = KVCache(model.cfg.n_layers)
    model.prefill(x[:, :4], cache, kpm[:, :4])
    model.prefill(x[:, 4:8], cache, kpm[:, 4:8])  # the prefix grows block by block
    assert cache.length == 8
    for lo, hi in ((8, 12), (8, 12)):  # a read-only pass leaves the cache as it was
        part = model(x[:, lo:hi], key_padding_mask=kpm[:, lo:hi], kv_cache=cache)
        ref = model(x[:, :hi], key_padding_mask=kpm[:, :hi])[:, lo:]  # block: only the prefix up to hi
        assert torch.allclose(part, ref, atol=1e-5) and cache.length == 8
    model(x[:, 8:12], key_padding_mask=kpm[:, 8:12], kv_cache=cache, extend_cache=True)
    last = model(x[:, 12:], key_padding_mask=kpm[:, 12:], kv_cache=cache)
    real = kpm[:, 12:]
    assert torch.allclose(last[real], full[:, 12:][real], atol=1e-5)


def prefix_closed(mask: torch.Tensor, p: int) -> bool:
    """No query before position p attends to a key at or after p."""
    return not bool(mask[:p, p:].any())


def test_cache_validity_per_variant_follows_from_the_masks():
    """kv_cache.py's table: the prefix of committed blocks is closed under the mask for ar and block
    only; mdm and scatter (single stream) and jigsaw's two-stream decoding pass let it look ahead."""
    for p in (BL, 2 * BL, 3 * BL):
        assert prefix_closed(base_mask("ar", L, BL), p) and prefix_closed(base_mask("block", L, BL), p)
        assert not prefix_closed(torch.ones(L, L, dtype=torch.bool), p)  # mdm: all-to-all (mask None)
        assert not prefix_closed(base_mask("scatter", L, BL), p)
        # jigsaw decoding: blocks 0 and 2 revealed; x_t block 0 sees x_t block 2
        two = jigsaw_two_stream_mask(torch.tensor([[True, False, True, False]]), L, BL)[0, 0]
        assert two[:BL, 2 * BL:3 * BL].all()
    assert cache_support("ar", 0, False) is None and cache_support("block", BL, False) is None
    for variant in ("mdm", "scatter", "jigsaw"):
        assert "cacheable" in cache_support(variant, BL, False)
    assert "time-conditioned" in cache_support("block", BL, True)
    assert "no clean prefix" in cache_support("block", 0, False)


def test_a_cache_is_refused_where_it_would_not_be_exact():
    x, _ = batch()
    for model in (tiny("mdm"), tiny("scatter"), tiny("jigsaw"), tiny("block", time_conditioning=True)):
        with pytest.raises(ValueError, match="not exact"):
            model(x[:, :4], torch.full((4,), 0.5), kv_cache=KVCache(2))
    model, cache = tiny("block"), KVCache(2)
    model.prefill(x[:, :3], cache)
    with pytest.raises(ValueError, match="whole blocks"):
        model(x[:, 3:8], kv_cache=cache)
    # the samplers then decode without it
    gen = torch.zeros(4, L, dtype=torch.bool)
    gen[:, 5:] = True
    for model in (tiny("mdm"), tiny("block", time_conditioning=True)):
        assert not generate(model, x, gen, mask_id=MASK, cfg=SamplerConfig(name="auto")).kv_cache


CASES = [
    ("block", SamplerConfig(name="block", temperature=1.0, steps=2)),
    ("block", SamplerConfig(name="block", temperature=1.0, inner="ancestral", steps=3)),
    ("block", SamplerConfig(name="block", temperature=0.7, inner="entropy", top_k=6)),
    ("ar", SamplerConfig(name="ar", temperature=1.0)),
    ("ar", SamplerConfig(name="ar", temperature=0.0)),
]


@pytest.mark.parametrize(("variant", "cfg"), CASES)
def test_cached_decoding_gives_the_same_samples_with_less_work(variant, cfg):
    model = tiny(variant)
    x, kpm = batch()
    gen = torch.zeros(4, L, dtype=torch.bool)
    gen[:, 3:] = True
    gen[1, 5:9] = False  # a row with given tokens inside the generated span
    gen[2, 13:] = False  # the padded row generates nothing in its padding
    plain = generate(model, x, gen, kpm, mask_id=MASK, cfg=SamplerConfig(**{**cfg.__dict__, "kv_cache": False}))
    cached = generate(model, x, gen, kpm, mask_id=MASK, cfg=cfg)
    assert cached.kv_cache and not plain.kv_cache
    assert torch.equal(cached.tokens, plain.tokens)
    assert not (cached.tokens == MASK).any()
    assert cached.nfe == plain.nfe  # the same denoising forwards...
    assert cached.positions < plain.positions  # ...over fewer token positions


def test_positions_counted_by_block_decoding():
    """B = 2 rows, 4 blocks of 4, a prompt inside block 0, 2 steps per block. Uncached: each step
    runs the prefix up to its block: 2 x 2 x (4 + 8 + 12 + 16). Cached: each step runs its block
    (2 x 2 x 4 x 4) and blocks 0-2 are prefilled once when committed (2 x 12)."""
    model = tiny("block")
    x = torch.randint(4, V, (2, L))
    gen = torch.zeros(2, L, dtype=torch.bool)
    gen[:, 2:] = True
    runs = {kv: generate(model, x, gen, mask_id=MASK, cfg=SamplerConfig(name="block", steps=2, kv_cache=kv))
            for kv in (False, True)}
    assert runs[False].positions == 2 * 2 * (4 + 8 + 12 + 16) == 160
    assert runs[True].positions == 2 * 2 * 4 * 4 + 2 * 12 == 88
    assert runs[True].nfe == runs[False].nfe == 8
