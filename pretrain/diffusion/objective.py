"""Training losses and evaluation NLLs: masked diffusion (MDLM's continuous-time NELBO) and AR.

Masked diffusion, one training step (MDLM, arXiv 2406.07524, eq. 11):
    t_b ~ q (the time sampler)                  one t per sequence
    x_t = x with each real token masked w.p. 1 - alpha(t_b)
    loss = sum_b weight_b * sum_{masked l} -log p(x_l | x_t) / (number of real tokens)
with weight_b = w(t_b) / q(t_b) (`elbo`: unbiased per-token NELBO on [eps, 1]) or w(t_b)
(`reweighted`: the sampler reshapes the objective; see time_samplers.py). Cross-entropy is taken in
float32 on the masked real tokens only, whatever the autocast dtype of the logits.

Parameterisation (`diffusion.parameterization`, every masked-diffusion variant: mdm, scatter, block,
jigsaw). `subs` (default) is MDLM's SUBS (sec. 3.2.3): p_theta(x_0 | x_t) puts zero mass on [MASK]
("zero masking probabilities": the [MASK] logit is -inf before the softmax) and, where x_t is
unmasked, is the point mass on x_t ("carry-over unmasking"). Carry-over makes the unmasked terms
-log 1 = 0, which is why the loss sums over masked tokens only; the [MASK] logit is dropped from the
selected rows (`selected_logits`), so each term is the cross-entropy over the V - 1 real tokens and
never exceeds the `plain` one (softmax over all V, [MASK] included). `subs_log_probs` is the dense
form. The samplers (pretrain/sample.py) apply the same two rules under either setting.

Evaluation (`eval_nll`) is independent of the training sampler and weighting so that runs compare:
the `elbo` estimate under uniform t with `eval_t_samples` stratified draws per sequence and uniform
masking, from a caller-seeded generator (deterministic). The caller puts the model in eval mode.

Per-token NELBO counts every real token of a sequence; AR counts the L - 1 predicted tokens.

Prompts (task data, data.train_on = response): a batch may carry `prompt_mask` Bool[B, L] (True =
prompt token, BOS and separator included; data_pipeline.stream derives it). Every objective then
keeps the prompt clean (never replaced by [MASK], whatever the masking policy: the policies only see
the response's real tokens, `targets_of`) and visible (it is a real key for the model, which also
gets `prompt_mask`), scores only response tokens, and normalises by the number of response tokens;
AR scores only response targets. The bounds become bounds on -log p(response | prompt), per response
token. Without `prompt_mask` (language data) nothing changes.

Masking policies (masking.py; seed 002) and what the training loss is for each (r = 1 - alpha(t)):
- uniform: the loss above, an unbiased estimate of the per-token NELBO (`elbo` weighting).
- density_priority: same formula and weights w(t)/q(t); the expected number of masked tokens is
  the schedule's, but the mask is not drawn from q(x_t | x_0), so the loss is a *training
  surrogate* (a density-reweighted NELBO), not an ELBO; it equals the NELBO estimate at ratio w = 1
  (`density_form: ratio`) or strength 0 (`logit_tilt`).
- complementary: each sequence gives a logical (reasoning) row (mask R at rate r, time t) and a
  syntactic row (mask S at rate 1 - r: its own priority mask, or R's complement; masking.py).
  S's time is t_S = alpha^{-1}(1 - alpha(t)) (what time
  conditioning sees); t_S is a function of t ~ q, so its density is q(t) |dt/dt_S| and its
  importance weight is w(t_S) / q_S(t_S) = -alpha'(t) / (alpha(t) q(t)). The loss per sequence is
      0.5 * [ w(t)/q(t) * CE(R) + (-alpha'(t) / (alpha(t) q(t))) * CE(S) ]       (`elbo`)
      0.5 * [ w(t) * CE(R) + w(t_S) * CE(S) ]                                     (`reweighted`)
  normalised by the real tokens of the original sequences (block diffusion: the same per block,
  blockwise.py). With uniform masks (w = w_S = 1, or strength 0) both halves
  are unbiased NELBO estimates, so their mean is one too (complementary/antithetic masks, as in
  LLaDA's fine-tuning; the S half covers t_S in [alpha^{-1}(1 - alpha(eps)), alpha^{-1}(1 - alpha(1))],
  which differs from [eps, 1] only by eps-sized ends; with t clipped to [t_min, t_max] each half
  covers its own clipped range); with density-biased masks it is a surrogate.
  The pair costs two forward rows per sequence: the same data tokens, twice the compute.
Evaluation always uses uniform masking and the uniform-t NELBO (eval_nll), so runs stay comparable.
The objective reads `batch["density"]` (the stream's per-token density) into token_info itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from pretrain.diffusion.masking import UniformMasking
from pretrain.diffusion.rng import SampleRNG, StepRNG, eval_rng
from pretrain.diffusion.schedules import Schedule, build_schedule
from pretrain.diffusion.time_samplers import TimeSampler, time_sampler_from_config

if TYPE_CHECKING:  # the config sits above the objectives (it derives its allowed values from them)
    from pretrain.config import DiffusionConfig

# `diffusion.parameterization` and `diffusion.weighting` values (the config's allowed values)
PARAMETERIZATIONS = ("subs", "plain")
WEIGHTINGS = ("elbo", "reweighted")


@dataclass
class LossStats:
    """What one micro-batch's training loss reports besides the loss tensor (no autograd graph):
    the loss value, the masked fraction of the scored tokens, the number of tokens the loss is
    normalised by, and the per-token loss summed and counted by t bucket (`diffusion.loss_buckets`).
    The trainer sums these over micro-batches and ranks and logs train/loss, train/masked_fraction
    and train/loss_t<lo>-<hi>."""

    loss: float
    masked_fraction: float
    n_tokens: int
    t_bucket_loss_sum: torch.Tensor  # float64 [buckets]
    t_bucket_count: torch.Tensor  # long [buckets]

    @classmethod
    def of(cls, loss: torch.Tensor, masked: torch.Tensor, n_real: torch.Tensor, t: torch.Tensor,
           per_token: torch.Tensor, buckets: int, keep: torch.Tensor | None = None) -> LossStats:
        """From a step's draws: t and per_token float64 CPU, one entry per (sequence or block) term,
        bucketed where `keep` (default all); masked Bool over the scored rows, n_real the token count."""
        if keep is not None:
            t, per_token = t[keep], per_token[keep]
        bucket = (t * buckets).long().clamp(0, buckets - 1).flatten()
        return cls(
            loss=float(loss.detach()),
            masked_fraction=float(masked.sum() / n_real),
            n_tokens=int(n_real),
            t_bucket_loss_sum=torch.zeros(buckets, dtype=torch.float64).index_add_(0, bucket, per_token.flatten()),
            t_bucket_count=torch.bincount(bucket, minlength=buckets),
        )

    @classmethod
    def unbucketed(cls, loss: torch.Tensor, n_tokens: torch.Tensor | int, buckets: int) -> LossStats:
        """An objective without t (AR): nothing masked, empty buckets."""
        return cls(float(loss.detach()), 0.0, int(n_tokens), torch.zeros(buckets, dtype=torch.float64),
                   torch.zeros(buckets, dtype=torch.long))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # read access by the old string keys, for callers written against the dicts this replaced
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.__dataclass_fields__ else default


@runtime_checkable
class Objective(Protocol):
    """What the trainer, validation and the pipeline engine call (every objective here is one)."""

    loss_buckets: int

    def training_loss(self, model, batch: dict, rng: StepRNG) -> tuple[torch.Tensor, LossStats]:
        """(the scalar loss to backpropagate, its statistics) for one micro-batch."""
        ...

    def eval_nll(self, model, batch: dict, generator) -> tuple[float, int]:
        """(sum of the per-sequence NLL bound in nats, tokens it covers), deterministic given `generator`."""
        ...


def token_info_of(batch: dict) -> dict:
    """The per-token side information for the masking policy: batch["token_info"] plus the
    stream's `density` column when the batch carries one."""
    info = dict(batch.get("token_info", {}))
    if "density" in batch and "density" not in info:
        info["density"] = batch["density"]
    return info


