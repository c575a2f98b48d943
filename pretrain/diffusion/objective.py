"""Training losses and evaluation NLLs: masked diffusion (MDLM's continuous-time NELBO) and AR.

Masked diffusion, one training step (MDLM, arXiv 2406.07524, eq. 11):
    t_b ~ q (the time sampler)                  one t per sequence
    x_t = x with each real token masked w.p. 1 - alpha(t_b)
    loss = sum_b weight_b * sum_{masked l} -log p(x_l | x_t) / (number of real tokens)
with weight_b = w(t_b) / q(t_b) (`elbo`: unbiased per-token NELBO on [eps, 1]) or w(t_b)
(`reweighted`: the sampler reshapes the objective; see time_samplers.py). Cross-entropy is taken in
float32 on the masked real tokens only, whatever the autocast dtype of the logits.

Evaluation (`eval_nll`) is independent of the training sampler and weighting so that runs compare:
the `elbo` estimate under uniform t with `eval_t_samples` stratified draws per sequence and uniform
masking, from a caller-seeded generator (deterministic). The caller puts the model in eval mode.

Per-token NELBO counts every real token of a sequence; AR counts the L - 1 predicted tokens.

Masking policies (masking.py; seed 002) and what the training loss is for each (r = 1 - alpha(t)):
- uniform: the loss above, an unbiased estimate of the per-token NELBO (`elbo` weighting).
- density_priority: same formula and weights w(t)/q(t); the expected number of masked tokens is
  the schedule's, but the mask is not drawn from q(x_t | x_0), so the loss is a *training
  surrogate* (a density-reweighted NELBO), not an ELBO; it equals the NELBO estimate at strength 0.
- complementary: each sequence gives a reasoning row (mask R at rate r, time t) and a syntax row
  (mask S = complement, rate 1 - r). S's time is t_S = alpha^{-1}(1 - alpha(t)) (what time
  conditioning sees); t_S is a function of t ~ q, so its density is q(t) |dt/dt_S| and its
  importance weight is w(t_S) / q_S(t_S) = -alpha'(t) / (alpha(t) q(t)). The loss per sequence is
      0.5 * [ w(t)/q(t) * CE(R) + (-alpha'(t) / (alpha(t) q(t))) * CE(S) ]       (`elbo`)
      0.5 * [ w(t) * CE(R) + w(t_S) * CE(S) ]                                     (`reweighted`)
  normalised by the real tokens of the original sequences. At strength 0 (R uniform) both halves
  are unbiased NELBO estimates, so their mean is one too (complementary/antithetic masks, as in
  LLaDA's fine-tuning; the S half covers t_S in [alpha^{-1}(1 - alpha(eps)), alpha^{-1}(1 - alpha(1))],
  which differs from [eps, 1] only by eps-sized ends); at strength > 0 it is a surrogate.
  The pair costs two forward rows per sequence: the same data tokens, twice the compute.
Evaluation always uses uniform masking and the uniform-t NELBO (eval_nll), so runs stay comparable.
The objective reads `batch["density"]` (the stream's per-token density) into token_info itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.config import DiffusionConfig
from pretrain.diffusion.masking import UniformMasking, build_masking
from pretrain.diffusion.rng import SampleRNG, StepRNG, eval_rng
from pretrain.diffusion.schedules import Schedule, build_schedule
from pretrain.diffusion.time_samplers import TimeSampler, build_time_sampler


def token_info_of(batch: dict) -> dict:
    """The per-token side information for the masking policy: batch["token_info"] plus the
    stream's `density` column when the batch carries one."""
    info = dict(batch.get("token_info", {}))
    if "density" in batch and "density" not in info:
        info["density"] = batch["density"]
    return info


