"""Masking policies: given t (through alpha_t), which real tokens of a batch become the mask token.

The interface every policy implements:

    policy.mask(input_ids [B, L], loss_mask Bool[B, L], alpha_t [B] or [B, L], rng: StepRNG, **token_info)
        -> Bool[B, L]            (`ComplementaryMasking`: Bool[2B, L], see below)

alpha_t is per sequence ([B]) or per token ([B, L]: block diffusion, where each block has its own t).

`loss_mask` marks real tokens (padding is never masked). Draws come from `rng.rand` (this rank's
rows of a global-batch draw, CPU, then moved to the device), so masks stay layout-independent.
`token_info` carries optional per-token tensors; the density-aware policies of seed 002 ("Mask Is
What DLLM Needs", arXiv 2603.15803) read `density` [B, L] in [0, 1] (the shards' density column,
written by `data_pipeline.density` annotators; the objective passes `batch["density"]` itself).

Policies and their math (r = 1 - alpha_t, the schedule's masking rate; d_i = density; u_i ~ U[0, 1)
from rng.rand; a *group* g is a sequence, or one block of it when t is per block; n(g) its real tokens):

uniform            P(mask_i) = r, independently (MDLM's forward process q(x_t | x_0)).

density_priority   `diffusion.density_form` chooses how the probabilities tilt toward dense tokens;
                   both keep the expected number of masked tokens of every group exactly r * n(g)
                   (the ELBO's bookkeeping of *how many* tokens are masked holds at every t), and
                   both draw soft (independent Bernoulli) masks: mask_i = u_i < p_i.

  ratio (default; the paper's form as its summaries give it: "dense tokens are w times as likely to
        be masked as the others, the overall ratio kept, soft masking beats hard, w = 2 best").
        Dense means d_i >= `diffusion.density_threshold` (default 0.5). With the shards' `view: hubs`
        (data.density: 1 for each document's top `hub_fraction` tokens, 0 elsewhere) that is exactly
        the annotator's hub flag, whatever the threshold in (0, 1]; with `view: scores` it thresholds
        the per-document normalised score (ours: the paper's hub extraction is not public).
        p_i = min(1, w c_g) for dense tokens, min(1, c_g) for the others, where c_g solves
            n_d min(1, w c) + n_o min(1, c) = r * n(g)    (n_d, n_o: dense / other real tokens of g)
        in closed form: c = r n(g) / (w n_d + n_o), so p_dense / p_other = w exactly, unless that
        puts the more-likely class above 1; then that class saturates at p = 1 and the other class
        absorbs the rest: w > 1: p_dense = 1, p_other = (r n(g) - n_d) / n_o; w < 1: p_other = 1,
        p_dense = (r n(g) - n_o) / n_d (the rate is still exact; the ratio is then below w, the most
        the rate allows). A group without dense tokens (or without others) is masked uniformly at r.
        w = 1 gives p_i = r: exactly `uniform` (same draws, same mask). `diffusion.density_ratio`, w > 0.

  logit_tilt (an assumption of ours, kept as an option): p_i = sigmoid(logit(r) + s * d_i + c_g),
        s = `diffusion.density_strength` in logit units per unit of density, the shift c_g solved by
        bisection so that sum_{real i in g} p_i = r * n(g) (to ~1e-12). Odds ratio e^{s (d_i - d_j)}
        between two tokens of a group (s = 3: ~20 between the densest and the sparsest), not a
        probability ratio. s = 0 gives `uniform` exactly.

complementary      One sequence -> two samples that share the batch (rows 2b and 2b + 1 of the
                   returned [2B, L] mask), both drawn from the same uniforms u:
                   the Logical (reasoning) sample masks R = {i : u_i < p_i}, the density_priority
                   mask at rate r (dense tokens first, probabilistically); the Syntactic sample
                   keeps the dense tokens and masks the glue, by `diffusion.syntactic`:
    priority (default) S = {i : u_i >= 1 - p^S_i}, its own priority mask at the complementary rate
        1 - r: ratio form with w_S = `diffusion.syntactic_ratio` (default 0.5, the paper's value for
        the syntactic sample as its summaries give it), logit_tilt form with strength -s. Drawn
        antithetically (1 - u) from R's uniforms, so R and S overlap as little as their marginals
        allow (the paper's "complementary" pairing; the coupling and the rate 1 - r are ours: the
        paper's exact pairing is not public). With w = w_S = 1 (or s = 0) S is the exact
        complement of R (up to float rounding of 1 - (1 - r)).
    complement  S = real \\ R, the exact complement (low-density glue first, at rate 1 - r): every
        real token is a target of exactly one of the pair (ours; LLaDA-style complementary masking).
                   Uniform R (w = 1 or s = 0) gives LLaDA's complementary uniform masking either way.

Groups are found as runs of equal rate along a row (`_groups`): a new group starts at each row and
wherever the per-token rate changes (the blocks of block diffusion; two adjacent blocks with the
very same t, a probability-zero event, merge into one group whose total is still exact).

How the objective weights the losses, and which is an ELBO, is documented in objective.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pretrain.diffusion.rng import StepRNG

_LOGIT_CLAMP = 30.0


def _p_mask(alpha_t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """1 - alpha_t as float64 CPU [B, L] (broadcast from [B] when per sequence)."""
    p = 1.0 - alpha_t.detach().to(device="cpu", dtype=torch.float64)
    if p.dim() == 1:
        p = p[:, None]
    return p.expand(shape)


class UniformMasking:
    """Each real token is masked independently with probability 1 - alpha_t (MDLM's forward process)."""

    name = "uniform"
    expands = 1  # samples produced per input sequence

    def mask(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        alpha_t: torch.Tensor,
        rng: StepRNG,
        **token_info,
    ) -> torch.Tensor:
        # drawn and thresholded on the CPU: the same mask on any device
        u = rng.rand(*input_ids.shape)
        p_mask = 1.0 - alpha_t.detach().to(device="cpu", dtype=torch.float64)
        if p_mask.dim() == 1:
            p_mask = p_mask[:, None]
        return (u < p_mask).to(input_ids.device) & loss_mask.bool()


def _groups(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group id [B, L] of each position: a new group starts at each row and where the rate changes
    along a row (the blocks of block diffusion), so each group has one target rate."""
    B, L = p.shape
    new = torch.ones(B, L, dtype=torch.bool)
    if L > 1:
        new[:, 1:] = p[:, 1:] != p[:, :-1]
    gid = new.reshape(-1).long().cumsum(0) - 1
    return gid.view(B, L), int(gid[-1]) + 1 if gid.numel() else 0


def priority_probabilities(density: torch.Tensor, real: torch.Tensor, p_mask: torch.Tensor, strength: float,
                           iters: int = 50) -> torch.Tensor:
    """float64 [B, L]: p_i = sigmoid(logit(r_i) + s d_i + c_g), with c_g such that the mean of p over
    the real tokens of each group g equals that group's rate r (module docstring). 0 off real tokens."""
    d = density.detach().to(device="cpu", dtype=torch.float64).clamp(0.0, 1.0)
    w = real.detach().to("cpu").to(torch.float64)
    r = p_mask.to(torch.float64).clamp(0.0, 1.0)
    base = torch.logit(r.clamp(1e-12, 1.0 - 1e-12)).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP) + strength * d
    if strength == 0.0:
        return torch.where(w > 0, r, torch.zeros_like(r))
    span = abs(strength) + 1.0  # c in [-|s|, |s|] brackets the root (module docstring)
    if bool((r == r[:, :1]).all()):  # one rate per row (mdm): dense row sums, no scatter
        target = (r * w).sum(dim=1)
        lo = torch.full((r.shape[0], 1), -span, dtype=torch.float64)
        hi = -lo
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = ((torch.sigmoid(base + mid) * w).sum(dim=1) < target)[:, None]
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        p = torch.sigmoid(base + 0.5 * (lo + hi))
        p = torch.where(r <= 0.0, torch.zeros_like(p), torch.where(r >= 1.0, torch.ones_like(p), p))
        return p * w
    gid, n = _groups(r)
    flat_g = gid.reshape(-1)
    wf = w.reshape(-1)
    n_real = torch.zeros(n, dtype=torch.float64).index_add_(0, flat_g, wf)
    target = torch.zeros(n, dtype=torch.float64).index_add_(0, flat_g, (r * w).reshape(-1))  # r * n_real
    lo, hi = torch.full((n,), -span, dtype=torch.float64), torch.full((n,), span, dtype=torch.float64)
    bf = base.reshape(-1)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        mass = torch.zeros(n, dtype=torch.float64).index_add_(0, flat_g, torch.sigmoid(bf + mid[flat_g]) * wf)
        below = mass < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    c = 0.5 * (lo + hi)
    p = torch.sigmoid(bf + c[flat_g]).view_as(r)
    # rates of exactly 0 or 1 stay exact (logit is clamped above)
    p = torch.where(r <= 0.0, torch.zeros_like(p), torch.where(r >= 1.0, torch.ones_like(p), p))
    p = torch.where(n_real[flat_g].view_as(r) > 0, p, r)
    return p * w


def ratio_probabilities(density: torch.Tensor, real: torch.Tensor, p_mask: torch.Tensor, ratio: float,
                        threshold: float = 0.5) -> torch.Tensor:
    """float64 [B, L]: the probability-ratio form (module docstring). Dense tokens (d >= threshold)
    get p = min(1, w c_g), the others min(1, c_g), with c_g in closed form so that the expected
    masked count of each group g is exactly r * n_real(g); the class that would exceed 1 saturates
    and the other absorbs the rest. 0 off real tokens."""
    w_real = real.detach().to("cpu").to(torch.float64)
    r = p_mask.to(torch.float64).clamp(0.0, 1.0)
    if ratio == 1.0:  # exactly uniform: the same probabilities, so the same draws
        return torch.where(w_real > 0, r, torch.zeros_like(r))
    dense = (density.detach().to(device="cpu", dtype=torch.float64) >= threshold).to(torch.float64) * w_real
    gid, n = _groups(r)
    flat_g = gid.reshape(-1)

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float64).index_add_(0, flat_g, x.reshape(-1))

    n_d = per_group(dense)
    n_o = per_group(w_real) - n_d
    first = torch.nonzero(torch.diff(flat_g, prepend=flat_g.new_full((1,), -1))).flatten()
    r_g = r.reshape(-1)[first]  # one rate per group: the rate at its first position
    target = r_g * (n_d + n_o)
    # the more likely class (multiplier hi) is the one that can saturate
    (m_hi, n_hi, m_lo, n_lo) = (ratio, n_d, 1.0, n_o) if ratio > 1.0 else (1.0, n_o, ratio, n_d)
    c = target / (m_hi * n_hi + m_lo * n_lo).clamp(min=1e-300)
    p_hi, p_lo = m_hi * c, m_lo * c
    sat = p_hi > 1.0
    p_lo = torch.where(sat, (target - n_hi) / n_lo.clamp(min=1e-300), p_lo)
    p_hi = torch.where(sat, torch.ones_like(p_hi), p_hi)
    p_d, p_o = (p_hi, p_lo) if ratio > 1.0 else (p_lo, p_hi)
    p = torch.where(dense > 0, p_d[flat_g].view_as(r), p_o[flat_g].view_as(r)).clamp(0.0, 1.0)
    return p * w_real


