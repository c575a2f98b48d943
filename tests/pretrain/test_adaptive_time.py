"""The adaptive time sampler (diffusion.time_sampler=adaptive, pretrain/diffusion/adaptive_time.py):
a proper density, the floor under adversarial statistics, mass moving to the buckets whose loss
varies most, an unbiased loss under `elbo` and `reweighted`, and the same state across a resume.
Its agreement across data-parallel layouts is in tests/parallel/test_adaptive_time_layouts.py."""

import math

import pytest
import torch
from torch import nn

from pretrain.callbacks import read_metrics
from pretrain.checkpoint import _write_latest, checkpoint_root, latest_checkpoint, load_trainer_state
from pretrain.config import ConfigError, load_config
from pretrain.diffusion.adaptive_time import AdaptiveTimeSampler
from pretrain.diffusion.objective import MaskedDiffusionObjective
from pretrain.diffusion.rng import single, step_rng
from pretrain.diffusion.schedules import build_schedule
from pretrain.diffusion.time_samplers import UniformSampler, build_time_sampler
from pretrain.train import train

EPS = 1e-3
EPS_MC = 0.05  # the Monte Carlo tests: a wider eps tames the w(t) = 1/t tail (fewer draws for the same margin)


def fed(sampler: AdaptiveTimeSampler, sigma: list[float], mean: list[float] | None = None, n: int = 4000,
        steps: int = 1, seed: int = 0) -> AdaptiveTimeSampler:
    """Feed `steps` optimizer steps of synthetic losses: in bucket k, f ~ N(mean_k, sigma_k^2) (as it
    would be under uniform t: the sampler's current q is divided out, as the objective applies it)."""
    g = torch.Generator().manual_seed(seed)
    mean = mean or [0.0] * len(sigma)
    for step in range(1, steps + 1):
        k = torch.arange(len(sigma)).repeat_interleave(n)
        t = sampler.edges[k] + sampler.width * torch.rand(len(k), generator=g, dtype=torch.float64)
        f = torch.tensor(mean, dtype=torch.float64)[k] + torch.tensor(sigma, dtype=torch.float64)[k] * torch.randn(
            len(k), generator=g, dtype=torch.float64)
        sampler.observe(t, f / (sampler.pdf(t) * (sampler.hi - sampler.lo)))
        sampler.sync_and_update(step)
    return sampler