def inverse_alpha(schedule: Schedule, a: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """t with alpha(t) = a (float64), by bisection on [0, 1] (alpha decreases in t); clipped to the
    range alpha takes there."""
    lo, hi = torch.zeros_like(a, dtype=torch.float64), torch.ones_like(a, dtype=torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = schedule.alpha(mid) > a  # still too clean: t must grow
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def _masked_ce_per_sequence(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Sum over positions with where=True of -log softmax(logits)[target], per sequence, float32.
    Only the selected rows are upcast, so the [B, L, V] logits are never copied to float32 whole."""
    B = targets.shape[0]
    rows = where.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows].float(), targets[rows], reduction="none")
    return torch.zeros(B, dtype=torch.float32, device=logits.device).index_add_(0, rows[0], ce)


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
    ):
        if weighting not in ("elbo", "reweighted"):
            raise ValueError(f"unknown weighting {weighting!r}; expected elbo or reweighted")
        self.schedule, self.sampler, self.mask_id = schedule, sampler, mask_id
        self.weighting = weighting
        self.masking = masking or UniformMasking()
        self.eval_t_samples = eval_t_samples
        self.loss_buckets = loss_buckets
        self.eps = sampler.eps

    def sequence_weight(self, t: torch.Tensor) -> torch.Tensor:
        """float64 [B]: w(t)/q(t) for `elbo`, w(t) for `reweighted`."""
        w = self.schedule.weight(t)
        return w / self.sampler.pdf(t) if self.weighting == "elbo" else w

    def training_loss(self, model, batch: dict, rng: StepRNG) -> tuple[torch.Tensor, dict]:
        """batch: input_ids Long[B, L], loss_mask Bool[B, L] (True = real token), and optionally
        token_info {name: [B, L] tensor} passed through to the masking policy."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        device, B = input_ids.device, input_ids.shape[0]
        t = self.sampler.sample(B, rng)  # float64, CPU
        if getattr(self.masking, "expands", 1) == 2:
            return self._complementary_loss(model, input_ids, real, t, rng, token_info_of(batch))
        masked = self.masking.mask(input_ids, real, self.schedule.alpha(t), rng, **token_info_of(batch))
        x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
        logits = model(x_t, t.to(device=device, dtype=torch.float32), key_padding_mask=real)
        ce_seq = _masked_ce_per_sequence(logits, input_ids, masked)  # [B] float32
        weighted = self.sequence_weight(t).to(device=device, dtype=torch.float32) * ce_seq
        n_real_seq = real.sum(dim=1)
        n_real = n_real_seq.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            per_token = (weighted / n_real_seq.clamp(min=1)).cpu().double()
            bucket = (t * self.loss_buckets).long().clamp(0, self.loss_buckets - 1)
            stats = {
                "loss": float(loss.detach()),
                "masked_fraction": float(masked.sum() / n_real),
                "n_tokens": int(n_real),
                "t_bucket_loss_sum": torch.zeros(self.loss_buckets, dtype=torch.float64).index_add_(
                    0, bucket, per_token
                ),
                "t_bucket_count": torch.bincount(bucket, minlength=self.loss_buckets),
            }
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

    def _complementary_loss(self, model, input_ids, real, t, rng: StepRNG, info: dict):
        device = input_ids.device
        masked = self.masking.mask(input_ids, real, self.schedule.alpha(t), rng, **info)  # [2B, L]
        w_r, w_s, t_s = self.pair_weights(t)
        ids2 = input_ids.repeat_interleave(2, dim=0)
        real2 = real.repeat_interleave(2, dim=0)
        t2 = torch.stack([t, t_s], dim=1).flatten()  # row 2b: t, row 2b + 1: t_S
        x_t = torch.where(masked, torch.full_like(ids2, self.mask_id), ids2)
        logits = model(x_t, t2.to(device=device, dtype=torch.float32), key_padding_mask=real2)
        ce = _masked_ce_per_sequence(logits, ids2, masked)  # [2B]
        w2 = 0.5 * torch.stack([w_r, w_s], dim=1).flatten().to(device=device, dtype=torch.float32)
        weighted = w2 * ce
        n_real_seq = real.sum(dim=1)
        n_real = n_real_seq.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            per_token = (2.0 * weighted / n_real_seq.repeat_interleave(2).clamp(min=1)).cpu().double()
            bucket = (t2 * self.loss_buckets).long().clamp(0, self.loss_buckets - 1)
            stats = {
                "loss": float(loss.detach()),
                "masked_fraction": float(masked[0::2].sum() / n_real),  # the reasoning rows' (rate r)
                "n_tokens": int(n_real),
                "t_bucket_loss_sum": torch.zeros(self.loss_buckets, dtype=torch.float64).index_add_(
                    0, bucket, per_token
                ),
                "t_bucket_count": torch.bincount(bucket, minlength=self.loss_buckets),
            }
        return loss, stats

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator: torch.Generator | SampleRNG) -> tuple[float, int]:
        """(sum over sequences of the per-sequence NELBO in nats, number of real tokens).

        Uniform t, stratified per sequence: t_bk = eps + (1 - eps)(u_b + k)/K, k < K, weighted by
        w(t)(1 - eps) = w(t)/q_uniform(t); averaged over the K draws. Unbiased for the NELBO on
        [eps, 1] whatever the training sampler was. `generator`: per-sample draws (SampleRNG, what
        validation passes) or one generator for the batch."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        device, B, K = input_ids.device, input_ids.shape[0], self.eval_t_samples
        rng = eval_rng(generator)
        masking = UniformMasking()
        u = rng.rand(B)
        total = torch.zeros(B, dtype=torch.float64)
        for k in range(K):
            t = self.eps + (1.0 - self.eps) * (u + k) / K
            masked = masking.mask(input_ids, real, self.schedule.alpha(t), rng)
            x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
            logits = model(x_t, t.to(device=device, dtype=torch.float32), key_padding_mask=real)
            ce_seq = _masked_ce_per_sequence(logits, input_ids, masked).cpu().double()
            total += self.schedule.weight(t) * (1.0 - self.eps) * ce_seq
        return float(total.sum() / K), int(real.sum())


class AutoregressiveObjective:
    """Next-token cross-entropy on real targets: logits at position i predict token i + 1."""

    def __init__(self, loss_buckets: int = 10):
        self.loss_buckets = loss_buckets

    def _nll(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        logits = model(input_ids, None, key_padding_mask=real)
        targets, target_real = input_ids[:, 1:], real[:, 1:]
        nll = _masked_ce_per_sequence(logits[:, :-1], targets, target_real).sum()
        return nll, target_real.sum()

    def training_loss(self, model, batch: dict, rng: StepRNG | None = None) -> tuple[torch.Tensor, dict]:
        nll, n = self._nll(model, batch)
        loss = nll / n.clamp(min=1)
        stats = {
            "loss": float(loss.detach()),
            "masked_fraction": 0.0,
            "n_tokens": int(n),
            "t_bucket_loss_sum": torch.zeros(self.loss_buckets, dtype=torch.float64),
            "t_bucket_count": torch.zeros(self.loss_buckets, dtype=torch.long),
        }
        return loss, stats

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator: torch.Generator | None = None) -> tuple[float, int]:
        nll, n = self._nll(model, batch)
        return float(nll), int(n)


def build_objective(cfg: DiffusionConfig, variant: str, mask_id: int):
    """The objective of a model variant: AutoregressiveObjective (`ar`), MaskedDiffusionObjective
    (`mdm`, and `scatter`, whose difference is only its attention mask), BlockDiffusionObjective
    (`block`), JigsawObjective (`jigsaw`); see blockwise.py. Block sizes are read from the model."""
    from pretrain.diffusion.blockwise import BlockDiffusionObjective, JigsawObjective

    if variant == "ar":
        return AutoregressiveObjective(loss_buckets=cfg.loss_buckets)
    if variant == "jigsaw":
        return JigsawObjective(
            schedule=build_schedule(cfg.schedule),
            sampler=build_time_sampler(cfg.time_sampler, cfg.eps, cfg.bell),
            mask_id=mask_id,
            weighting=cfg.weighting,
            eval_t_samples=cfg.eval_t_samples,
            loss_buckets=cfg.loss_buckets,
        )
    if variant in ("mdm", "scatter", "block"):
        cls = BlockDiffusionObjective if variant == "block" else MaskedDiffusionObjective
        return cls(
            schedule=build_schedule(cfg.schedule),
            sampler=build_time_sampler(cfg.time_sampler, cfg.eps, cfg.bell),
            mask_id=mask_id,
            weighting=cfg.weighting,
            masking=build_masking(cfg.masking, cfg.density_strength),
            eval_t_samples=cfg.eval_t_samples,
            loss_buckets=cfg.loss_buckets,
        )
    raise ValueError(f"no objective for model variant {variant!r}; expected ar, mdm, block, jigsaw or scatter")
