"""Losses for the blockwise variants: block diffusion (BD3-LM) and Jigsaw; Scatter needs none of its own.

All three split the sequence into contiguous blocks of B = model.block_len(L) tokens (config
`model.block_size`, 0 = one block); the objective reads B from the model, so the trainer's
`build_objective(cfg.diffusion, variant, mask_id)` call is the same for every variant.

block (BD3-LM, Arriola et al., arXiv 2503.09573)
    Blocks are generated left to right; inside a block, masked diffusion conditioned on the clean
    earlier blocks. NELBO = sum over blocks b of the MDLM NELBO of block b given x_0^{<b}:
        sum_b  integral w(t_b) E[ sum_{masked l in b} -log p(x_l | x_t^b, x_0^{<b}) ] dt_b.
    One t per (sequence, block), drawn together as B_batch * n_blocks draws of the time sampler, so
    `antithetic` stratifies over batch x blocks (over the global batch across data-parallel ranks),
    as BD3-LM does (`_sample_t` with n * num_blocks strata). Each block's term is importance
    weighted by w(t_b)/q(t_b) (`elbo`) or w(t_b) (`reweighted`), exactly as for `mdm`. All blocks are
    trained in one pass over [x_t | x_0] (2L tokens) with BD3-LM's mask (attention_masks.py); the
    model returns logits for the x_t half. Not done here: BD3-LM's clipped noise schedule search
    ("data-driven noise schedules", a variance-reduction schedule choice; `diffusion.eps` is the
    lower clip). With time conditioning the model gets the mean t of a sequence's blocks (adaLN
    is per sequence); BD3-LM itself trains without time conditioning.
    Evaluation: per-block t, stratified K draws per block from the caller's fixed generator,
    uniform q: an unbiased estimate of the block NELBO on [eps, 1].

jigsaw (seed 000: Wang et al., "On the Trainability of Masked Diffusion Language Models via Blockwise
Locality", arXiv 2604.24832, https://arxiv.org/html/2604.24832v1: Jigsaw and Scatter "inject
left-to-right inductive bias by enforcing autoregressive locality within blocks while preserving
iterative refinement at the block level". The stored copy of the paper holds the abstract only; the
definitions come from the authors' code, github.com/stein-wang0226/trainable-masked-diffusion,
`src/models_prompt_respond.py`, whose README maps `BAD-AR` to the paper's Jigsaw and `BOP-AR` to
Scatter.) `BADARPromptRespond` ("Block-level Autoregressive Diffusion"), its docstring translated:
    "Inter-block: diffusion logic - the response is split into blocks and some blocks are masked;
    different masked blocks cannot see each other. Intra-block: AR logic - strict causality inside
    each block. Every block sees the prompt and the unmasked (visible) blocks." Their corruption:
    per sequence, mask m = ceil(n_blocks * t) (clamped to [1, n_blocks]) blocks chosen uniformly at
    random, whole blocks at once. Inference picks the lowest-entropy block (a probing forward),
    generates it left to right and commits it.
    What is ours:
    - Corruption: m = ceil(n * (1 - alpha(t))) clamped to [1, n], t from the time sampler (so
      `linear` reproduces theirs), then a uniformly random set of m blocks.
    - Left-to-right inside a masked block is teacher-forced with a clean copy (the two-stream
      [x_t | x_0] pass, as for `block`): in their regression task a masked block still holds its
      clean x inputs, but in a token sequence a masked block holds only mask tokens, so a causal
      mask over a single stream would give the model nothing to condition on inside the block.
      x_t token i (masked block b) sees the revealed blocks, itself (a mask token: its position)
      and x_0 tokens j < i of block b.
    - The objective is an exact likelihood bound. Jigsaw's generative model is a block-level
      any-order autoregressive model (blocks in a random order, each block left to right given
      the committed ones), whose ELBO (Uria et al. 2014; Hoogeboom et al. ARDM 2022) is
          -log p(x) <= E_{m ~ U{1..n}} E_{|S| = m} [ (n / m) sum_{b in S} -log p(x_b | x_{not S}) ],
      with -log p(x_b | .) = sum_{i in b} -log p(x_i | x_{b,<i}, x_{not S}), the per-token CE above.
      `elbo` importance-weights the drawn m: 1 / (m P_q(m)), where P_q(m) is the exact probability
      that the sampler's t maps to m (computed from q's CDF); `reweighted` uses n / m, the weight of
      the uniform-m bound, so q reshapes which masking levels are emphasised. The losses'
      normalisation (per real token) is the one `mdm` uses.
    - Evaluation: m stratified uniformly over {1..n} (K draws per sequence, fixed generator),
      weight n / m: unbiased for the bound above, whatever the training sampler and whatever order
      a sampler later uses. With one block (block_size 0) m = 1 and it is the exact AR NLL.
    - Time conditioning sees m / n (the masked fraction), in training and evaluation alike.

scatter (seed 000, `BOPARPromptRespond`, "BOP-AR (ScatDiff): Block-Offset Parallel Autoregressive",
named the paper's Scatter) needs no objective of its own: their training is the MDM one (uniform
random masking at rate t, loss on masked tokens weighted as MDLM) with the offset-causal mask
("Query i can see Key j if (j % block) <= (i % block)"). A denoiser that looks at part of x_t is
still a function of x_t, so the MDLM NELBO stays a valid bound: `MaskedDiffusionObjective` is used
as is, and its eval NLL is the NELBO of the random-order reverse process with that denoiser
(their layer-by-layer offset sampler is a different generative process; it is not evaluated here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.diffusion.masking import UniformMasking
from pretrain.diffusion.objective import MaskedDiffusionObjective, _masked_ce_per_sequence, token_info_of
from pretrain.diffusion.rng import SampleRNG, StepRNG, eval_rng
from pretrain.diffusion.schedules import Schedule
from pretrain.diffusion.time_samplers import TimeSampler


def _unwrap(model):
    return getattr(model, "module", model)  # DDP / DeepSpeed engines keep the model in .module


def _masked_ce_per_token(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """float32 [B, L]: -log softmax(logits)[target] where `where`, 0 elsewhere (only the selected
    rows are upcast to float32)."""
    rows = where.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows].float(), targets[rows], reduction="none")
    return torch.zeros(targets.shape, dtype=torch.float32, device=logits.device).index_put_(rows, ce)


def _bucket_stats(t: torch.Tensor, per_token: torch.Tensor, keep: torch.Tensor, buckets: int) -> dict:
    """Loss by t bucket over the entries where keep is True (t, per_token float64 CPU)."""
    t, per_token = t[keep], per_token[keep]
    bucket = (t * buckets).long().clamp(0, buckets - 1)
    return {
        "t_bucket_loss_sum": torch.zeros(buckets, dtype=torch.float64).index_add_(0, bucket, per_token),
        "t_bucket_count": torch.bincount(bucket, minlength=buckets),
    }


def _loss_stats(loss, masked, n_real, t, per_token, valid, buckets: int) -> dict:
    """The trainer's per-step statistics: loss, masked fraction, token count, loss by t bucket."""
    return {
        "loss": float(loss.detach()),
        "masked_fraction": float(masked.sum() / n_real),
        "n_tokens": int(n_real),
        **_bucket_stats(t, per_token, valid, buckets),
    }