def test_density_integrates_to_one_and_draws_follow_it():
    s = fed(AdaptiveTimeSampler(EPS, buckets=8, floor=0.3, warmup_steps=0, update_every=1),
            [1, 2, 3, 4, 8, 1, 1, 0.5])
    assert float(s.mass.max() / s.mass.min()) > 3  # not uniform: the check below has something to find
    t = torch.linspace(EPS, 1, 200001, dtype=torch.float64)
    assert torch.trapezoid(s.pdf(t), t).item() == pytest.approx(1.0, abs=1e-4)
    u = torch.rand(200000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = s.icdf(u)
    assert torch.allclose(s.cdf(draws), u, atol=1e-12)
    share = torch.bincount(s.bucket(draws), minlength=8).double() / len(draws)
    assert torch.allclose(share, s.mass, atol=5 * math.sqrt(0.25 / len(draws)))
    # stratified (diffusion.stratified): the global batch covers each bucket in proportion to its mass
    strat = AdaptiveTimeSampler(EPS, stratified=True, buckets=8)
    strat.load_state_dict(s.state_dict())
    t_strat = strat.sample(1000, step_rng(0, 0))
    share = torch.bincount(strat.bucket(t_strat), minlength=8).double() / 1000
    assert torch.allclose(share, s.mass, atol=2 / 1000)


@pytest.mark.parametrize("statistic", ["std", "rms"])
def test_mass_follows_the_bucket_std_or_rms(statistic):
    sigma = [0.5, 1.0, 2.0, 4.0]
    mean = [3.0, 0.0, 0.0, 0.0]  # the first bucket's loss is large but constant: rms sees it, std does not
    s = fed(AdaptiveTimeSampler(EPS, buckets=4, floor=0.2, warmup_steps=0, update_every=1, statistic=statistic),
            sigma, mean, n=20000)
    rms = [math.hypot(m, sd) for m, sd in zip(mean, sigma, strict=True)]
    stat = torch.tensor(sigma if statistic == "std" else rms)
    expected = 0.2 / 4 + 0.8 * stat.double() / stat.sum()
    assert torch.allclose(s.mass, expected, rtol=0.03)
    assert int(s.mass.argmax()) == 3  # the highest-variance bucket gets the most draws


def test_warmup_keeps_uniform_and_updates_come_every_update_every_steps():
    s = AdaptiveTimeSampler(EPS, buckets=4, floor=0.2, decay=0.5, warmup_steps=6, update_every=3)
    fed(s, [1, 1, 1, 8], steps=5)
    assert torch.equal(s.mass, torch.full((4,), 0.25, dtype=torch.float64))  # warm-up: uniform
    assert s.updates == 1  # at step 3
    fed(s, [1, 1, 1, 8], steps=1)  # step 1 again is not a multiple of 3: pending only
    s.sync_and_update(6)  # step 6: update, warm-up over
    assert s.updates == 2 and int(s.mass.argmax()) == 3


@pytest.mark.parametrize("stratified", [False, True])
def test_two_ranks_summing_their_statistics_draw_what_one_rank_draws(stratified):
    """dp=2 in-process: each rank draws its own rows of the global batch and observes only those; with
    `reduce` summing both ranks' statistics, both learn one rank's density and draw its t exactly
    (tests/parallel/test_adaptive_time_layouts.py does the same through real launched ranks). It
    fails if a rank learns from its own draws only (reduce=None)."""
    def make():
        return AdaptiveTimeSampler(EPS, stratified=stratified, buckets=6, floor=0.1, warmup_steps=2, update_every=2)

    one, ranks = make(), [make(), make()]
    g = torch.Generator().manual_seed(5)
    for step in range(1, 13):
        t = one.sample(8, step_rng(0, step))
        for r, s in enumerate(ranks):
            # the same t to rounding (the ranks add their sums in another order than one rank does)
            assert torch.allclose(s.sample(4, step_rng(0, step, dp_rank=r, dp_size=2)), t[r::2], rtol=1e-12,
                                  atol=0), (step, r)
        f = torch.exp(-3 * t) * (1 + torch.randn(8, generator=g, dtype=torch.float64))  # varies most at small t
        one.observe(t, f)
        for r, s in enumerate(ranks):
            s.observe(t[r::2], f[r::2])
        summed = ranks[0]._local.flatten() + ranks[1]._local.flatten()  # what dp_sum returns on each rank
        one.sync_and_update(step)
        for s in ranks:
            s.sync_and_update(step, reduce=lambda x, total=summed: total.clone())
    assert float(one.mass.max() / one.mass.min()) > 2  # it moved
    for s in ranks:
        assert torch.allclose(s.mass, one.mass, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["one_bucket_huge", "all_zero_but_one", "nonfinite", "unseen_buckets"])
def test_floor_holds_for_adversarial_statistics(case):
    K, floor = 10, 0.1
    s = AdaptiveTimeSampler(EPS, buckets=K, floor=floor, warmup_steps=0, update_every=1, decay=0.0)
    t = (s.edges[:-1] + 0.5 * s.width).repeat(50)
    f = torch.zeros_like(t)
    if case == "one_bucket_huge":
        f[3::K] = torch.linspace(-1e150, 1e150, 50, dtype=torch.float64)
    elif case == "all_zero_but_one":
        f[7::K] = torch.linspace(0, 1, 50, dtype=torch.float64)
    elif case == "nonfinite":  # left out, the rest still counts
        f[:] = 1.0
        f[2::K] = math.inf
        f[5::K] = math.nan
    else:  # only bucket 0 seen: the others are explored at its level, not starved
        t, f = t[0::K], torch.linspace(0, 1, 50, dtype=torch.float64)
    s.observe(t, f)
    s.sync_and_update(1)
    assert torch.isfinite(s.mass).all()
    assert s.mass.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert float(s.mass.min()) >= floor / K * (1 - 1e-12)
    assert float(s.pdf(torch.tensor([EPS, 0.5, 1.0], dtype=torch.float64)).min()) >= floor / (1 - EPS) * (1 - 1e-12)
    if case in ("one_bucket_huge", "all_zero_but_one"):
        assert float(s.mass.max()) == pytest.approx(floor / K + (1 - floor), rel=1e-9)  # the rest is at the floor
    if case == "unseen_buckets":
        assert torch.allclose(s.mass, torch.full((K,), 1.0 / K, dtype=torch.float64))


class ContextCounter(nn.Module):
    """A fixed denoiser whose loss depends strongly on t (what the unbiasedness test needs, and an
    untrained transformer's does not): every position predicts the row's visible-token counts, so
    the fewer tokens are masked, the better it guesses. Deterministic, no parameters to train."""

    def __init__(self, vocab: int, mask_id: int):
        super().__init__()
        self.vocab, self.mask_id = vocab, mask_id

    def forward(self, x_t, t, key_padding_mask=None, **kwargs):
        visible = (x_t != self.mask_id) & key_padding_mask
        counts = torch.zeros(x_t.shape[0], self.vocab).scatter_add_(1, x_t, visible.float())
        return torch.log(counts + 0.3).unsqueeze(1).expand(-1, x_t.shape[1], -1)


def batch_and_model():
    V, mask_id, B, L = 12, 11, 8, 24
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 4, (B, L), generator=g) + 3 * torch.randint(0, 3, (B, 1), generator=g)  # row-local vocab
    real = torch.ones(B, L, dtype=torch.bool)
    real[:, -4:] = False
    return {"input_ids": ids, "loss_mask": real}, ContextCounter(V, mask_id), mask_id


