"""`diffusion.time_sampler: adaptive`: a time density learned online from the training loss.

Ours: none of the anchor papers has an adaptive sampler (issue 22 item 4). Everything here (the
piecewise-constant family, the statistic, the floor, the EMA, the warm-up, the defaults) is our
design choice, not a paper's formula.

The density. q is piecewise constant over K equal buckets of the support [lo, hi] (time_samplers.py:
[max(eps, t_min), t_max]): bucket k has probability mass m_k, density m_k / width. Draws invert
its piecewise-linear CDF (of iid or, with `diffusion.stratified`, globally stratified uniforms),
so every sampler rule of time_samplers.py holds unchanged.

What it minimises. Let f(t) be a draw's per-token loss as it would be under uniform t (its weighted
loss times q(t) / u(t), u = 1 / (hi - lo) the uniform density). The training loss estimates
integral u(t) E[f | t] dt by the mean of f(t) u(t) / q(t) over t ~ q, whose variance is
integral u^2 E[f^2 | t] / q dt - mean^2. Over piecewise-constant q this is smallest at
m_k proportional to sqrt(E[f^2 | bucket k]) (the bucket's RMS; Cauchy-Schwarz). With stratified
draws (each bucket gets ~N m_k draws, not a random number) the between-bucket part of the variance
is gone and Neyman allocation, m_k proportional to the bucket's standard deviation of f, is the
optimum. `statistic`: rms | std | auto (std when `diffusion.stratified` is on, rms otherwise).

How it learns (all identical on every rank, so every rank draws the same t from the same q):
- `observe(t, loss)` (the objective calls it per micro-batch) adds this rank's draws to local
  per-bucket sums [count, sum f, sum f^2]; non-finite losses are left out.
- `sync_and_update(step, reduce)` (the trainer calls it once per optimizer step, on every rank)
  sums the local sums over the data-parallel ranks (`reduce`: parallel/comm.dp_sum) into a pending
  total. Every `update_every` steps the pending totals are folded into an exponential moving
  average of the sums (decay `decay`); from `warmup_steps` on, the masses are set from the EMA:
      m_k = floor / K + (1 - floor) * s_k / sum_j s_j,      s_k = RMS or std of f in bucket k
  so every bucket keeps at least floor / K of the mass (q >= floor * u: importance weights are at
  most 1 / floor) and floor = 1 is plain uniform t. Before `warmup_steps`, q is uniform. A bucket
  with no observations yet gets the largest s_j (explore rather than starve); with no signal at
  all (every s_k = 0) q stays uniform.
- `state_dict()` (masses, EMA, pending totals, update count) goes into the trainer's checkpoint, so
  a resumed run continues with the same q; the state depends only on the global batch, so it also
  carries over to another layout (a portable checkpoint).

Unbiasedness. q at step s depends on earlier steps only, so given the past, each step's loss is an
unbiased estimate of the same objective:
- `elbo`: weight w(t) / q(t) (the objective's rule for every sampler): the NELBO on [lo, hi].
- `reweighted`: weight w(t) u(t) / q(t) (`reweighted_correction`): the uniform-t reweighted loss,
  i.e. MDLM's training loss. A fixed sampler under `reweighted` reshapes the objective on purpose;
  an adaptive one must not, since its q moves during training.

Supported with the masked-diffusion objectives that draw one t per sequence (model.variant mdm and
scatter; masking uniform or density_priority); the config validator refuses the others and
pipeline parallelism (only the last stage sees the loss; not wired).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pretrain.diffusion.time_samplers import TimeSampler, register_time_sampler

STATISTICS = ("auto", "rms", "std")


class AdaptiveTimeSampler(TimeSampler):
    name = "adaptive"

    def __init__(self, eps: float, stratified: bool = False, t_min: float = 0.0, t_max: float = 1.0,
                 buckets: int = 10, floor: float = 0.2, decay: float = 0.9, warmup_steps: int = 100,
                 update_every: int = 10, statistic: str = "auto"):
        super().__init__(eps, stratified, t_min, t_max)
        problems = []
        if buckets < 1:
            problems.append(f"diffusion.adaptive.buckets = {buckets}: must be >= 1")
        if not 0.0 < floor <= 1.0:
            problems.append(f"diffusion.adaptive.floor = {floor}: must be in (0, 1] (1 = uniform t)")
        if not 0.0 <= decay < 1.0:
            problems.append(f"diffusion.adaptive.decay = {decay}: must be in [0, 1)")
        if warmup_steps < 0:
            problems.append(f"diffusion.adaptive.warmup_steps = {warmup_steps}: must be >= 0")
        if update_every < 1:
            problems.append(f"diffusion.adaptive.update_every = {update_every}: must be >= 1")
        if statistic not in STATISTICS:
            problems.append(f"diffusion.adaptive.statistic = {statistic!r}: must be one of {', '.join(STATISTICS)}")
        if problems:
            raise ValueError("; ".join(problems))
        self.buckets, self.floor, self.decay = buckets, floor, decay
        self.warmup_steps, self.update_every = warmup_steps, update_every
        self.statistic = ("std" if stratified else "rms") if statistic == "auto" else statistic
        self.edges = torch.linspace(self.lo, self.hi, buckets + 1, dtype=torch.float64)
        self.width = (self.hi - self.lo) / buckets
        self.mass = torch.full((buckets,), 1.0 / buckets, dtype=torch.float64)
        self.ema = torch.zeros(3, buckets, dtype=torch.float64)  # EMA of [count, sum f, sum f^2]
        self.pending = torch.zeros(3, buckets, dtype=torch.float64)  # global sums since the last update
        self.updates = 0  # EMA updates so far
        self._local = torch.zeros(3, buckets, dtype=torch.float64)  # this rank's, since the last sync
        self._set_cumulative()

    @classmethod
    def from_config(cls, eps: float, cfg=None, stratified: bool = False, t_min: float = 0.0,
                    t_max: float = 1.0) -> AdaptiveTimeSampler:
        """`cfg`: a config.AdaptiveConfig (None: the defaults)."""
        keys = ("buckets", "floor", "decay", "warmup_steps", "update_every", "statistic")
        kwargs = {k: getattr(cfg, k) for k in keys if cfg is not None and hasattr(cfg, k)}
        return cls(eps, stratified=stratified, t_min=t_min, t_max=t_max, **kwargs)

    # ------------------------------------------------------------------ the density
    def _set_cumulative(self) -> None:
        self.cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.mass, 0)])
        self.cum[-1] = 1.0

    def bucket(self, t: torch.Tensor) -> torch.Tensor:
        """Long: the bucket of each t (t on an inner edge belongs to the bucket above it)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        k = torch.searchsorted(self.edges, t.contiguous(), right=True) - 1
        return k.clamp(0, self.buckets - 1)

    def pdf(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.where(self._inside(t), self.mass[self.bucket(t)] / self.width, 0.0)

    def cdf(self, t):
        t = torch.as_tensor(t, dtype=torch.float64).clamp(self.lo, self.hi)
        k = self.bucket(t)
        return (self.cum[k] + self.mass[k] * (t - self.edges[k]) / self.width).clamp(0.0, 1.0)

    def icdf(self, u):
        u = torch.as_tensor(u, dtype=torch.float64)
        k = (torch.searchsorted(self.cum, u.contiguous(), right=True) - 1).clamp(0, self.buckets - 1)
        t = self.edges[k] + (u - self.cum[k]) / self.mass[k] * self.width
        return t.clamp(self.lo, self.hi)

    def reweighted_correction(self, t: torch.Tensor) -> torch.Tensor:
        """u(t) / q(t): under `reweighted` the objective multiplies w(t) by it, so the loss stays the
        uniform-t one however q moves (module docstring)."""
        return 1.0 / ((self.hi - self.lo) * self.pdf(t))

    # ------------------------------------------------------------------ learning q
    def observe(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Record draws `t` (float64 [n]) whose weighted per-token losses (as the objective weighted
        them, with this step's q) are `loss` [n]. Local to this rank until `sync_and_update`."""
        t = torch.as_tensor(t, dtype=torch.float64).flatten().cpu()
        f = torch.as_tensor(loss).detach().flatten().cpu().double() * self.pdf(t) * (self.hi - self.lo)
        keep = torch.isfinite(f)
        k, f = self.bucket(t[keep]), f[keep]
        self._local[0].index_add_(0, k, torch.ones_like(f))
        self._local[1].index_add_(0, k, f)
        self._local[2].index_add_(0, k, f * f)

    def sync_and_update(self, step: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Call on every rank once per optimizer step, `step` = optimizer steps completed (1, 2, ...).
        `reduce`: the sum over data-parallel ranks (None: one rank)."""
        local = self._local.flatten()
        total = reduce(local) if reduce is not None else local
        self.pending += torch.as_tensor(total, dtype=torch.float64).cpu().view(3, self.buckets)
        self._local.zero_()
        if step % self.update_every:
            return
        self.ema.mul_(self.decay).add_(self.pending, alpha=1.0 - self.decay)
        self.pending.zero_()
        self.updates += 1
        if step >= self.warmup_steps:
            self.mass = self.target_mass()
            self._set_cumulative()

    def bucket_statistic(self) -> torch.Tensor:
        """float64 [K]: s_k, the RMS or standard deviation of f per bucket from the EMA (NaN where a
        bucket has no observations)."""
        n, s1, s2 = self.ema
        seen = n > 0
        nn = torch.where(seen, n, 1.0)
        mean, second = s1 / nn, s2 / nn
        value = second if self.statistic == "rms" else (second - mean * mean)
        return torch.where(seen, value.clamp(min=0.0).sqrt(), math.nan)

    def target_mass(self) -> torch.Tensor:
        """The masses the EMA asks for: floor / K + (1 - floor) * s_k / sum s (module docstring)."""
        s = self.bucket_statistic()
        seen = torch.isfinite(s)
        uniform = torch.full((self.buckets,), 1.0 / self.buckets, dtype=torch.float64)
        if not bool(seen.any()):
            return uniform
        s = torch.where(seen, s, s[seen].max())  # an unobserved bucket: explore it
        total = float(s.sum())
        if not (math.isfinite(total) and total > 0.0):
            return uniform
        mass = self.floor / self.buckets + (1.0 - self.floor) * s / total
        return mass / mass.sum()

    def metrics(self) -> dict[str, float]:
        """For the step log: each bucket's probability mass, and the largest importance ratio u/q."""
        out = {f"train/t_mass{float(self.edges[k]):.2f}-{float(self.edges[k + 1]):.2f}": float(self.mass[k])
               for k in range(self.buckets)}
        out["train/t_max_weight"] = float(1.0 / (self.buckets * self.mass.min()))
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The global state (identical on every rank; local observations are synced every step)."""
        return {"buckets": self.buckets, "lo": self.lo, "hi": self.hi, "mass": self.mass.clone(),
                "ema": self.ema.clone(), "pending": self.pending.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if (int(state["buckets"]), float(state["lo"]), float(state["hi"])) != (self.buckets, self.lo, self.hi):
            raise ValueError(
                f"the checkpoint's adaptive time sampler has {state['buckets']} buckets on "
                f"[{state['lo']}, {state['hi']}], this run {self.buckets} on [{self.lo}, {self.hi}]: "
                "diffusion.adaptive.buckets and diffusion.t_min/t_max/eps must match to resume"
            )
        self.mass = state["mass"].to(torch.float64).clone()
        self.ema = state["ema"].to(torch.float64).clone()
        self.pending = state["pending"].to(torch.float64).clone()
        self.updates = int(state["updates"])
        self._local.zero_()
        self._set_cumulative()


@register_time_sampler("adaptive")
def _adaptive(eps, stratified, t_min, t_max, options):
    """`options`: the diffusion config; its `adaptive` section holds the sampler's settings."""
    return AdaptiveTimeSampler.from_config(eps, getattr(options, "adaptive", None), stratified, t_min, t_max)