def _density(token_info: dict, shape, policy: str) -> torch.Tensor:
    d = token_info.get("density")
    if d is None:
        raise ValueError(f"masking policy {policy!r} needs per-token density (batch['density'] or "
                         "token_info['density']): build the shards with data.density.annotator set")
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"density has shape {tuple(d.shape)}, input_ids {tuple(shape)}")
    return d


# `diffusion.density_form` and `diffusion.syntactic` values (the config's allowed values)
DENSITY_FORMS = ("ratio", "logit_tilt")
SYNTACTIC_FORMS = ("priority", "complement")


class DensityPriorityMasking:
    """Density-biased soft masking at the schedule's exact expected rate (module docstring):
    `form="ratio"` (dense tokens w times as likely, default w = 2) or `form="logit_tilt"` (strength s)."""

    name = "density_priority"
    expands = 1

    def __init__(self, form: str = "ratio", ratio: float = 2.0, strength: float = 3.0, threshold: float = 0.5):
        if form not in DENSITY_FORMS:
            raise ValueError(f"unknown density form {form!r}; expected one of {', '.join(DENSITY_FORMS)}")
        if not ratio > 0.0:
            raise ValueError(f"density ratio must be > 0, got {ratio}")
        self.form, self.ratio, self.strength, self.threshold = form, float(ratio), float(strength), float(threshold)

    def probabilities_at_rate(self, loss_mask, rate: torch.Tensor, density, mirror: bool = False,
                              ratio: float | None = None) -> torch.Tensor:
        """float64 [B, L] masking probabilities at the masking rate `rate` (float64 CPU [B, L]).
        mirror: the syntactic sample's tilt (ratio `ratio`, or strength -s)."""
        if self.form == "ratio":
            w = self.ratio if ratio is None else ratio
            return ratio_probabilities(density, loss_mask, rate, w, self.threshold)
        return priority_probabilities(density, loss_mask, rate, -self.strength if mirror else self.strength)

    def probabilities(self, loss_mask, alpha_t, density) -> torch.Tensor:
        return self.probabilities_at_rate(loss_mask, _p_mask(alpha_t, tuple(loss_mask.shape)), density)

    def mask(self, input_ids, loss_mask, alpha_t, rng: StepRNG, **token_info) -> torch.Tensor:
        u = rng.rand(*input_ids.shape)  # drawn first, as `uniform` does: w = 1 / s = 0 reproduces it
        p = self.probabilities(loss_mask, alpha_t, _density(token_info, input_ids.shape, self.name))
        return (u < p).to(input_ids.device) & loss_mask.bool()