def mean_and_se(values: list[float]) -> tuple[float, float]:
    x = torch.tensor(values, dtype=torch.float64)
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


def losses(objective, model, batch, n: int, seed: int) -> list[float]:
    return [float(objective.training_loss(model, batch, single(torch.Generator().manual_seed(seed + i)))[0])
            for i in range(n)]


def adapted(statistic: str) -> AdaptiveTimeSampler:
    """An adaptive sampler trained on the fixed model's own losses (a real, far-from-uniform q: with
    `std`; this model's RMS is dominated by its mean loss, ~2 nats in every bucket, so `rms` stays
    close to uniform, as it should)."""
    batch, model, mask_id = batch_and_model()
    s = AdaptiveTimeSampler(EPS_MC, buckets=8, floor=0.1, warmup_steps=0, update_every=1, decay=0.5,
                            statistic=statistic)
    obj = MaskedDiffusionObjective(build_schedule("loglinear"), s, mask_id, weighting="elbo")
    for step in range(1, 31):
        obj.training_loss(model, batch, single(torch.Generator().manual_seed(10_000 + step)))
        s.sync_and_update(step)
    assert float(s.mass.max() / s.mass.min()) > 3, s.mass  # far from uniform
    return s


@pytest.mark.parametrize("weighting", ["elbo", "reweighted"])
def test_importance_weighted_loss_is_unbiased_for_uniform_t(weighting):
    batch, model, mask_id = batch_and_model()
    schedule = build_schedule("loglinear")
    s = adapted("std")
    n = 1200
    got, se = mean_and_se(losses(MaskedDiffusionObjective(schedule, s, mask_id, weighting=weighting),
                                 model, batch, n, seed=0))
    ref, ref_se = mean_and_se(losses(MaskedDiffusionObjective(schedule, UniformSampler(EPS_MC), mask_id,
                                                              weighting=weighting), model, batch, n, seed=50_000))
    margin = 4.0 * math.hypot(se, ref_se)
    assert abs(got - ref) < margin, (got, ref, margin)
    # the check has power: the same draws without the importance correction miss by many margins
    if weighting == "elbo":
        wrong = build_time_sampler("uniform", EPS_MC)  # weights w(t)/u(t) on draws from the adapted q
        s_wrong = AdaptiveTimeSampler(EPS_MC, buckets=8)
        s_wrong.load_state_dict(s.state_dict())
        s_wrong.pdf = wrong.pdf
    else:
        s_wrong = AdaptiveTimeSampler(EPS_MC, buckets=8)
        s_wrong.load_state_dict(s.state_dict())
        s_wrong.reweighted_correction = None
    biased, biased_se = mean_and_se(losses(MaskedDiffusionObjective(schedule, s_wrong, mask_id, weighting=weighting),
                                           model, batch, n, seed=0))
    assert abs(biased - ref) > 4.0 * math.hypot(biased_se, ref_se), (biased, ref)


