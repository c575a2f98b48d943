"""Seed 002 masking policies: density_priority keeps the schedule's masked fraction and tilts toward
dense tokens (probability-ratio form, the default, and the logit tilt); complementary pairs a logical
and a syntactic sample, also under block diffusion; the objective reads batch["density"]."""

import math

import pytest
import torch

from common.config_file import ConfigError
from pretrain.config import load_config
from pretrain.diffusion import build_schedule, step_rng
from pretrain.diffusion.masking import (
    ComplementaryMasking,
    DensityPriorityMasking,
    UniformMasking,
    build_masking,
    priority_probabilities,
    ratio_probabilities,
)
from pretrain.diffusion.objective import MaskedDiffusionObjective, inverse_alpha
from pretrain.diffusion.rng import single
from pretrain.diffusion.time_samplers import UniformSampler

B, L = 2000, 32


def _batch(seed=0, pad_from=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 20, (B, L), generator=g)
    real = torch.ones(B, L, dtype=torch.bool)
    real[:, pad_from:] = False
    density = torch.rand(L, generator=g).expand(B, L).clone()  # the same sequence density in every row
    return ids, real, density


@pytest.mark.parametrize("strength", [0.0, 3.0, 8.0])
@pytest.mark.parametrize("rate", [0.05, 0.3, 0.7, 0.95])
def test_density_priority_masked_fraction_matches_schedule(rate, strength):
    ids, real, density = _batch()
    alpha = torch.full((B,), 1.0 - rate, dtype=torch.float64)
    policy = DensityPriorityMasking(form="logit_tilt", strength=strength)
    p = policy.probabilities(real, alpha, density)
    n_real = real.sum(dim=1).double()
    assert torch.allclose(p.sum(dim=1) / n_real, torch.full((B,), rate, dtype=torch.float64), atol=1e-9)
    masked = policy.mask(ids, real, alpha, single(torch.Generator().manual_seed(1)), density=density)
    assert not masked[~real].any()
    frac = masked.sum().item() / real.sum().item()
    sigma = math.sqrt(float((p * (1 - p)).sum())) / real.sum().item()
    assert abs(frac - rate) < 5 * sigma + 1e-9


