"""Time samplers: the proposal density q(t) on [lo, hi] from which training draws t.

The support is [lo, hi] = [max(eps, t_min), t_max] (config `diffusion.t_min`/`t_max`, default 0 and 1,
so [eps, 1]): every sampler is truncated to it and renormalised (its pdf divided by its mass there,
its cdf rescaled, draws by inverting the truncated cdf), so `elbo`'s w(t)/q(t) stays an unbiased
estimate, but of integral_lo^hi w(t) E[CE | t] dt: the NELBO over the clipped range only, not a
bound on -log p(x) (seed 002 trains at noise ratio [0.3, 0.8]; BD3-LMs clips its masking rates
too). Validation (objective.eval_nll) ignores the clip: it is always the [eps, 1] NELBO.

Every sampler has `pdf(t)` (q on [lo, hi], integrating to 1, zero outside), `cdf(t)`, its inverse
`icdf(u)`, and `sample(n_local, rng) -> float64 [n_local]` on the CPU (see rng.py for why CPU):
t = icdf(u) with u iid U[0, 1), or, with `stratified` (config `diffusion.stratified`), u the
globally stratified uniforms described under `antithetic` below. Stratification changes only the
joint law of a batch's draws: every t is still marginally q (the strata are assigned by a shared
random permutation), so the `elbo` weights w(t)/q(t) stay exact, and any density - uniform or
bell - is stratified the same way (inverse CDF of stratified uniforms). That is what lets the
uniform and bell recipes differ in the density alone.

How the draws enter the loss is the objective's `weighting` (objective.py):
- `elbo`: each sequence is weighted by w(t) / q(t), an importance-sampling estimate of
  integral_eps^1 w(t) E[CE | t] dt, the NELBO on [eps, 1], whatever q is. The estimate stays
  unbiased, but its variance is finite only if w^2/q is integrable: a density that vanishes at
  t = 1 faster than (1 - t) gives heavy-tailed weights there (logit-normal always does; Beta(a, b)
  needs a < 2 and b < 2).
  The config validator refuses `elbo` with `bell` when the weights' variance, relative to uniform
  t's, exceeds ELBO_VARIANCE_LIMIT (`elbo_variance_ratio`; for jigsaw the same over masked-block
  counts). With eps = 1e-3 the logit-normal bell reaches w(t)/q(t) ~ 6e10 at t = eps and has an
  infinite variance (t -> 1) for every mu, sigma and eps: refused. Safe range: Beta(a, b) with b < 2
  (a < 2 too if eps = 0), e.g. Beta(2, 1.5) (ratio ~2 at eps 1e-3, loglinear). Otherwise use
  `reweighted`.
- `reweighted`: each sequence is weighted by w(t) alone, i.e. training minimises
  integral q(t) w(t) E[CE | t] dt: q reshapes the objective over t instead of being corrected for.
  Under `uniform` this is MDLM's training loss exactly (MDLM weights by w(t) with t ~ U[eps, 1]).

Samplers
- `uniform`: t ~ U[eps, 1] (U[lo, hi] when clipped).
- `antithetic`: `uniform` with `stratified` on (whatever `diffusion.stratified` says): MDLM's
  stratified ("antithetic") draw over the GLOBAL batch of N = n_local * dp_size
  sequences: one shared u ~ U[0, 1) (from `rng.shared`, the same on every rank), s_i = (u + i) / N,
  t_i = eps + (1 - eps) s_i; data-parallel rank r takes positions [r n_local, (r+1) n_local) of the
  global list (the rank's own samples' positions, see rng.py). The global batch covers [eps, 1] evenly, so the estimator's variance does not grow
  with the number of ranks. The strata are assigned to positions by a shared random permutation:
  without it sequence 0 of every batch (and rank 0) would always get the smallest t, which biases
  the loss whenever batch position correlates with the data (a fixed eval batch, length-sorted
  packing). With it every t_i is marginally U[eps, 1] for any data order, so q is uniform and the
  `elbo` weight is the uniform one. (MDLM draws an independent u per stratum, unpermuted; one shared
  u is systematic sampling: same marginal.)
- `bell` (seed 001, arXiv 2605.13026, Hong et al., "Understanding and Accelerating the Training of
  Masked Diffusion Language Models"): a bell-shaped q concentrated on intermediate t, away from
  the nearly clean (t ~ 0) and nearly fully masked (t ~ 1) ends. With `stratified`, the inverse
  CDF of the stratified uniforms: one draw per q-quantile stratum of the global batch. The paper motivates it by
  locality bias: a token's predictive information sits in nearby positions, which intermediate
  masking rates leave partially visible. Its exact density could not be recovered: the stored copy
  of https://arxiv.org/html/2605.13026 holds only the abstract and the start of the introduction
  ("bell-shaped time sampling as a training strategy"; ~4x faster to the same LM1B validation NLL).
  Two families are offered, truncated to [eps, 1] (or [lo, hi]) and renormalised:
    logit_normal(mu, sigma): logit(t) ~ N(mu, sigma^2); default mu = 0, sigma = 1 (mode near 0.5;
      the SD3/rectified-flow "logit-normal time sampling" shape),
    beta(a, b): default a = b = 2 (q = 6 t (1 - t) before truncation).
  The paper's claim that final performance is preserved suggests the bell sampler reshapes
  training emphasis; `reweighted` (plain w(t), no importance correction) is the training
  surrogate that does that, while `elbo` keeps the NELBO unbiased. Both are available; which one the
  paper uses is unverified.

Registry: `TIME_SAMPLERS` maps each `diffusion.time_sampler` name to a `TimeSamplerSpec` (its builder
from the diffusion config, and whether the config validator checks `elbo`'s weight variance); the
config's allowed values are its keys. A new sampler is one `@register_time_sampler("name")` builder in
its own module, imported by pretrain/diffusion/__init__.py (which every import of this package runs,
so the registry is complete before any config is validated). `BELL_FAMILIES` does the same for
`diffusion.bell.family`, and `BellConfig` (re-exported by pretrain.config) holds the bell's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pretrain.diffusion.rng import StepRNG


@dataclass
class BellConfig:
    """Shape of the bell-shaped time density (seed 001): t concentrated away from 0 and 1.
    `diffusion.bell` in the config; the one place the bell's defaults are written."""

    family: str = "logit_normal"  # logit_normal | beta (BELL_FAMILIES)
    mu: float = 0.0  # logit_normal location (0 centres the bell at t = 0.5)
    sigma: float = 1.0  # logit_normal scale
    a: float = 2.0  # beta shape a
    b: float = 2.0  # beta shape b