class ComplementaryMasking(DensityPriorityMasking):
    """Complementary Priority Masking: a Logical sample (dense tokens first, rate r) and a Syntactic
    sample (glue first: its own priority mask at rate 1 - r, or the exact complement) from each
    sequence, interleaved as rows 2b, 2b + 1 (module docstring)."""

    name = "complementary"
    expands = 2

    def __init__(self, form: str = "ratio", ratio: float = 2.0, strength: float = 3.0, threshold: float = 0.5,
                 syntactic: str = "priority", syntactic_ratio: float = 0.5):
        super().__init__(form, ratio, strength, threshold)
        if syntactic not in SYNTACTIC_FORMS:
            raise ValueError(f"unknown syntactic sample {syntactic!r}; expected one of {', '.join(SYNTACTIC_FORMS)}")
        if not syntactic_ratio > 0.0:
            raise ValueError(f"syntactic ratio must be > 0, got {syntactic_ratio}")
        self.syntactic, self.syntactic_ratio = syntactic, float(syntactic_ratio)

    def pair_masks(self, input_ids, loss_mask, alpha_t, rng: StepRNG, **token_info):
        """(logical mask, syntactic mask), each Bool[B, L] on input_ids' device."""
        real = loss_mask.bool()
        density = _density(token_info, input_ids.shape, self.name)
        u = rng.rand(*input_ids.shape)
        rate = _p_mask(alpha_t, tuple(loss_mask.shape))
        logical = (u < self.probabilities_at_rate(loss_mask, rate, density)).to(input_ids.device) & real
        if self.syntactic == "complement":
            return logical, real & ~logical
        p_s = self.probabilities_at_rate(loss_mask, 1.0 - rate, density, mirror=True, ratio=self.syntactic_ratio)
        syntactic = (u >= 1.0 - p_s).to(input_ids.device) & real  # antithetic: 1 - u < p_s
        return logical, syntactic

    def mask(self, input_ids, loss_mask, alpha_t, rng: StepRNG, **token_info) -> torch.Tensor:
        logical, syntactic = self.pair_masks(input_ids, loss_mask, alpha_t, rng, **token_info)
        return torch.stack([logical, syntactic], dim=1).flatten(0, 1)  # [2B, L]