def targets_of(batch: dict) -> torch.Tensor:
    """Bool[B, L]: the tokens an objective may noise and score: real tokens outside the prompt."""
    real = batch["loss_mask"].bool()
    prompt = batch.get("prompt_mask")
    return real if prompt is None else real & ~prompt.to(real.device).bool()


def prompt_kwargs(batch: dict, repeat: int = 1) -> dict:
    """{"prompt_mask": ...} for the model call when the batch has a prompt (rows repeated `repeat`
    times each, for complementary pairs), else {} (language data: the call is unchanged)."""
    prompt = batch.get("prompt_mask")
    if prompt is None:
        return {}
    prompt = prompt.bool()
    return {"prompt_mask": prompt.repeat_interleave(repeat, dim=0) if repeat > 1 else prompt}


def inverse_alpha(schedule: Schedule, a: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """t with alpha(t) = a (float64), by bisection on [0, 1] (alpha decreases in t); clipped to the
    range alpha takes there."""
    lo, hi = torch.zeros_like(a, dtype=torch.float64), torch.ones_like(a, dtype=torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = schedule.alpha(mid) > a  # still too clean: t must grow
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def selected_logits(logits: torch.Tensor, where: torch.Tensor, exclude: int | None = None):
    """(float32 [N, V] logits of the positions where `where` is True, their (row, col) indices).
    Only the selected rows are upcast, so the [B, L, V] logits are never copied to float32 whole.
    exclude: a token id whose logit is set to -inf (SUBS: the denoiser never predicts [MASK])."""
    rows = where.nonzero(as_tuple=True)
    sel = logits[rows].float()  # a fresh tensor (advanced indexing): safe to edit in place
    if exclude is not None:
        sel[:, exclude] = float("-inf")
    return sel, rows


def _masked_ce_per_sequence(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor,
                            exclude: int | None = None) -> torch.Tensor:
    """Sum over positions with where=True of -log softmax(logits)[target], per sequence, float32
    (`exclude`: see selected_logits)."""
    sel, rows = selected_logits(logits, where, exclude)
    ce = F.cross_entropy(sel, targets[rows], reduction="none")
    return torch.zeros(targets.shape[0], dtype=torch.float32, device=logits.device).index_add_(0, rows[0], ce)


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """MDLM's SUBS parameterisation (arXiv 2406.07524 sec. 3.2.3; `_subs_parameterization` in
    kuleshov-group/mdlm `diffusion.py`), dense, float32 [..., V] log-probabilities of x_0:
    - zero masking probabilities: log p([MASK]) = -inf, the rest renormalised;
    - carry-over unmasking: where x_t is not [MASK], p is the point mass on x_t.
    The objectives and samplers apply the same two rules without building this tensor: the loss
    is taken on masked positions only (carry-over makes every other term -log 1 = 0) with the
    [MASK] logit removed, and samplers never draw [MASK] and never change a committed token.
    Reference and inspection helper (tests compare the losses against it)."""
    logp = logits.float().clone()
    logp[..., mask_id] = float("-inf")
    logp = logp.log_softmax(dim=-1)
    keep = x_t != mask_id
    carried = torch.full_like(logp, float("-inf")).scatter_(-1, x_t.unsqueeze(-1), 0.0)
    return torch.where(keep.unsqueeze(-1), carried, logp)


def subs_exclude(parameterization: str, mask_id: int) -> int | None:
    """The token id whose logit the cross-entropy drops: mask_id under `subs`, none under `plain`."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected {' or '.join(PARAMETERIZATIONS)}")
    return mask_id if parameterization == "subs" else None


class MaskedDiffusionObjective:
    def __init__(
        self,
        schedule: Schedule,
        sampler: TimeSampler,
        mask_id: int,
        weighting: str = "elbo",
        masking=None,
        eval_t_samples: int = 8,
        loss_buckets: int = 10,
        parameterization: str = "subs",
    ):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        self.schedule, self.sampler, self.mask_id = schedule, sampler, mask_id
        self.weighting = weighting
        self.exclude = subs_exclude(parameterization, mask_id)
        self.masking = masking or UniformMasking()
        self.eval_t_samples = eval_t_samples
        self.loss_buckets = loss_buckets
        self.eps = sampler.eps

    def sequence_weight(self, t: torch.Tensor) -> torch.Tensor:
        """float64 [B]: w(t)/q(t) for `elbo`, w(t) for `reweighted` (times u(t)/q(t) for a sampler
        with `reweighted_correction`, the adaptive one: its moving q must not reshape the objective)."""
        w = self.schedule.weight(t)
        if self.weighting == "elbo":
            return w / self.sampler.pdf(t)
        correction = getattr(self.sampler, "reweighted_correction", None)
        return w if correction is None else w * correction(t)

    def training_loss(self, model, batch: dict, rng: StepRNG) -> tuple[torch.Tensor, LossStats]:
        """batch: input_ids Long[B, L], loss_mask Bool[B, L] (True = real token), optionally
        prompt_mask Bool[B, L] (module docstring) and token_info {name: [B, L] tensor} passed through
        to the masking policy."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        target = targets_of(batch)
        device, B = input_ids.device, input_ids.shape[0]
        t = self.sampler.sample(B, rng)  # float64, CPU
        if getattr(self.masking, "expands", 1) == 2:
            return self._complementary_loss(model, batch, input_ids, real, target, t, rng, token_info_of(batch))
        masked = self.masking.mask(input_ids, target, self.schedule.alpha(t), rng, **token_info_of(batch))
        x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
        logits = model(x_t, t.to(device=device, dtype=torch.float32), key_padding_mask=real, **prompt_kwargs(batch))
        ce_seq = _masked_ce_per_sequence(logits, input_ids, masked, self.exclude)  # [B] float32
        weighted = self.sequence_weight(t).to(device=device, dtype=torch.float32) * ce_seq
        n_real_seq = target.sum(dim=1)
        n_real = n_real_seq.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            per_token = (weighted / n_real_seq.clamp(min=1)).cpu().double()
            if hasattr(self.sampler, "observe"):  # the adaptive sampler learns q from the loss (adaptive_time.py)
                scored = (n_real_seq > 0).cpu()
                self.sampler.observe(t[scored], per_token[scored])
            stats = LossStats.of(loss, masked, n_real, t, per_token, self.loss_buckets)
        return loss, stats

    def pair_weights(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight of the reasoning row, weight of the syntax row, t_S), float64, for `complementary`
        (module docstring)."""
        alpha = self.schedule.alpha(t)
        t_s = inverse_alpha(self.schedule, 1.0 - alpha)
        if self.weighting == "elbo":
            q = self.sampler.pdf(t)
            return self.schedule.weight(t) / q, -self.schedule.dalpha(t) / (alpha.clamp(min=1e-12) * q), t_s
        return self.schedule.weight(t), self.schedule.weight(t_s.clamp(min=1e-6)), t_s

    def _complementary_loss(self, model, batch, input_ids, real, target, t, rng: StepRNG, info: dict):
        device = input_ids.device
        masked = self.masking.mask(input_ids, target, self.schedule.alpha(t), rng, **info)  # [2B, L]
        w_r, w_s, t_s = self.pair_weights(t)
        ids2 = input_ids.repeat_interleave(2, dim=0)
        real2 = real.repeat_interleave(2, dim=0)
        t2 = torch.stack([t, t_s], dim=1).flatten()  # row 2b: t, row 2b + 1: t_S
        x_t = torch.where(masked, torch.full_like(ids2, self.mask_id), ids2)
        logits = model(x_t, t2.to(device=device, dtype=torch.float32), key_padding_mask=real2,
                       **prompt_kwargs(batch, repeat=2))
        ce = _masked_ce_per_sequence(logits, ids2, masked, self.exclude)  # [2B]
        w2 = 0.5 * torch.stack([w_r, w_s], dim=1).flatten().to(device=device, dtype=torch.float32)
        weighted = w2 * ce
        n_real_seq = target.sum(dim=1)
        n_real = n_real_seq.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            per_token = (2.0 * weighted / n_real_seq.repeat_interleave(2).clamp(min=1)).cpu().double()
            # the masked fraction is the reasoning rows' (rate r)
            stats = LossStats.of(loss, masked[0::2], n_real, t2, per_token, self.loss_buckets)
        return loss, stats

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator: torch.Generator | SampleRNG) -> tuple[float, int]:
        """(sum over sequences of the per-sequence NELBO in nats, number of real tokens).

        Uniform t, stratified per sequence: t_bk = eps + (1 - eps)(u_b + k)/K, k < K, weighted by
        w(t)(1 - eps) = w(t)/q_uniform(t); averaged over the K draws. Unbiased for the NELBO on
        [eps, 1] whatever the training sampler was. With a prompt: the response tokens only. `generator`:
        per-sample draws (SampleRNG, what validation passes) or one generator for the batch."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        target = targets_of(batch)
        device, B, K = input_ids.device, input_ids.shape[0], self.eval_t_samples
        rng = eval_rng(generator)
        masking = UniformMasking()
        u = rng.rand(B)
        total = torch.zeros(B, dtype=torch.float64)
        for k in range(K):
            t = self.eps + (1.0 - self.eps) * (u + k) / K
            masked = masking.mask(input_ids, target, self.schedule.alpha(t), rng)
            x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
            logits = model(x_t, t.to(device=device, dtype=torch.float32), key_padding_mask=real,
                           **prompt_kwargs(batch))
            ce_seq = _masked_ce_per_sequence(logits, input_ids, masked, self.exclude).cpu().double()
            total += self.schedule.weight(t) * (1.0 - self.eps) * ce_seq
        return float(total.sum() / K), int(target.sum())


class AutoregressiveObjective:
    """Next-token cross-entropy on real targets: logits at position i predict token i + 1. With a
    prompt, only response targets are scored (the first is predicted from the separator)."""

    def __init__(self, loss_buckets: int = 10):
        self.loss_buckets = loss_buckets

    def _nll(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        logits = model(input_ids, None, key_padding_mask=real)
        targets, target_real = input_ids[:, 1:], targets_of(batch)[:, 1:]
        nll = _masked_ce_per_sequence(logits[:, :-1], targets, target_real).sum()
        return nll, target_real.sum()

    def training_loss(self, model, batch: dict, rng: StepRNG | None = None) -> tuple[torch.Tensor, LossStats]:
        nll, n = self._nll(model, batch)
        loss = nll / n.clamp(min=1)
        return loss, LossStats.unbucketed(loss, n, self.loss_buckets)

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator: torch.Generator | None = None) -> tuple[float, int]:
        nll, n = self._nll(model, batch)
        return float(nll), int(n)


def diffusion_kwargs(cfg: DiffusionConfig, mask_id: int) -> dict:
    """What every masked-diffusion objective is built from: schedule, time sampler, weighting, SUBS, eval draws."""
    return {
        "schedule": build_schedule(cfg.schedule),
        "sampler": time_sampler_from_config(cfg),
        "mask_id": mask_id,
        "weighting": cfg.weighting,
        "eval_t_samples": cfg.eval_t_samples,
        "loss_buckets": cfg.loss_buckets,
        "parameterization": cfg.parameterization,
    }