def stratified_uniforms(n_local: int, rng: StepRNG) -> torch.Tensor:
    """float64 [n_local] in [0, 1): this rank's rows of s_i = (u + pi(i)) / N over the global batch
    of N = n_local * dp_size * n_micro draws, u ~ U[0, 1) and the permutation pi shared by all ranks
    (from `rng.shared`): one draw per stratum [k/N, (k+1)/N), each marginally U[0, 1)."""
    n_global = n_local * rng.dp_size * rng.n_micro
    u = torch.rand(1, generator=rng.shared, dtype=torch.float64)
    strata = torch.randperm(n_global, generator=rng.shared, dtype=torch.float64)
    i = strata[rng.global_rows(n_local)]
    return torch.remainder((u + i) / n_global, 1.0)


class TimeSampler:
    name = "base"

    def __init__(self, eps: float, stratified: bool = False, t_min: float = 0.0, t_max: float = 1.0):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        if not (0.0 <= t_min < 1.0 and 0.0 < t_max <= 1.0 and max(eps, t_min) < t_max):
            raise ValueError(f"time range t_min={t_min}, t_max={t_max} (eps={eps}): need "
                             "0 <= t_min < t_max <= 1 and max(eps, t_min) < t_max (diffusion.t_min/t_max)")
        self.eps = eps
        self.stratified = stratified
        self.lo, self.hi = max(eps, t_min), t_max  # the support of q

    def pdf(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """t in [lo, hi] with cdf(t) = u, float64, for u in [0, 1)."""
        raise NotImplementedError

    def sample(self, n_local: int, rng: StepRNG) -> torch.Tensor:
        u = stratified_uniforms(n_local, rng) if self.stratified else rng.rand(n_local)
        return self.icdf(u)

    def _inside(self, t: torch.Tensor) -> torch.Tensor:
        return (t >= self.lo) & (t <= self.hi)


class UniformSampler(TimeSampler):
    name = "uniform"

    def pdf(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.where(self._inside(t), 1.0 / (self.hi - self.lo), 0.0).to(torch.float64)

    def cdf(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((t - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)

    def icdf(self, u):
        return self.lo + (self.hi - self.lo) * u


class AntitheticSampler(UniformSampler):
    """`uniform`, always stratified over the global batch; marginally uniform, so pdf/cdf are the
    uniform ones."""

    name = "antithetic"

    def __init__(self, eps: float, stratified: bool = True, t_min: float = 0.0, t_max: float = 1.0):
        super().__init__(eps, stratified=True, t_min=t_min, t_max=t_max)


class LogitNormalBellSampler(TimeSampler):
    """logit(t) ~ N(mu, sigma^2), truncated to [lo, hi]; drawn exactly by inverting the CDF
    Phi((logit t - mu) / sigma) on [Phi(z(lo)), Phi(z(hi))]."""

    name = "bell"

    def __init__(self, eps: float, mu: float = BellConfig.mu, sigma: float = BellConfig.sigma, stratified: bool = False,
                 t_min: float = 0.0, t_max: float = 1.0):
        super().__init__(eps, stratified, t_min, t_max)
        self.mu, self.sigma = mu, sigma
        self._lo = float(self._phi_z(torch.tensor(self.lo, dtype=torch.float64))) if self.lo > 0 else 0.0
        self._hi = float(self._phi_z(torch.tensor(self.hi, dtype=torch.float64))) if self.hi < 1 else 1.0
        self._mass = self._hi - self._lo  # normaliser of the truncation

    def _phi_z(self, t):
        return torch.special.ndtr((torch.logit(t) - self.mu) / self.sigma)

    def pdf(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        tc = t.clamp(1e-300, 1.0 - 1e-16)
        z = (torch.logit(tc) - self.mu) / self.sigma
        dens = torch.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * self.sigma * tc * (1.0 - tc)) / self._mass
        return torch.where(self._inside(t) & (t < 1.0), dens, 0.0)

    def cdf(self, t):
        t = torch.as_tensor(t, dtype=torch.float64).clamp(self.lo, self.hi)
        return ((self._phi_z(t) - self._lo) / self._mass).clamp(0.0, 1.0)

    def icdf(self, u):
        p = self._lo + self._mass * u
        t = torch.sigmoid(self.mu + self.sigma * torch.special.ndtri(p))
        return t.clamp(self.lo, self.hi)


def _betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b), vectorised (Lentz's continued fraction; Numerical
    Recipes 6.4). numpy only: scipy is not a dependency of this package."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def cf(a, b, x):
        tiny = 1e-300
        qab, qap, qam = a + b, a + 1.0, a - 1.0
        c = np.ones_like(x)
        d = 1.0 - qab * x / qap
        d = np.where(np.abs(d) < tiny, tiny, d)
        d = 1.0 / d
        h = d.copy()
        for m in range(1, 400):
            m2 = 2 * m
            for aa in (
                m * (b - m) * x / ((qam + m2) * (a + m2)),
                -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
            ):
                d = 1.0 + aa * d
                d = np.where(np.abs(d) < tiny, tiny, d)
                c = 1.0 + aa / c
                c = np.where(np.abs(c) < tiny, tiny, c)
                d = 1.0 / d
                delta = d * c
                h = h * delta
            if np.all(np.abs(delta - 1.0) < 1e-15):
                break
        return h

    with np.errstate(divide="ignore", invalid="ignore"):
        front = np.exp(a * np.log(x) + b * np.log1p(-x) - log_beta)
        low = x < (a + 1.0) / (a + b + 2.0)
        xl, xh = np.where(low, x, 0.5), np.where(low, 0.5, x)
        out = np.where(low, front * cf(a, b, xl) / a, 1.0 - front * cf(b, a, 1.0 - xh) / b)
    out = np.where(x <= 0.0, 0.0, np.where(x >= 1.0, 1.0, out))
    return out


class BetaBellSampler(TimeSampler):
    """t ~ Beta(a, b) truncated to [lo, hi]. Drawn by inverse-CDF interpolation on a 16k-point
    table of the exact CDF (cosine-spaced, dense at both ends); the table's interpolation error
    (~1e-8 in t) is far below what the importance weights or any test can resolve."""

    name = "bell"
    _TABLE = 16385

    def __init__(self, eps: float, a: float = BellConfig.a, b: float = BellConfig.b, stratified: bool = False,
                 t_min: float = 0.0, t_max: float = 1.0):
        super().__init__(eps, stratified, t_min, t_max)
        self.a, self.b = a, b
        self._log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
        self._lo = float(_betainc(a, b, np.array([self.lo]))[0])
        self._mass = float(_betainc(a, b, np.array([self.hi]))[0]) - self._lo
        s = np.linspace(0.0, 1.0, self._TABLE)
        self._grid = self.lo + (self.hi - self.lo) * 0.5 * (1.0 - np.cos(np.pi * s))
        self._cdf_grid = np.maximum.accumulate((_betainc(a, b, self._grid) - self._lo) / self._mass)

    def pdf(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        tc = t.clamp(1e-300, 1.0 - 1e-16)
        log_q = (self.a - 1) * torch.log(tc) + (self.b - 1) * torch.log1p(-tc) - self._log_beta
        return torch.where(self._inside(t), torch.exp(log_q) / self._mass, 0.0)

    def cdf(self, t):
        t = torch.as_tensor(t, dtype=torch.float64).clamp(self.lo, self.hi)
        return torch.from_numpy(
            np.asarray((_betainc(self.a, self.b, t.numpy()) - self._lo) / self._mass)
        ).clamp(0.0, 1.0)

    def icdf(self, u):
        return torch.from_numpy(np.interp(u.numpy(), self._cdf_grid, self._grid)).clamp(self.lo, self.hi)


# `elbo` with a sampler whose weight variance exceeds this many times uniform t's is refused by the
# config validator: at 100x, matching uniform t's noise from the weights alone takes 100x the batch.
ELBO_VARIANCE_LIMIT = 100.0


def elbo_variance_ratio(schedule, sampler: TimeSampler, n: int = 200_000) -> float:
    """R = E_q[(alpha'(t) / q(t))^2] / E_uniform[(alpha'(t) / q_u(t))^2] on the sampler's [lo, hi]
    ([eps, 1] unless clipped).

    Why this quantity: under `elbo` a sequence contributes w(t)/q(t) x (its masked tokens' CE), and
    the expected masked fraction is 1 - alpha(t), so for a model whose per-token loss does not
    depend on t the per-token estimate is c (-alpha'(t)) / q(t) (w (1 - alpha) = -alpha'). R is its
    second moment relative to uniform t's: how much noise the importance weights add by themselves.
    Infinite where q vanishes faster than alpha'^2 at an end of the support (decided analytically,
    since a grid cannot see a logarithmic divergence): the logit-normal bell always when hi = 1
    (alpha'(1) != 0 for every schedule here; q decays faster than any power of 1 - t), a Beta(a, b)
    bell when b >= 2 (then alpha'^2 / q ~ (1 - t)^(1 - b)), and at t = 0 when lo = 0. Otherwise a
    midpoint rule in s with t = lo + (hi - lo)(1 - cos(pi s))/2 (dense at both ends)."""
    if type(sampler) in (UniformSampler, AntitheticSampler):
        return 1.0
    lo, hi = sampler.lo, sampler.hi
    d1 = float(schedule.dalpha(torch.ones(1, dtype=torch.float64)).abs()[0]) if hi == 1.0 else 0.0
    d0 = float(schedule.dalpha(torch.zeros(1, dtype=torch.float64)).abs()[0]) if lo == 0.0 else 0.0
    if isinstance(sampler, LogitNormalBellSampler) and (d1 > 0 or d0 > 0):
        return math.inf
    if isinstance(sampler, BetaBellSampler) and ((d1 > 0 and sampler.b >= 2) or (d0 > 0 and sampler.a >= 2)):
        return math.inf
    s = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = lo + (hi - lo) * 0.5 * (1.0 - torch.cos(math.pi * s))
    dt = (hi - lo) * 0.5 * math.pi * torch.sin(math.pi * s) / n
    g2 = schedule.dalpha(t) ** 2
    num = (g2 / sampler.pdf(t) * dt).sum()
    den = (hi - lo) * (g2 * dt).sum()
    return float(num / den)


# --------------------------------------------------------------------------------------------
# Registries: the config's allowed `diffusion.time_sampler` and `diffusion.bell.family` values
# --------------------------------------------------------------------------------------------

# builder(eps, stratified, t_min, t_max, options) -> TimeSampler; `options` is the diffusion config
# (config.DiffusionConfig) or any object with the sampler's own settings (`bell` for the bell).
TimeSamplerBuilder = Callable[[float, bool, float, float, Any], TimeSampler]


@dataclass(frozen=True)
class TimeSamplerSpec:
    name: str
    build: TimeSamplerBuilder
    # the config validator refuses `elbo` when the importance weights' variance exceeds
    # ELBO_VARIANCE_LIMIT x uniform t's (elbo_variance_ratio): for densities that may vanish at an end
    check_elbo_variance: bool = False


TIME_SAMPLERS: dict[str, TimeSamplerSpec] = {}
BELL_FAMILIES: dict[str, Callable[[float, BellConfig, bool, float, float], TimeSampler]] = {
    "logit_normal": lambda eps, bell, stratified, t_min, t_max: LogitNormalBellSampler(
        eps, mu=bell.mu, sigma=bell.sigma, stratified=stratified, t_min=t_min, t_max=t_max),
    "beta": lambda eps, bell, stratified, t_min, t_max: BetaBellSampler(
        eps, a=bell.a, b=bell.b, stratified=stratified, t_min=t_min, t_max=t_max),
}


def register_time_sampler(name: str, check_elbo_variance: bool = False):
    """Decorator: register `builder(eps, stratified, t_min, t_max, options)` as time sampler `name`."""

    def register(build: TimeSamplerBuilder) -> TimeSamplerBuilder:
        if name in TIME_SAMPLERS:
            raise ValueError(f"time sampler {name!r} is already registered")
        TIME_SAMPLERS[name] = TimeSamplerSpec(name, build, check_elbo_variance)
        return build

    return register


@register_time_sampler("uniform")
def _uniform(eps, stratified, t_min, t_max, options):
    return UniformSampler(eps, stratified, t_min=t_min, t_max=t_max)


@register_time_sampler("antithetic")
def _antithetic(eps, stratified, t_min, t_max, options):
    return AntitheticSampler(eps, t_min=t_min, t_max=t_max)


@register_time_sampler("bell", check_elbo_variance=True)
def _bell(eps, stratified, t_min, t_max, options):
    bell = getattr(options, "bell", None) or BellConfig()
    if bell.family not in BELL_FAMILIES:
        raise ValueError(f"unknown bell family {bell.family!r}; expected one of {', '.join(BELL_FAMILIES)}")
    return BELL_FAMILIES[bell.family](eps, bell, stratified, t_min, t_max)


@dataclass
class _Options:
    bell: BellConfig | None = None


def build_time_sampler(name: str, eps: float, bell: BellConfig | None = None, stratified: bool = False,
                       t_min: float = 0.0, t_max: float = 1.0, options: Any = None) -> TimeSampler:
    """The registered sampler `name`. `bell`: a BellConfig (family, mu, sigma, a, b), read by `bell`
    only; `options`: the whole diffusion config instead (what other samplers read their settings from).
    `stratified`: draw by the inverse CDF of globally stratified uniforms (`antithetic` always is).
    t_min/t_max truncate the sampler to [max(eps, t_min), t_max] (module docstring)."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; expected one of {', '.join(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name].build(eps, stratified, t_min, t_max, options if options is not None else _Options(bell))


def time_sampler_from_config(cfg) -> TimeSampler:
    """The training time sampler of a config.DiffusionConfig."""
    return build_time_sampler(cfg.time_sampler, cfg.eps, stratified=cfg.stratified, t_min=cfg.t_min,
                              t_max=cfg.t_max, options=cfg)