class BlockDiffusionObjective(MaskedDiffusionObjective):
    """BD3-LM's block-diffusion NELBO, one t per (sequence, block); see the module docstring."""

    def _blocks(self, model, L: int) -> tuple[int, int]:
        bl = _unwrap(model).block_len(L)
        return bl, L // bl

    def training_loss(self, model, batch: dict, rng: StepRNG) -> tuple[torch.Tensor, dict]:
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        device, (B, L) = input_ids.device, input_ids.shape
        bl, nb = self._blocks(model, L)
        t = self.sampler.sample(B * nb, rng).view(B, nb)  # float64, CPU; stratified over batch x blocks
        t_tok = t.repeat_interleave(bl, dim=1)  # [B, L]
        if getattr(self.masking, "expands", 1) != 1:
            raise ValueError(f"masking {self.masking.name!r} is not available for block diffusion yet "
                             "(use uniform or density_priority, or model.variant=mdm)")
        masked = self.masking.mask(input_ids, real, self.schedule.alpha(t_tok), rng, **token_info_of(batch))
        x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
        logits = model(x_t, t.mean(dim=1).to(device=device, dtype=torch.float32), key_padding_mask=real, x0=input_ids)
        ce = _masked_ce_per_token(logits, input_ids, masked)  # [B, L]
        w = self.sequence_weight(t).to(device=device, dtype=torch.float32)  # [B, nb]
        weighted = w * ce.view(B, nb, bl).sum(dim=2)  # [B, nb]
        n_real = real.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            n_real_blk = real.view(B, nb, bl).sum(dim=2).cpu()
            per_token = weighted.detach().cpu().double() / n_real_blk.clamp(min=1)
            stats = _loss_stats(loss, masked, n_real, t, per_token, n_real_blk > 0, self.loss_buckets)
        return loss, stats

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator: torch.Generator | SampleRNG) -> tuple[float, int]:
        """(sum of per-sequence block NELBOs in nats, real tokens). Per-block t stratified:
        t_bjk = eps + (1 - eps)(u_bj + k)/K, weighted by w(t)(1 - eps) = w(t)/q_uniform(t)."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        device, (B, L), K = input_ids.device, input_ids.shape, self.eval_t_samples
        bl, nb = self._blocks(model, L)
        rng = eval_rng(generator)
        masking = UniformMasking()
        u = rng.rand(B, nb)
        total = torch.zeros(B, dtype=torch.float64)
        for k in range(K):
            t = self.eps + (1.0 - self.eps) * (u + k) / K
            t_tok = t.repeat_interleave(bl, dim=1)
            masked = masking.mask(input_ids, real, self.schedule.alpha(t_tok), rng)
            x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
            logits = model(x_t, t.mean(dim=1).to(device=device, dtype=torch.float32), key_padding_mask=real,
                           x0=input_ids)
            ce = _masked_ce_per_token(logits, input_ids, masked).cpu().double()
            total += (self.schedule.weight(t_tok) * (1.0 - self.eps) * ce).sum(dim=1)
        return float(total.sum() / K), int(real.sum())


class JigsawObjective:
    """Seed 000's Jigsaw: whole blocks masked, left to right inside a block, masked blocks mutually
    invisible; a block-level any-order-AR ELBO (module docstring)."""

    def __init__(
        self,
        schedule: Schedule,
        sampler: TimeSampler,
        mask_id: int,
        weighting: str = "elbo",
        eval_t_samples: int = 8,
        loss_buckets: int = 10,
    ):
        if weighting not in ("elbo", "reweighted"):
            raise ValueError(f"unknown weighting {weighting!r}; expected elbo or reweighted")
        self.schedule, self.sampler, self.mask_id = schedule, sampler, mask_id
        self.weighting = weighting
        self.eval_t_samples = eval_t_samples
        self.loss_buckets = loss_buckets
        self.eps = sampler.eps
        self._count_probs: dict[int, torch.Tensor] = {}

    def masked_block_count(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """m = ceil(n (1 - alpha(t))) clamped to [1, n]: how many of n blocks are masked at t."""
        rate = 1.0 - self.schedule.alpha(t)
        return torch.ceil(n * rate - 1e-9).long().clamp(1, n)

    def count_probabilities(self, n: int) -> torch.Tensor:
        """float64 [n]: P_q(m = k), k = 1..n, under the time sampler. m = k exactly when
        tau_{k-1} < t <= tau_k with 1 - alpha(tau_k) = k / n (tau by bisection; the rate increases
        with t), so P(k) = cdf(tau_k) - cdf(tau_{k-1}), tau_0 = 0, tau_n = 1. Cached per n."""
        if n in self._count_probs:
            return self._count_probs[n]
        target = torch.arange(1, n, dtype=torch.float64) / n
        lo, hi = torch.zeros(n - 1, dtype=torch.float64), torch.ones(n - 1, dtype=torch.float64)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = (1.0 - self.schedule.alpha(mid)) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        tau = torch.cat([torch.zeros(1, dtype=torch.float64), hi, torch.ones(1, dtype=torch.float64)])
        cdf = self.sampler.cdf(tau)
        cdf[0], cdf[-1] = 0.0, 1.0
        self._count_probs[n] = (cdf[1:] - cdf[:-1]).clamp(min=0.0)
        return self._count_probs[n]

    def sequence_weight(self, m: torch.Tensor, n: int) -> torch.Tensor:
        """float64 [B]: 1 / (m P_q(m)) for `elbo`, n / m for `reweighted`."""
        if self.weighting == "elbo":
            return 1.0 / (m.double() * self.count_probabilities(n)[m - 1])
        return n / m.double()

    @staticmethod
    def choose_blocks(m: torch.Tensor, n: int, rng: StepRNG) -> torch.Tensor:
        """Bool[B, n]: a uniformly random set of m_b masked blocks per sequence (CPU draws)."""
        scores = rng.rand(m.shape[0], n)
        rank = scores.argsort(dim=1).argsort(dim=1)
        return rank < m[:, None]

    def _nll_per_sequence(self, model, batch: dict, masked_blocks: torch.Tensor, n: int):
        """(per-sequence sum of -log p over the masked blocks' real tokens [B] float32, token mask)."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        device, L = input_ids.device, input_ids.shape[1]
        bl = L // n
        masked_blocks = masked_blocks.to(device)
        masked = masked_blocks.repeat_interleave(bl, dim=1) & real
        x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
        frac = masked_blocks.float().mean(dim=1)  # what time conditioning sees: m / n
        logits = model(x_t, frac, key_padding_mask=real, x0=input_ids, revealed_blocks=~masked_blocks)
        return _masked_ce_per_sequence(logits, input_ids, masked), masked

    def training_loss(self, model, batch: dict, rng: StepRNG) -> tuple[torch.Tensor, dict]:
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        device, (B, L) = input_ids.device, input_ids.shape
        n = L // _unwrap(model).block_len(L)
        t = self.sampler.sample(B, rng)  # float64, CPU
        m = self.masked_block_count(t, n)
        masked_blocks = self.choose_blocks(m, n, rng)
        ce_seq, masked = self._nll_per_sequence(model, batch, masked_blocks, n)
        weighted = self.sequence_weight(m, n).to(device=device, dtype=torch.float32) * ce_seq
        n_real_seq = real.sum(dim=1)
        n_real = n_real_seq.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            per_token = (weighted / n_real_seq.clamp(min=1)).cpu().double()
            stats = _loss_stats(loss, masked, n_real, t, per_token, torch.ones(B, dtype=torch.bool),
                                self.loss_buckets)
        return loss, stats

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator: torch.Generator | SampleRNG) -> tuple[float, int]:
        """(sum of per-sequence bounds in nats, real tokens): m_k = floor(n (u + k) / K) + 1,
        k < K (stratified uniform on {1..n}), weight n / m; independent of the training sampler."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        (B, L), K = input_ids.shape, self.eval_t_samples
        n = L // _unwrap(model).block_len(L)
        rng = eval_rng(generator)
        u = rng.rand(B)
        total = torch.zeros(B, dtype=torch.float64)
        for k in range(K):
            m = (torch.floor(n * (u + k) / K).long() + 1).clamp(1, n)
            masked_blocks = self.choose_blocks(m, n, rng)
            ce_seq, _ = self._nll_per_sequence(model, batch, masked_blocks, n)
            total += (n / m.double()) * ce_seq.cpu().double()
        return float(total.sum() / K), int(real.sum())