def test_density_priority_per_token_alpha_groups():
    """Block diffusion: each block (a run of equal rates) keeps its own expected fraction."""
    ids, real, density = _batch(pad_from=L)
    rates = torch.tensor([0.2, 0.8], dtype=torch.float64).repeat_interleave(L // 2)[None].expand(B, L)
    p = DensityPriorityMasking(form="logit_tilt", strength=4.0).probabilities(real, 1.0 - rates, density)
    assert torch.allclose(p[:, : L // 2].mean(dim=1), torch.full((B,), 0.2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(p[:, L // 2:].mean(dim=1), torch.full((B,), 0.8, dtype=torch.float64), atol=1e-9)


def test_dense_tokens_masked_more_often_only_with_strength():
    ids, real, density = _batch()
    alpha = torch.full((B,), 0.6, dtype=torch.float64)
    order = density[0, :24].argsort()
    low, high = order[:6], order[-6:]
    for strength, expect_gap in ((0.0, False), (4.0, True)):
        masked = DensityPriorityMasking(form="logit_tilt", strength=strength).mask(
            ids, real, alpha, single(torch.Generator().manual_seed(2)), density=density).double()
        f_low, f_high = masked[:, low].mean().item(), masked[:, high].mean().item()
        se = math.sqrt(0.25 / (B * 6)) * math.sqrt(2)
        if expect_gap:
            assert f_high - f_low > 0.3
        else:
            assert abs(f_high - f_low) < 5 * se


def test_strength_zero_is_exactly_uniform():
    ids, real, density = _batch()
    alpha = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = UniformMasking().mask(ids, real, alpha, single(torch.Generator().manual_seed(4)))
    for policy in (DensityPriorityMasking(form="logit_tilt", strength=0.0), DensityPriorityMasking(ratio=1.0)):
        b = policy.mask(ids, real, alpha, single(torch.Generator().manual_seed(4)), density=density)
        assert torch.equal(a, b)


def test_priority_probabilities_edge_rates():
    density = torch.rand(3, 8, dtype=torch.float64)
    real = torch.ones(3, 8, dtype=torch.bool)
    p = priority_probabilities(density, real, torch.tensor([[0.0], [1.0], [0.5]], dtype=torch.float64).expand(3, 8), 5.0)
    assert torch.all(p[0] == 0) and torch.all(p[1] == 1)
    assert abs(p[2].mean().item() - 0.5) < 1e-9


@pytest.mark.parametrize("strength", [0.0, 3.0])
def test_complementary_pair_covers_every_real_token(strength):
    ids, real, density = _batch(seed=5)
    ids, real, density = ids[:64], real[:64], density[:64]
    alpha = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    m = ComplementaryMasking(form="logit_tilt", strength=strength, syntactic="complement").mask(
        ids, real, alpha, single(torch.Generator().manual_seed(7)), density=density)
    assert m.shape == (128, L)  # the pair shares the batch: rows 2b (reasoning), 2b + 1 (syntax)
    r, s = m[0::2], m[1::2]
    assert torch.equal(r | s, real)  # every real token is a target of one of the pair
    assert not (r & s).any()
    assert not m[:, 24:].any()


def test_complementary_reasoning_row_prefers_hubs():
    ids, real, density = _batch(seed=8)
    alpha = torch.full((B,), 0.5, dtype=torch.float64)
    m = ComplementaryMasking(form="logit_tilt", strength=4.0, syntactic="complement").mask(
        ids, real, alpha, single(torch.Generator().manual_seed(9)), density=density)
    order = density[0, :24].argsort()
    r, s = m[0::2].double(), m[1::2].double()
    assert r[:, order[-6:]].mean() > r[:, order[:6]].mean() + 0.3  # reasoning: hubs first
    assert s[:, order[:6]].mean() > s[:, order[-6:]].mean() + 0.3  # syntax: glue first


def test_inverse_alpha():
    for name in ("linear", "loglinear", "cosine"):
        sch = build_schedule(name)
        t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
        assert torch.allclose(inverse_alpha(sch, sch.alpha(t)), t, atol=1e-9)


class _Constant(torch.nn.Module):
    """All logits equal: every masked token costs log V, so E[loss] = log V (alpha(eps) - alpha(1))."""

    def __init__(self, V):
        super().__init__()
        self.V, self.rows = V, []

    def forward(self, x, t=None, key_padding_mask=None):
        self.rows.append(x.shape[0])
        return torch.zeros(*x.shape, self.V, requires_grad=True)


@pytest.mark.parametrize("policy", ["uniform", "density_priority", "complementary"])
def test_objective_reads_density_and_keeps_the_elbo_scale(policy):
    """With strength 0 each policy's loss is an unbiased NELBO estimate: for a constant predictor the
    mean over steps is log V * (alpha(eps) - alpha(1)); with the complementary syntax weight
    -alpha'(t) / (alpha(t) q(t)) too. The objective takes batch["density"] itself."""
    V, n = 20, 256
    ids, real, density = _batch(seed=10)
    batch = {"input_ids": ids[:n], "loss_mask": real[:n], "density": density[:n]}
    sch = build_schedule("loglinear")
    obj = MaskedDiffusionObjective(sch, UniformSampler(1e-3), mask_id=3, masking=build_masking(policy, ratio=1.0,
                                                                                              syntactic_ratio=1.0))
    model = _Constant(V)
    losses = [obj.training_loss(model, batch, step_rng(0, s))[0].item() for s in range(60)]
    expect = math.log(V) * float(sch.alpha(torch.tensor(1e-3, dtype=torch.float64)) - sch.alpha(torch.tensor(1.0, dtype=torch.float64)))
    mean = sum(losses) / len(losses)
    assert abs(mean - expect) < 0.08 * expect
    assert model.rows[0] == (2 * n if policy == "complementary" else n)


def test_density_policy_without_density_is_a_clear_error():
    obj = MaskedDiffusionObjective(build_schedule("linear"), UniformSampler(1e-3), mask_id=3,
                                   masking=build_masking("density_priority"))
    ids, real, _ = _batch()
    with pytest.raises(ValueError, match="density"):
        obj.training_loss(_Constant(20), {"input_ids": ids[:4], "loss_mask": real[:4]}, step_rng(0, 0))


def test_tiny_model_trains_with_each_policy():
    from pretrain.config import ModelConfig
    from pretrain.model import build_model

    ids, real, density = _batch(seed=11)
    batch = {"input_ids": ids[:8], "loss_mask": real[:8], "density": density[:8]}
    for policy in ("density_priority", "complementary"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(variant="mdm", n_layers=1, d_model=32, n_heads=2), 21, L)
        obj = MaskedDiffusionObjective(build_schedule("loglinear"), UniformSampler(1e-3), mask_id=20,
                                       masking=build_masking(policy))
        loss, stats = obj.training_loss(model, batch, step_rng(0, 0))
        loss.backward()
        assert math.isfinite(loss.item()) and stats["n_tokens"] == int(real[:8].sum())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_config_choices_and_validation():
    cfg = load_config(None, ["diffusion.masking=complementary", "data.density.annotator=unigram"])
    assert cfg.diffusion.masking == "complementary"
    with pytest.raises(ConfigError, match="data.density.annotator"):
        load_config(None, ["diffusion.masking=density_priority"])
    with pytest.raises(ConfigError, match="density_strength"):
        load_config(None, ["diffusion.masking=density_priority", "data.density.annotator=unigram",
                           "diffusion.density_strength=-1"])
    with pytest.raises(ConfigError, match="variant"):
        load_config(None, ["diffusion.masking=complementary", "data.density.annotator=unigram", "model.variant=jigsaw"])
    cfg = load_config(None, ["diffusion.masking=complementary", "data.density.annotator=unigram", "model.variant=block",
                             "model.block_size=8", "diffusion.t_min=0.3", "diffusion.t_max=0.8"])
    assert (cfg.diffusion.density_form, cfg.diffusion.density_ratio, cfg.diffusion.syntactic_ratio) == ("ratio", 2.0, 0.5)
    for bad, key in (("diffusion.density_ratio=0", "density_ratio"), ("diffusion.syntactic_ratio=-1", "syntactic_ratio"),
                     ("diffusion.density_form=hard", "density_form"), ("diffusion.density_threshold=0", "threshold"),
                     ("diffusion.t_max=0.3", "t_max"), ("diffusion.t_min=1.0", "t_min")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["diffusion.masking=density_priority", "data.density.annotator=unigram", "diffusion.t_min=0.3",
                               bad])


def test_block_diffusion_trains_with_density_priority():
    from pretrain.config import ModelConfig
    from pretrain.diffusion.blockwise import BlockDiffusionObjective
    from pretrain.model import build_model

    ids, real, density = _batch(seed=12)
    batch = {"input_ids": ids[:4], "loss_mask": real[:4], "density": density[:4]}
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="block", n_layers=1, d_model=32, n_heads=2, block_size=8), 21, L)
    obj = BlockDiffusionObjective(build_schedule("loglinear"), UniformSampler(1e-3), mask_id=20,
                                  masking=build_masking("density_priority"))
    loss, _ = obj.training_loss(model, batch, step_rng(0, 0))
    loss.backward()
    assert math.isfinite(loss.item())


# ------------------------------------------------------------------------------------------------
# The probability-ratio form (the default): p_dense = w p_other, the schedule's rate exactly
# ------------------------------------------------------------------------------------------------


def _hubs(seed=20, frac=0.25):
    """A hubs-view density (1 for the dense tokens, 0 elsewhere), a different hub set per row."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, L, generator=g) < frac).double()


@pytest.mark.parametrize("w", [0.1, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 0.7, 0.95, 1.0])
def test_ratio_masking_keeps_the_rate_exactly_and_the_ratio_where_unsaturated(rate, w):
    ids, real, _ = _batch(seed=21)
    dense = _hubs()
    alpha = torch.full((B,), 1.0 - rate, dtype=torch.float64)
    p = DensityPriorityMasking(ratio=w).probabilities(real, alpha, dense)
    n_real = real.sum(dim=1).double()
    torch.testing.assert_close(p.sum(dim=1), rate * n_real, atol=1e-9, rtol=0)  # expected count = r n_real
    assert (p >= 0).all() and (p <= 1).all() and (p[~real] == 0).all()
    is_d, is_o = (dense > 0) & real, (dense == 0) & real
    both = is_d.any(dim=1) & is_o.any(dim=1)
    pd, po = torch.where(is_d, p, -1.0).amax(dim=1)[both], torch.where(is_o, p, -1.0).amax(dim=1)[both]
    assert torch.equal(torch.where(is_d, p, 2.0).amin(dim=1)[both], pd)  # one probability per class and row
    assert torch.equal(torch.where(is_o, p, 2.0).amin(dim=1)[both], po)
    hi = pd if w > 1 else po  # the more likely class
    unsaturated = hi < 1.0
    if 0.0 < rate < 1.0:
        torch.testing.assert_close(pd[unsaturated] / po[unsaturated], torch.full_like(pd[unsaturated], w),
                                   atol=0, rtol=1e-12)
    if rate >= 0.7 and w >= 5.0 or rate == 0.95 and w <= 0.1:
        assert (~unsaturated).any()  # the cap is exercised: the likely class at 1, the other absorbs the rest
    # draws follow p: masked fraction of dense / other tokens
    masked = DensityPriorityMasking(ratio=w).mask(ids, real, alpha, single(torch.Generator().manual_seed(22)),
                                                  density=dense)
    assert not masked[~real].any()
    frac = masked.sum().item() / real.sum().item()
    sigma = math.sqrt(float((p * (1 - p)).sum())) / real.sum().item()
    assert abs(frac - rate) < 5 * sigma + 1e-12


def test_ratio_saturation_exact():
    """2 dense + 6 other tokens at r = 0.75 with w = 2: c = 6 / 10 would give dense 1.2, so dense
    saturate at 1 and the others take (6 - 2) / 6; with w = 0.5 the others would exceed 1 at
    r = 0.9: c = 7.2 / 7 > 1, so others 1 and dense (7.2 - 6) / 2."""
    dense = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    real = torch.ones(1, 8, dtype=torch.bool)
    p = ratio_probabilities(dense, real, torch.full((1, 8), 0.75, dtype=torch.float64), 2.0)
    torch.testing.assert_close(p[0], torch.tensor([1, 1] + [4 / 6] * 6, dtype=torch.float64), atol=1e-15, rtol=0)
    p = ratio_probabilities(dense, real, torch.full((1, 8), 0.5, dtype=torch.float64), 2.0)  # c = 0.4: unsaturated
    torch.testing.assert_close(p[0], torch.tensor([0.8, 0.8] + [0.4] * 6, dtype=torch.float64), atol=1e-15, rtol=0)
    p = ratio_probabilities(dense, real, torch.full((1, 8), 0.9, dtype=torch.float64), 0.5)
    torch.testing.assert_close(p[0], torch.tensor([0.6, 0.6] + [1.0] * 6, dtype=torch.float64), atol=1e-15, rtol=0)


def test_ratio_per_block_groups_and_threshold():
    """Block diffusion: each block keeps its own rate; `scores` densities count as dense from the threshold."""
    _, real, density = _batch(pad_from=L)  # continuous scores in [0, 1]
    rates = torch.tensor([0.2, 0.8], dtype=torch.float64).repeat_interleave(L // 2)[None].expand(B, L)
    p = DensityPriorityMasking(ratio=2.0, threshold=0.6).probabilities(real, 1.0 - rates, density)
    for half, r in ((slice(0, L // 2), 0.2), (slice(L // 2, L), 0.8)):
        torch.testing.assert_close(p[:, half].sum(dim=1), torch.full((B,), r * L / 2, dtype=torch.float64),
                                   atol=1e-9, rtol=0)
    blk = p[0, : L // 2]
    dense = density[0, : L // 2] >= 0.6
    assert dense.any() and (~dense).any()
    torch.testing.assert_close(blk[dense] / blk[~dense].max(), torch.full_like(blk[dense], 2.0))


def test_ratio_one_is_exactly_uniform_masking():
    ids, real, _ = _batch(seed=23)
    dense = _hubs(24)
    alpha = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(25))
    a = UniformMasking().mask(ids, real, alpha, single(torch.Generator().manual_seed(26)))
    b = DensityPriorityMasking(ratio=1.0).mask(ids, real, alpha, single(torch.Generator().manual_seed(26)), density=dense)
    assert torch.equal(a, b)
    # and the complementary pair at w = w_S = 1 is LLaDA's: uniform at r and its exact complement
    m = ComplementaryMasking(ratio=1.0, syntactic_ratio=1.0).mask(ids, real, alpha,
                                                                    single(torch.Generator().manual_seed(26)), density=dense)
    assert torch.equal(m[0::2], a) and torch.equal(m[1::2], real & ~a)


def test_complementary_syntactic_sample_keeps_dense_tokens():
    """Default pair: logical w = 2 at rate r, syntactic w_S = 0.5 at rate 1 - r, drawn from the same
    uniforms antithetically, so they overlap only where p_R + p_S > 1."""
    ids, real, _ = _batch(seed=27)
    dense = _hubs(28)
    alpha = torch.full((B,), 0.55, dtype=torch.float64)  # r = 0.45
    policy = ComplementaryMasking()
    assert (policy.form, policy.ratio, policy.syntactic, policy.syntactic_ratio) == ("ratio", 2.0, "priority", 0.5)
    m = policy.mask(ids, real, alpha, single(torch.Generator().manual_seed(29)), density=dense)
    lo, sy = m[0::2], m[1::2]
    is_d, is_o = (dense > 0) & real, (dense == 0) & real
    def frac(mask, cls):
        return (mask & cls).sum().item() / cls.sum().item()

    assert frac(lo, is_d) > 1.7 * frac(lo, is_o)  # logical: dense tokens masked first (w = 2)
    assert frac(sy, is_d) < 0.6 * frac(sy, is_o)  # syntactic: dense tokens kept (w_S = 0.5)
    assert abs(sy.sum().item() / real.sum().item() - 0.55) < 0.01 and abs(lo.sum().item() / real.sum().item() - 0.45) < 0.01
    p_r = policy.probabilities(real, alpha, dense)
    p_s = policy.probabilities_at_rate(real, 1.0 - (1.0 - alpha[:, None].expand(B, L)), dense, mirror=True, ratio=0.5)
    overlap = (p_r + p_s - 1.0).clamp(min=0.0)  # the antithetic coupling's overlap probability
    assert abs((lo & sy).sum().item() - overlap.sum().item()) < 5 * math.sqrt(overlap.sum().item()) + 1


# ------------------------------------------------------------------------------------------------
# Complementary masking under block diffusion
# ------------------------------------------------------------------------------------------------


class _Lookup(torch.nn.Module):
    """Logits a fixed function of each x_t token (ignores x0 and t): the same for mdm and block."""

    def __init__(self, V):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))
        self.rows = []

    def forward(self, x, t=None, key_padding_mask=None, x0=None):
        self.rows.append((x.shape[0], None if t is None else t.detach().clone()))
        return self.table[x]

    def block_len(self, L):
        return self.bl


@pytest.mark.parametrize("weighting", ["elbo", "reweighted"])
def test_block_complementary_with_one_block_is_the_mdm_pair_loss(weighting):
    from pretrain.diffusion.blockwise import BlockDiffusionObjective

    V, n = 21, 16
    ids, real, _ = _batch(seed=30)
    batch = {"input_ids": ids[:n], "loss_mask": real[:n], "density": _hubs(31)[:n]}
    sch, sampler = build_schedule("loglinear"), UniformSampler(1e-3, t_min=0.3, t_max=0.8)
    model = _Lookup(V)
    model.bl = L
    losses = []
    for cls in (MaskedDiffusionObjective, BlockDiffusionObjective):
        obj = cls(sch, sampler, mask_id=20, weighting=weighting, masking=build_masking("complementary"))
        losses.append(obj.training_loss(model, batch, step_rng(0, 3))[0])
    assert model.rows[0][0] == model.rows[1][0] == 2 * n
    torch.testing.assert_close(model.rows[0][1], model.rows[1][1])  # same t (logical) and t_S (syntactic)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)


def test_block_complementary_pair_weights_per_block():
    """Each block's pair is weighted as its own MDLM term: with uniform masks and a constant predictor
    the mean loss is log V (alpha(lo) - alpha(hi)) on the clipped range [lo, hi] (each half's NELBO),
    and the logical / syntactic rows get t and t_S per block."""
    from pretrain.diffusion.blockwise import BlockDiffusionObjective

    V, n, bl = 20, 128, 8
    ids, real, _ = _batch(seed=32)
    batch = {"input_ids": ids[:n], "loss_mask": real[:n], "density": _hubs(33)[:n]}
    sch = build_schedule("linear")
    lo, hi = 0.3, 0.8
    obj = BlockDiffusionObjective(sch, UniformSampler(1e-3, t_min=lo, t_max=hi), mask_id=3,
                                  masking=build_masking("complementary", ratio=1.0, syntactic_ratio=1.0))

    class _Const(_Constant):
        def forward(self, x, t=None, key_padding_mask=None, x0=None):
            assert x0 is not None and x0.shape == x.shape
            return super().forward(x, t, key_padding_mask)

        def block_len(self, L):
            return bl

    model = _Const(V)
    losses = [obj.training_loss(model, batch, step_rng(1, s))[0].item() for s in range(80)]
    # logical half: integral_lo^hi w(t)(1 - alpha) dt = alpha(lo) - alpha(hi) = hi - lo (linear);
    # syntactic half at t_S = 1 - t: integral_{1-hi}^{1-lo}, the same length; the pair's mean is hi - lo
    expect = math.log(V) * (hi - lo)
    assert abs(sum(losses) / len(losses) - expect) < 0.05 * expect
    assert model.rows[0] == 2 * n
    loss, stats = obj.training_loss(model, batch, step_rng(1, 0))
    assert stats["n_tokens"] == int(real[:n].sum()) and 0.2 < stats["masked_fraction"] < 0.9


def test_block_diffusion_trains_with_complementary():
    from pretrain.config import ModelConfig
    from pretrain.diffusion.blockwise import BlockDiffusionObjective
    from pretrain.model import build_model

    ids, real, _ = _batch(seed=34)
    batch = {"input_ids": ids[:4], "loss_mask": real[:4], "density": _hubs(35)[:4]}
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="block", n_layers=1, d_model=32, n_heads=2, block_size=8), 21, L)
    obj = BlockDiffusionObjective(build_schedule("loglinear"), UniformSampler(1e-3, t_min=0.3, t_max=0.8), mask_id=20,
                                  masking=build_masking("complementary"))
    loss, stats = obj.training_loss(model, batch, step_rng(0, 0))
    loss.backward()
    assert math.isfinite(loss.item()) and stats["n_tokens"] == int(real[:4].sum())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
