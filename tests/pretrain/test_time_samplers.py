"""Time samplers: densities integrate to 1 on [eps, 1], draws follow them, stratification is global."""

import math

import pytest
import torch

from pretrain.config import BellConfig
from pretrain.diffusion.rng import step_rng
from pretrain.diffusion.time_samplers import (
    AntitheticSampler,
    BetaBellSampler,
    LogitNormalBellSampler,
    UniformSampler,
    build_time_sampler,
)

try:
    from scipy import stats
except ImportError:  # pragma: no cover - scipy is optional
    stats = None

EPS = 1e-3
SAMPLERS = {
    "uniform": lambda: UniformSampler(EPS),
    "antithetic": lambda: AntitheticSampler(EPS),
    "logit_normal": lambda: LogitNormalBellSampler(EPS),
    "logit_normal_shifted": lambda: LogitNormalBellSampler(0.05, mu=-0.7, sigma=1.6),
    "beta": lambda: BetaBellSampler(EPS),
    "beta_skewed": lambda: BetaBellSampler(0.05, a=1.8, b=1.1),
    "beta_u_shaped": lambda: BetaBellSampler(EPS, a=0.7, b=0.8),
    # stratified (diffusion.stratified): same marginal density
    "uniform_stratified": lambda: UniformSampler(EPS, stratified=True),
    "logit_normal_stratified": lambda: LogitNormalBellSampler(EPS, stratified=True),
    "beta_stratified": lambda: BetaBellSampler(EPS, stratified=True),
}


def quadrature_grid(eps: float) -> torch.Tensor:
    # cosine spacing: dense at both ends, where beta densities with a or b < 1 are singular
    s = torch.linspace(0, 1, 400001, dtype=torch.float64)
    return eps + (1 - eps) * 0.5 * (1 - torch.cos(math.pi * s))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_pdf_integrates_to_one_and_cdf_agrees(name):
    sampler = SAMPLERS[name]()
    t = quadrature_grid(sampler.eps)
    q = sampler.pdf(t)
    if name == "beta_u_shaped":  # integrable singularities at the ends: integrate the interior
        inner = slice(1000, -1000)
        mass = (
            torch.trapezoid(q[inner], t[inner]).item()
            + sampler.cdf(t[1000]).item()
            + 1
            - sampler.cdf(t[-1001]).item()
        )
        assert abs(mass - 1) < 1e-4
    else:
        assert abs(torch.trapezoid(q, t).item() - 1.0) < 1e-6
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(q, t)])
        torch.testing.assert_close(sampler.cdf(t)[::1000], cum[::1000], atol=1e-6, rtol=0)
    outside = torch.tensor([sampler.eps / 2, 1.5], dtype=torch.float64)
    assert (sampler.pdf(outside) == 0).all()


def ks_statistic(draws: torch.Tensor, cdf) -> float:
    x, _ = torch.sort(draws)
    n = len(x)
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_draws_follow_the_density(name):
    sampler = SAMPLERS[name]()
    # pool many steps (antithetic is only marginally uniform across steps)
    draws = torch.cat([sampler.sample(64, step_rng(7, step)) for step in range(60)])
    assert draws.dtype == torch.float64 and draws.min() >= sampler.eps and draws.max() <= 1.0
    if stats is not None:
        assert stats.kstest(draws.numpy(), lambda x: sampler.cdf(torch.as_tensor(x)).numpy()).pvalue > 1e-3
    d = ks_statistic(draws, sampler.cdf)
    assert d < 1.95 / math.sqrt(len(draws))  # KS critical value at level 0.001
    # the check has power: the same draws do not pass as uniform (bells) or as a bell (uniform)
    other = UniformSampler(sampler.eps) if "beta" in name or "logit" in name else LogitNormalBellSampler(EPS)
    assert ks_statistic(draws, other.cdf) > 1.95 / math.sqrt(len(draws))


def test_antithetic_two_ranks_equal_one_rank_global_draw():
    sampler = AntitheticSampler(EPS)
    global_draw = sampler.sample(8, step_rng(3, 11, dp_rank=0, dp_size=1))
    ranks = [sampler.sample(4, step_rng(3, 11, dp_rank=r, dp_size=2)) for r in range(2)]
    torch.testing.assert_close(torch.stack(ranks, dim=1).reshape(-1), global_draw, rtol=0, atol=0)  # interleaved
    assert not torch.equal(global_draw, torch.sort(global_draw).values)  # strata shuffled over positions
    gaps = torch.sort(global_draw).values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - EPS) / 8))  # one draw per stratum
    assert not torch.equal(global_draw, sampler.sample(8, step_rng(3, 12)))  # new offset each step


@pytest.mark.parametrize("family", ["logit_normal", "beta"])
def test_stratified_bell_puts_one_draw_in_each_quantile_stratum_of_the_global_batch(family):
    """The bell density stratified like MDLM's antithetic t: the global batch's q-quantiles
    cdf(t_i) hold one draw per stratum [k/N, (k+1)/N), split over ranks exactly as one rank's."""
    sampler = build_time_sampler("bell", EPS, BellConfig(family=family), stratified=True)
    one = sampler.sample(16, step_rng(3, 11))
    quantiles = torch.sort(sampler.cdf(one)).values
    k = torch.arange(16, dtype=torch.float64)
    tol = 1e-6 if family == "beta" else 1e-12  # beta's icdf interpolates a table (~1e-8 in t)
    assert ((quantiles >= k / 16 - tol) & (quantiles < (k + 1) / 16 + tol)).all(), quantiles
    ranks = [sampler.sample(8, step_rng(3, 11, dp_rank=r, dp_size=2)) for r in range(2)]
    torch.testing.assert_close(torch.stack(ranks, dim=1).reshape(-1), one, rtol=0, atol=0)
    # negative control: iid draws of the same size miss some strata (with this seed)
    iid = build_time_sampler("bell", EPS, BellConfig(family=family)).sample(16, step_rng(3, 11))
    strata = torch.floor(sampler.cdf(iid) * 16).long().clamp(max=15)
    assert len(set(strata.tolist())) < 16
    # uniform + stratified is MDLM's antithetic draw, bit for bit
    torch.testing.assert_close(build_time_sampler("uniform", EPS, stratified=True).sample(16, step_rng(3, 11)),
                               AntitheticSampler(EPS).sample(16, step_rng(3, 11)), rtol=0, atol=0)