SMALL = [
    "data.task.num_train=128", "data.task.num_val=32", "train.batch_size=8", "train.eval_batches=1",
    "model.n_layers=1", "model.d_model=32", "model.n_heads=4", "train.steps=8", "train.eval_every=8",
    "train.log_every=1", "train.checkpoint_every=4", "train.keep_checkpoints=3", "tracking.enabled=false",
    "train.device=cpu", "train.dtype=fp32", "tracking.log_samples=0", "diffusion.time_sampler=adaptive",
    "diffusion.adaptive.warmup_steps=2", "diffusion.adaptive.update_every=1", "diffusion.adaptive.decay=0.5",
    "diffusion.adaptive.buckets=4", "diffusion.adaptive.statistic=std", "diffusion.weighting=elbo",
]


def test_resume_continues_the_same_density_and_draws(tmp_path):
    cfg = load_config("configs/quickstart.yaml", [*SMALL, f"data.shard_dir={tmp_path / 'shards'}"])
    run = tmp_path / "run"
    train(cfg, run, "adaptive")
    full = load_trainer_state(latest_checkpoint(run))["time_sampler"]
    straight = read_metrics(run)
    assert full["updates"] == 8
    assert float(full["mass"].max() / full["mass"].min()) > 1.1  # it moved: the comparison is not of constants
    assert straight[8]["train/t_mass0.00-0.25"] == pytest.approx(float(full["mass"][0]), rel=1e-12)

    _write_latest(checkpoint_root(run), "step_0000004")  # back to the middle, and on from there
    train(cfg, run, "adaptive")
    resumed = load_trainer_state(latest_checkpoint(run))["time_sampler"]
    for key in ("mass", "ema", "pending"):
        assert torch.equal(resumed[key], full[key]), key
    again = read_metrics(run)
    for step in range(5, 9):  # the same draws: the same losses, bit for bit
        assert again[step]["train/loss"] == straight[step]["train/loss"], step


@pytest.mark.parametrize("override,message", [
    ("diffusion.adaptive.floor=0", "diffusion.adaptive.floor"),
    ("diffusion.adaptive.floor=1.5", "diffusion.adaptive.floor"),
    ("diffusion.adaptive.decay=1", "diffusion.adaptive.decay"),
    ("diffusion.adaptive.buckets=0", "diffusion.adaptive.buckets"),
    ("diffusion.adaptive.warmup_steps=-1", "diffusion.adaptive.warmup_steps"),
    ("diffusion.adaptive.update_every=0", "diffusion.adaptive.update_every"),
    ("diffusion.adaptive.statistic=mad", "diffusion.adaptive.statistic"),
    ("model.variant=block", "adaptive works with model.variant"),
    ("diffusion.masking=reverse_order", "adaptive works with diffusion.masking"),
    ("parallel.pp=2", "adaptive needs parallel.pp = 1"),
])
def test_config_refuses_bad_adaptive_settings(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.yaml", ["diffusion.time_sampler=adaptive", override])


def test_sampler_refuses_bad_arguments_and_a_checkpoint_of_another_shape():
    with pytest.raises(ValueError, match="diffusion.adaptive.floor"):
        AdaptiveTimeSampler(EPS, floor=0.0)
    with pytest.raises(ValueError, match="buckets"):
        AdaptiveTimeSampler(EPS, buckets=4).load_state_dict(AdaptiveTimeSampler(EPS, buckets=8).state_dict())
