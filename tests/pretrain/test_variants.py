"""Blockwise variants (block, jigsaw, scatter): masks cell by cell and against slow dense references,
no information leaks, block reduces to mdm and to AR, exact likelihood bounds, training works."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from pretrain.config import ConfigError, DiffusionConfig, ModelConfig, load_config
from pretrain.diffusion import BlockDiffusionObjective, JigsawObjective, step_rng
from pretrain.model import build_model
from pretrain.model.attention_masks import (
    attention_mask,
    base_mask,
    block_two_stream_mask,
    jigsaw_two_stream_mask,
    two_stream_mask,
)
from pretrain.variants import build_objective

V, L, MASK = 16, 16, 15
VARIANTS = ("ar", "mdm", "block", "jigsaw", "scatter")


def grid(rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row.split()[0]] for row in rows.strip().splitlines()])


# ------------------------------------------------------------------ slow, obviously correct references


def ref_single(variant: str, n: int, bs: int) -> torch.Tensor:
    bs = bs or n
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if variant == "ar":
                m[i, j] = j <= i
            elif variant == "mdm":
                m[i, j] = True
            elif variant == "block":
                m[i, j] = j // bs <= i // bs
            elif variant == "scatter":
                m[i, j] = j % bs <= i % bs
            elif variant == "jigsaw":
                m[i, j] = j // bs == i // bs and j <= i
    return m


def ref_block_two_stream(n: int, bs: int) -> torch.Tensor:
    bs = bs or n
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for qi in range(2 * n):
        for kj in range(2 * n):
            q_clean, k_clean = qi >= n, kj >= n
            bq, bk = (qi % n) // bs, (kj % n) // bs
            if not q_clean and not k_clean:
                m[qi, kj] = bq == bk  # x_t sees its own noised block
            elif not q_clean and k_clean:
                m[qi, kj] = bk < bq  # x_t sees clean earlier blocks
            elif q_clean and k_clean:
                m[qi, kj] = bk <= bq  # x_0 is block-causal
    return m


def ref_jigsaw_two_stream(revealed: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    bs = bs or n
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for qi in range(2 * n):
        for kj in range(2 * n):
            i, j = qi % n, kj % n
            q_clean, k_clean = qi >= n, kj >= n
            same = i // bs == j // bs
            if not k_clean:
                m[qi, kj] = bool(revealed[j // bs]) or (not q_clean and i == j)
            elif not q_clean:
                m[qi, kj] = same and j < i
            else:
                m[qi, kj] = same and j <= i
    return m


@pytest.mark.parametrize("seed", range(6))
def test_every_mask_equals_its_dense_reference_on_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    bs = int(torch.randint(1, 5, (1,), generator=g))
    n = bs * int(torch.randint(1, 5, (1,), generator=g))
    for variant in VARIANTS:
        for size in (bs, 0):
            got = base_mask(variant, n, size)
            expected = ref_single(variant, n, size)
            assert torch.equal(got if got is not None else torch.ones(n, n, dtype=torch.bool), expected), variant
    for size in (bs, 0):
        assert torch.equal(block_two_stream_mask(n, size), ref_block_two_stream(n, size))
    revealed = torch.rand(3, n // bs, generator=g) < 0.5
    got = jigsaw_two_stream_mask(revealed, n, bs)
    assert got.shape == (3, 1, 2 * n, 2 * n)
    for b in range(3):
        assert torch.equal(got[b, 0], ref_jigsaw_two_stream(revealed[b], n, bs))


def test_scatter_and_jigsaw_masks_drawn():
    # Scatter, L = 6 in blocks of 3: offsets 0 1 2 0 1 2; offset k sees offsets <= k of every block
    assert torch.equal(base_mask("scatter", 6, 3), grid("""
        100100
        110110
        111111
        100100
        110110
        111111
    """))
    # Jigsaw single stream: each block left to right on its own
    assert torch.equal(base_mask("jigsaw", 6, 3), grid("""
        100000
        110000
        111000
        000100
        000110
        000111
    """))


def test_block_two_stream_mask_drawn():
    # L = 4, blocks of 2; columns: x_t 0..3 | x_0 0..3
    assert torch.equal(block_two_stream_mask(4, 2), grid("""
        11000000
        11000000
        00111100
        00111100
        00001100
        00001100
        00001111
        00001111
    """))


def test_jigsaw_two_stream_mask_drawn():
    # L = 4, blocks of 2, block 0 masked, block 1 revealed
    mask = jigsaw_two_stream_mask(torch.tensor([[False, True]]), 4, 2)[0, 0]
    assert torch.equal(mask, grid("""
        10110000
        01111000
        00110000
        00110010
        00111000
        00111100
        00110010
        00110011
    """))


def test_block_size_one_is_the_ar_factorisation():
    """x_t token i sees exactly itself (masked or not) and the clean tokens x_0[< i]."""
    n = 7
    mask = block_two_stream_mask(n, 1)
    for i in range(n):
        assert mask[i, :n].nonzero().flatten().tolist() == [i]
        assert mask[i, n:].nonzero().flatten().tolist() == list(range(i))


def test_masks_are_cached_and_two_stream_padding_keeps_rows_nonempty():
    assert base_mask("scatter", 12, 3) is base_mask("scatter", 12, 3)
    assert block_two_stream_mask(12, 3) is block_two_stream_mask(12, 3)
    real = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for variant in ("block", "jigsaw"):
        mask = two_stream_mask(variant, 6, 2, key_padding_mask=real,
                               revealed_blocks=torch.tensor([[False, True, False], [True, False, True]]))
        assert mask.shape == (2, 1, 12, 12) and mask.any(dim=-1).all()
        assert not mask[0, 0, :, [4, 5, 10, 11]][[0, 1, 2, 3, 6, 7, 8, 9]].any()  # real rows never see padding
    for variant in ("block", "scatter", "jigsaw"):
        m, causal = attention_mask(variant, 6, 2, key_padding_mask=real)
        assert not causal and m.any(dim=-1).all()


# ------------------------------------------------------------------ models: leaks and reductions


def tiny(variant, block_size=0, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"n_layers": 2, "d_model": 32, "n_heads": 4, **kw}
    cfg = ModelConfig(variant=variant, block_size=block_size, **kw)
    return build_model(cfg, V, L)


def test_block_logits_see_only_own_noisy_block_and_clean_past():
    model = tiny("block", block_size=4).eval()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (1, L), generator=g)
    x_t = torch.where(torch.rand(1, L, generator=g) < 0.5, MASK, x0)
    base = model(x_t, x0=x0)
    later_clean = x0.clone()
    later_clean[0, 4:] = (x0[0, 4:] + 1) % MASK  # clean blocks >= 1 change
    other_noisy = x_t.clone()
    other_noisy[0, 8:] = MASK - 1  # noisy blocks >= 2 change
    out = model(x_t, x0=later_clean)
    torch.testing.assert_close(out[:, :8], base[:, :8], msg="x_t blocks 0-1 must not see clean blocks >= 1")
    assert not torch.allclose(out[:, 8:], base[:, 8:])  # blocks 2-3 do see clean block 1
    torch.testing.assert_close(model(other_noisy, x0=x0)[:, :8], base[:, :8])


def test_two_stream_pass_equals_the_single_stream_block_causal_pass():
    """x_t block 1 after clean block 0: the two-stream pass must give the logits of the plain
    block-causal pass over [x_0 block 0 | x_t block 1]. Fails if the x_0 copy got positions L..2L-1."""
    model = tiny("block", block_size=L // 2).eval()
    g = torch.Generator().manual_seed(8)
    x0 = torch.randint(0, MASK, (2, L), generator=g)
    x_t = torch.where(torch.rand(2, L, generator=g) < 0.5, MASK, x0)
    single = model(torch.cat([x0[:, : L // 2], x_t[:, L // 2:]], dim=1))
    torch.testing.assert_close(model(x_t, x0=x0)[:, L // 2:], single[:, L // 2:], atol=1e-5, rtol=1e-5)


def test_two_stream_jigsaw_logits_are_left_to_right_inside_a_block_and_blocks_independent():
    model = tiny("jigsaw", block_size=4, jigsaw_streams=2).eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, MASK, (1, L), generator=g)
    revealed = torch.tensor([[True, False, False, True]])
    x_t = torch.where(revealed.repeat_interleave(4, dim=1), x0, MASK)
    base = model(x_t, x0=x0, revealed_blocks=revealed)
    changed = x0.clone()
    changed[0, 6:12] = (x0[0, 6:12] + 1) % MASK  # tokens 6, 7 of block 1 and all of block 2
    out = model(x_t, x0=changed, revealed_blocks=revealed)
    torch.testing.assert_close(out[:, 4:7], base[:, 4:7])  # position 6 is predicted from 4, 5 only
    assert not torch.allclose(out[:, 7], base[:, 7])  # position 7 sees clean token 6
    torch.testing.assert_close(out[:, 8:9], base[:, 8:9])  # block 2's first token sees no block-1/2 content
    revealed_changed = x_t.clone()
    revealed_changed[0, 12] = (x0[0, 12] + 1) % MASK
    assert not torch.allclose(model(revealed_changed, x0=x0, revealed_blocks=revealed)[:, 4], base[:, 4])


def test_block_with_one_block_equals_mdm_loss_logits_and_eval():
    batch = {"input_ids": torch.randint(0, MASK, (6, L), generator=torch.Generator().manual_seed(2)),
             "loss_mask": torch.ones(6, L, dtype=torch.bool)}
    batch["loss_mask"][::2, 11:] = False
    mdm_model, block_model = tiny("mdm", seed=3).eval(), tiny("block", seed=3).eval()
    block_model.load_state_dict(mdm_model.state_dict())
    cfg = DiffusionConfig(time_sampler="antithetic")
    mdm_obj, block_obj = build_objective(cfg, "mdm", MASK), build_objective(cfg, "block", MASK)
    assert isinstance(block_obj, BlockDiffusionObjective)
    a, sa = mdm_obj.training_loss(mdm_model, batch, step_rng(1, 2))
    b, sb = block_obj.training_loss(block_model, batch, step_rng(1, 2))
    assert math.isclose(a.item(), b.item(), rel_tol=1e-5) and sa["masked_fraction"] == sb["masked_fraction"]
    x_t = torch.where(torch.rand(6, L) < 0.5, MASK, batch["input_ids"])
    torch.testing.assert_close(
        block_model(x_t, key_padding_mask=batch["loss_mask"], x0=batch["input_ids"]),
        mdm_model(x_t, key_padding_mask=batch["loss_mask"]), atol=1e-5, rtol=1e-5,
    )
    ea = mdm_obj.eval_nll(mdm_model, batch, torch.Generator().manual_seed(0))
    eb = block_obj.eval_nll(block_model, batch, torch.Generator().manual_seed(0))
    assert ea[1] == eb[1] and math.isclose(ea[0], eb[0], rel_tol=1e-5)


class Uniform(nn.Module):
    def __init__(self, block_size=0):
        super().__init__()
        self.block_size = block_size

    def block_len(self, n):
        return self.block_size or n

    def forward(self, input_ids, t=None, key_padding_mask=None, **kw):
        return torch.zeros(*input_ids.shape, V)


@pytest.mark.parametrize("variant,block_size", [("block", 4), ("jigsaw", 4), ("jigsaw", 1), ("scatter", 4)])
def test_uniform_predictor_bound_is_log_vocab(variant, block_size):
    batch = {"input_ids": torch.randint(0, MASK, (64, L)), "loss_mask": torch.ones(64, L, dtype=torch.bool)}
    batch["loss_mask"][::3, 10:] = False
    obj = build_objective(DiffusionConfig(schedule="linear"), variant, MASK)
    nll, n = obj.eval_nll(Uniform(block_size), batch, torch.Generator().manual_seed(0))
    assert n == int(batch["loss_mask"].sum())
    drop = 1.0 if variant == "jigsaw" else 1.0 - 1e-3  # jigsaw's bound has no eps cut-off
    tol = 1e-6 if variant == "jigsaw" else 0.03  # without padding every jigsaw draw gives log V exactly
    if variant == "jigsaw":  # (n/m) x m whole blocks x log V per token: exact per draw up to padding
        batch["loss_mask"][:] = True
        nll, n = obj.eval_nll(Uniform(block_size), batch, torch.Generator().manual_seed(0))
    # SUBS (the default): [MASK] is not a prediction, so a uniform predictor pays log(V - 1)
    assert abs(nll / n - math.log(V - 1) * drop) < tol * math.log(V), (nll / n, math.log(V - 1))


def test_jigsaw_count_probabilities_match_the_sampler():
    for sampler, schedule in (("uniform", "linear"), ("bell", "loglinear"), ("antithetic", "cosine")):
        obj = build_objective(DiffusionConfig(time_sampler=sampler, schedule=schedule), "jigsaw", MASK)
        p = obj.count_probabilities(5)
        assert abs(p.sum().item() - 1) < 1e-12
        draws = torch.cat([obj.masked_block_count(obj.sampler.sample(2000, step_rng(0, s)), 5) for s in range(20)])
        freq = torch.bincount(draws - 1, minlength=5).double() / len(draws)
        assert (freq - p).abs().max() < 0.01, (sampler, freq, p)
    uniform = build_objective(DiffusionConfig(time_sampler="uniform", schedule="linear", eps=0.0), "jigsaw", MASK)
    torch.testing.assert_close(uniform.count_probabilities(4), torch.full((4,), 0.25, dtype=torch.float64))
    m = torch.tensor([1, 2, 4])
    torch.testing.assert_close(uniform.sequence_weight(m, 4), 4 / m.double())  # the uniform-m ELBO weight


def test_two_stream_jigsaw_with_one_block_is_the_exact_ar_likelihood():
    model = tiny("jigsaw", seed=4, jigsaw_streams=2).eval()
    batch = {"input_ids": torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(5)),
             "loss_mask": torch.ones(2, L, dtype=torch.bool)}
    obj = build_objective(DiffusionConfig(), "jigsaw", MASK, jigsaw_streams=2)
    assert isinstance(obj, JigsawObjective)
    nll, n = obj.eval_nll(model, batch, torch.Generator().manual_seed(0))
    # by hand: token i from a mask token at i and the clean prefix, one position at a time
    total = 0.0
    for b in range(2):
        for i in range(L):
            x0 = batch["input_ids"][b:b + 1].clone()
            x0[0, i:] = 0  # nothing at or after i may matter
            logits = model(torch.full((1, L), MASK), x0=x0, revealed_blocks=torch.tensor([[False]]))
            logits[..., MASK] = -math.inf  # SUBS (the default): [MASK] is never predicted
            logp = logits.log_softmax(-1)
            total -= logp[0, i, batch["input_ids"][b, i]].item()
    assert n == 2 * L and math.isclose(nll, total, rel_tol=1e-4)


def test_single_stream_jigsaw_with_one_block_is_the_product_of_marginals_given_the_prompt():
    """One response block: m = 1, weight 1, every response token predicted from the clean prompt and
    the block's mask tokens alone: exactly -sum_i log p(x_i | prompt), the block model's NLL."""
    model = tiny("jigsaw", seed=4).eval()
    ids = torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(5))
    prompt = torch.zeros(2, L, dtype=torch.bool)
    prompt[0, :5], prompt[1, :3] = True, True
    batch = {"input_ids": ids, "loss_mask": torch.ones(2, L, dtype=torch.bool), "prompt_mask": prompt}
    obj = build_objective(DiffusionConfig(), "jigsaw", MASK)
    nll, n = obj.eval_nll(model, batch, torch.Generator().manual_seed(0))
    total = 0.0
    for b in range(2):
        x_t = torch.where(prompt[b:b + 1], ids[b:b + 1], MASK)
        logits = model(x_t, prompt_mask=prompt[b:b + 1])  # nothing committed: all masked
        logits[..., MASK] = -math.inf  # SUBS (the default): [MASK] is never predicted
        logp = logits.log_softmax(-1)
        total -= sum(logp[0, i, ids[b, i]].item() for i in range(L) if not prompt[b, i])
    assert n == 2 * L - 8 and math.isclose(nll, total, rel_tol=1e-4)


def test_scatter_uses_the_mdm_nelbo_with_its_own_mask():
    obj = build_objective(DiffusionConfig(), "scatter", MASK)
    assert type(obj).__name__ == "MaskedDiffusionObjective"
    model = tiny("scatter", block_size=4).eval()
    ids = torch.randint(0, MASK, (1, L))
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % MASK  # offset 3: visible only to offset-3 queries
    diff = (model(ids) - model(changed)).abs().amax(dim=-1)[0]
    assert (diff[[i for i in range(L) if i % 4 < 3]] < 1e-6).all() and (diff[[3, 7, 11, 15]] > 1e-6).all()


def test_variants_validate_block_size(tmp_path):
    for variant in VARIANTS:
        assert load_config(None, [f"model.variant={variant}", "model.block_size=4", "data.seq_len=16"])
    with pytest.raises(ConfigError, match="must divide data.seq_len"):
        load_config(None, ["model.variant=block", "model.block_size=5", "data.seq_len=16"])
    with pytest.raises(ConfigError, match="model.variant"):
        load_config(None, ["model.variant=blocky"])


def test_two_stream_flops_count_both_copies():
    one, two = tiny("mdm"), tiny("block")
    head = one.head.weight.numel()
    n = one.num_parameters(exclude_embeddings=True)
    assert two.flops_per_token(L) == 6 * (2 * (n - head) + head) + 12 * 2 * 32 * (2 * L) * 2
    assert two.flops_per_token(L) > 1.9 * one.flops_per_token(L) - 6 * head


# ------------------------------------------------------------------ every variant learns


def periodic_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        period = int(torch.randint(2, 5, (1,), generator=g))
        rows.append(torch.randint(0, MASK, (period,), generator=g).repeat(L // period + 1)[:L])
    return {"input_ids": torch.stack(rows), "loss_mask": torch.ones(n, L, dtype=torch.bool)}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_learns(variant):
    model = tiny(variant, block_size=0 if variant in ("ar", "mdm") else 4, seed=6, d_model=48)
    obj = build_objective(DiffusionConfig(time_sampler="antithetic"), variant, MASK)
    val = periodic_batch(64, seed=7)

    def per_token():
        nll, n = obj.eval_nll(model.eval(), val, torch.Generator().manual_seed(0))
        model.train()
        return nll / n

    before = per_token()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        loss, _ = obj.training_loss(model, periodic_batch(32, seed=1000 + step), step_rng(3, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = per_token()
    assert before > 0.9 * math.log(V), before
    assert after < 0.75 * before, (variant, before, after)


def test_bad_two_stream_calls_are_refused():
    with pytest.raises(ValueError, match="two-stream"):
        tiny("mdm")(torch.zeros(1, L, dtype=torch.long), x0=torch.zeros(1, L, dtype=torch.long))
    with pytest.raises(ValueError, match="revealed_blocks"):
        tiny("jigsaw", 4, jigsaw_streams=2)(torch.zeros(1, L, dtype=torch.long), x0=torch.zeros(1, L, dtype=torch.long))
    with pytest.raises(ValueError, match="jigsaw_streams=2"):  # the single-stream Jigsaw has no x0 pass
        tiny("jigsaw", 4)(torch.zeros(1, L, dtype=torch.long), x0=torch.zeros(1, L, dtype=torch.long))


def test_objectives_read_block_size_from_the_model():
    cfg = dataclasses.replace(DiffusionConfig(), eval_t_samples=2)
    batch = periodic_batch(4, seed=0)
    for variant in ("block", "jigsaw"):
        obj = build_objective(cfg, variant, MASK)
        loss, stats = obj.training_loss(tiny(variant, 4), batch, step_rng(0, 0))
        assert torch.isfinite(loss) and stats["n_tokens"] == 4 * L
        assert stats["t_bucket_count"].sum() == (16 if variant == "block" else 4)  # (sequence, block) pairs