def test_elbo_variance_ratio_matches_monte_carlo_and_flags_divergence():
    """R = E_q[(alpha'/q)^2] / E_u[(alpha'/q_u)^2] against draws from q, where it is finite; infinite
    for a logit-normal bell (t -> 1) and a Beta with b >= 2, whatever the grid would say."""
    from pretrain.diffusion.schedules import build_schedule
    from pretrain.diffusion.time_samplers import elbo_variance_ratio

    schedule = build_schedule("cosine")
    for q in (BetaBellSampler(0.02, a=1.5, b=1.3), BetaBellSampler(EPS, a=2.0, b=1.5)):
        t = q.sample(200_000, step_rng(1, 0))
        mc = (schedule.dalpha(t) ** 2 / q.pdf(t) ** 2).mean()
        u = UniformSampler(q.eps).sample(200_000, step_rng(2, 0))
        mc_u = (schedule.dalpha(u) ** 2 * (1 - q.eps) ** 2).mean()
        r = elbo_variance_ratio(schedule, q)
        assert 0.0 < r < 100 and abs(r - float(mc / mc_u)) < 0.05 * r, (r, float(mc / mc_u))
    assert elbo_variance_ratio(schedule, UniformSampler(EPS, stratified=True)) == 1.0
    assert math.isinf(elbo_variance_ratio(schedule, LogitNormalBellSampler(0.1)))
    assert math.isinf(elbo_variance_ratio(schedule, BetaBellSampler(EPS, a=1.5, b=2.0)))


def test_build_time_sampler_reads_bell_config():
    s = build_time_sampler("bell", 0.01, BellConfig(family="beta", a=3.0, b=1.5))
    assert isinstance(s, BetaBellSampler) and (s.a, s.b, s.eps) == (3.0, 1.5, 0.01)
    s = build_time_sampler("bell", 0.01, BellConfig(mu=0.5, sigma=2.0))
    assert isinstance(s, LogitNormalBellSampler) and (s.mu, s.sigma) == (0.5, 2.0)
    assert isinstance(build_time_sampler("antithetic", 0.01), AntitheticSampler)
    with pytest.raises(ValueError):
        build_time_sampler("gaussian", 0.01)


# seed 002 trains at noise ratio [0.3, 0.8]: every sampler truncated to [max(eps, t_min), t_max]
CLIPPED = {
    "uniform": lambda: build_time_sampler("uniform", EPS, t_min=0.3, t_max=0.8),
    "antithetic": lambda: build_time_sampler("antithetic", EPS, t_min=0.3, t_max=0.8),
    "logit_normal": lambda: build_time_sampler("bell", EPS, BellConfig(mu=-0.7, sigma=1.6), t_min=0.3, t_max=0.8),
    "beta": lambda: build_time_sampler("bell", EPS, BellConfig(family="beta", a=1.8, b=1.1), t_min=0.3, t_max=0.8),
    "beta_top_only": lambda: build_time_sampler("bell", 0.05, BellConfig(family="beta"), t_max=0.6),
}


@pytest.mark.parametrize("name", sorted(CLIPPED))
def test_clipped_range_draws_inside_and_pdf_renormalised(name):
    sampler = CLIPPED[name]()
    lo, hi = sampler.lo, sampler.hi
    assert (lo, hi) == ((0.05, 0.6) if name == "beta_top_only" else (0.3, 0.8))
    t = lo + (hi - lo) * torch.linspace(0, 1, 200001, dtype=torch.float64)
    q = sampler.pdf(t)
    assert abs(torch.trapezoid(q, t).item() - 1.0) < 1e-6  # the truncated density is renormalised
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(q, t)])
    torch.testing.assert_close(sampler.cdf(t)[::1000], cum[::1000], atol=1e-6, rtol=0)
    outside = torch.tensor([lo - 1e-3, hi + 1e-3], dtype=torch.float64)
    assert (sampler.pdf(outside) == 0).all() and sampler.cdf(outside).tolist() == [0.0, 1.0]
    draws = torch.cat([sampler.sample(64, step_rng(5, step)) for step in range(60)])
    assert draws.min() >= lo and draws.max() <= hi
    assert ks_statistic(draws, sampler.cdf) < 1.95 / math.sqrt(len(draws))
    # elbo weights stay right on the clipped range: E_q[w(t)/q(t)] = integral_lo^hi w(t) dt (w = 1/t)
    est = (1.0 / draws / sampler.pdf(draws)).mean().item()
    assert abs(est - math.log(hi / lo)) < 0.05 * math.log(hi / lo)


def test_clipped_range_is_validated():
    for t_min, t_max in ((0.8, 0.3), (0.0, 0.0005), (-0.1, 1.0), (0.2, 1.2)):
        with pytest.raises(ValueError, match="t_min"):
            build_time_sampler("uniform", EPS, t_min=t_min, t_max=t_max)