# --------------------------------------------------------------------------------------------
# Registry: the config's allowed `diffusion.masking` values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingSpec:
    """One `diffusion.masking` policy: how to build it from a config.DiffusionConfig, whether it reads
    the shards' density column, and (when it changes the loss, not only the mask) the objective
    class that replaces the variant's masked-diffusion objective (reverse_order.py). Which variants
    may use a policy is the variant's (pretrain/variants.py)."""

    name: str
    build: Callable[[Any], Any]
    needs_density: bool = False
    objective: type | None = None


MASKING_POLICIES: dict[str, MaskingSpec] = {}


def register_masking(spec: MaskingSpec) -> MaskingSpec:
    if spec.name in MASKING_POLICIES:
        raise ValueError(f"masking policy {spec.name!r} is already registered")
    MASKING_POLICIES[spec.name] = spec
    return spec


def _density_kwargs(cfg) -> dict:
    return {"form": cfg.density_form, "ratio": cfg.density_ratio, "strength": cfg.density_strength,
            "threshold": cfg.density_threshold}


register_masking(MaskingSpec("uniform", lambda cfg: UniformMasking()))
register_masking(MaskingSpec("density_priority", lambda cfg: DensityPriorityMasking(**_density_kwargs(cfg)),
                             needs_density=True))
register_masking(MaskingSpec("complementary", lambda cfg: ComplementaryMasking(
    **_density_kwargs(cfg), syntactic=cfg.syntactic, syntactic_ratio=cfg.syntactic_ratio), needs_density=True))


@dataclass
class _DensityOptions:
    masking: str
    density_form: str
    density_ratio: float
    density_strength: float
    density_threshold: float
    syntactic: str
    syntactic_ratio: float


def build_masking(name: str, form: str = "ratio", ratio: float = 2.0, strength: float = 3.0,
                  threshold: float = 0.5, syntactic: str = "priority", syntactic_ratio: float = 0.5):
    """The policy `name` with the density parameters of config.DiffusionConfig (module docstring)."""
    return masking_from_config(_DensityOptions(name, form, ratio, strength, threshold, syntactic, syntactic_ratio))


def masking_from_config(cfg):
    """The registered policy `cfg.masking`, built from a config.DiffusionConfig."""
    if cfg.masking not in MASKING_POLICIES:
        raise ValueError(f"unknown masking policy {cfg.masking!r}; known: {', '.join(MASKING_POLICIES)}")
    return MASKING_POLICIES[cfg.masking].build(cfg)
