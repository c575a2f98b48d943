"""Blockwise reverse-order training (seed 003): the forward process masks blocks last-first.

Seed 003 (Sun, Wen, Wang, "Why mask diffusion does not work", arXiv 2510.03289) argues that a mask
diffusion model predicts per-token *marginals*, that distant [MASK] predictions homogenise, and that
generation is in practice near left-to-right; its proposal, as the public summaries give it, is
"semi-autoregressive generation in small blocks with blockwise reverse-order training". The text of
the proposal was not available to us (only abstracts and summaries), so THE WHOLE CONSTRUCTION BELOW
IS OUR READING, AN ASSUMPTION:

- "reverse order" = the forward (noising) process destroys the sequence in the reverse of the
  order in which semi-AR decoding builds it: the last block is masked first, then the one before
  it, ...; inside the block being masked, tokens are masked at random (semi-AR decoding is
  diffusion inside a block). So every training input looks like a state a semi-AR sampler visits:
  clean earlier blocks, one partly masked block, fully masked later blocks.
- At masking rate r = 1 - alpha(t) with n target tokens in a row (its `loss_mask`), c = (1 - r) n
  tokens stay clean in expectation: the blocks before the one holding the c-th target token (the
  *active* block a) are clean, the blocks after it fully masked, and each target token of block a
  is masked independently with probability p_a = 1 - (c - before_a) / n_a (before_a: target
  tokens in earlier blocks, n_a: in block a). The expected masked fraction is exactly r for any
  block layout (n - before_a - n_a + p_a n_a = n - c).
- Blocks are absolute positions // block_size, the blocks of LLaDA's semi-AR sampler
  (`pretrain.sample`, `block_size`) and of the blockwise variants; the block size is the model's
  `model.block_size` (the mdm model's attention does not use it: it stays bidirectional).
- Loss: only the active block's masked tokens are scored (later blocks are masked input, not
  targets). The generative model is semi-AR: blocks left to right, any order inside a block, so
      -log p(x) <= sum_a NELBO_a,   NELBO_a = int_0^1 (1/p) E[ sum_{masked l in a} -log p(x_l | .) ] dp
  (MDLM's bound inside block a, later blocks all [MASK], earlier ones clean). t -> (a, p) maps
  [0, 1] onto every (block, rate) once, with |dp/dt| = n (-alpha'(t)) / n_a, so
      sum_a NELBO_a = E_{t ~ q}[ n (-alpha'(t)) / (n_a p_a q(t)) * CE(active block) ]   (`elbo`),
  and `reweighted` drops the 1/q(t) as everywhere else. With one block (model.block_size 0) this
  is exactly MDLM's uniform masking and weight w(t)/q(t); with block size 1 it is a left-to-right
  (AR-order) bound computed by a bidirectional model.
- Evaluation reports this bound (its own generative model's, as Jigsaw does), with uniform t
  stratified K times per sequence from the caller's generator; so its val/nll is the semi-AR
  bound, not the random-order MDM NELBO of the other mdm runs.
"""

from __future__ import annotations

import torch

from pretrain.diffusion.blockwise import _masked_ce_per_token
from pretrain.diffusion.masking import MaskingSpec, register_masking
from pretrain.diffusion.objective import LossStats, MaskedDiffusionObjective, prompt_kwargs, targets_of
from pretrain.diffusion.rng import StepRNG, eval_rng
from pretrain.model import unwrap


class ReverseOrderMasking:
    """Blocks masked last-first, random inside the boundary block (module docstring).
    `block_size` 0 = the whole row is one block."""

    name = "reverse_order"
    expands = 1

    def __init__(self, block_size: int = 0):
        if block_size < 0:
            raise ValueError(f"block_size must be >= 0 (0 = one block), got {block_size}")
        self.block_size = int(block_size)

    def plan(self, loss_mask: torch.Tensor, alpha_t: torch.Tensor, rng: StepRNG) -> dict[str, torch.Tensor]:
        """CPU tensors: masked Bool[B, L], active Bool[B, L] (target tokens of the active block),
        p float64[B] (the active block's masking probability), n_active / n Long[B]."""
        real = loss_mask.detach().to("cpu").bool()
        B, L = real.shape
        u = rng.rand(B, L)  # drawn first, one per position: the same draws on any layout
        alpha = alpha_t.detach().to(device="cpu", dtype=torch.float64)
        if alpha.dim() != 1 or alpha.shape[0] != B:
            raise ValueError(f"reverse_order masking takes one t per sequence (alpha_t [B]); got {tuple(alpha.shape)}")
        bs = self.block_size or L
        blk = (torch.arange(L) // bs)[None, :].expand(B, L)
        n = real.sum(1)
        rank = real.long().cumsum(1) - 1  # 0-based rank among the row's target tokens
        c = alpha.clamp(0.0, 1.0) * n.double()  # expected clean targets: the first c ones
        idx = torch.floor(c).long().clamp(max=(n - 1).clamp(min=0))
        at = real & (rank == idx[:, None])
        pos_a = at.float().argmax(1)
        a = torch.where(n > 0, pos_a // bs, torch.full_like(pos_a, -1))
        in_a = real & (blk == a[:, None])
        before = (real & (blk < a[:, None])).sum(1)
        n_a = in_a.sum(1)
        p = (1.0 - (c - before.double()) / n_a.clamp(min=1).double()).clamp(0.0, 1.0)
        p = torch.where(n > 0, p, torch.zeros_like(p))
        masked = (real & (blk > a[:, None])) | (in_a & (u < p[:, None]))
        return {"masked": masked, "active": in_a, "p": p, "n_active": n_a, "n": n}

    def mask(self, input_ids, loss_mask, alpha_t, rng: StepRNG, **token_info) -> torch.Tensor:
        return self.plan(loss_mask, alpha_t, rng)["masked"].to(input_ids.device)


class ReverseOrderObjective(MaskedDiffusionObjective):
    """The semi-AR bound of the module docstring, trained with reverse-order masking.

    The block size is read from the model (`model.block_len(L)`), as the blockwise objectives do."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("masking", None)
        super().__init__(*args, masking=ReverseOrderMasking(0), **kwargs)

    def _masking_for(self, model, L: int) -> ReverseOrderMasking:
        bl = unwrap(model).block_len(L)
        return ReverseOrderMasking(0 if bl >= L else bl)

    def plan_weight(self, t: torch.Tensor, plan: dict, importance: bool | None = None) -> torch.Tensor:
        """float64 [B]: n (-alpha'(t)) / (n_a p_a q(t)) (`elbo`) or without 1/q(t) (`reweighted`;
        `importance` overrides the choice); 0 for rows without target tokens."""
        ratio = plan["n"].double() / plan["n_active"].clamp(min=1).double()
        w = ratio * (-self.schedule.dalpha(t)) / plan["p"].clamp(min=1e-12)
        if (self.weighting == "elbo") if importance is None else importance:
            w = w / self.sampler.pdf(t)
        return torch.where(plan["n_active"] > 0, w, torch.zeros_like(w))

    def _pass(self, model, batch, t, rng: StepRNG, importance: bool | None = None):
        """(weighted active-block CE per sequence [B], masked, scored) for times t [B]. With a prompt
        (task data) only the response's tokens are planned, masked and scored; the prompt stays clean."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        device, L = input_ids.device, input_ids.shape[1]
        plan = self._masking_for(model, L).plan(targets_of(batch), self.schedule.alpha(t), rng)
        masked = plan["masked"].to(device)
        scored = masked & plan["active"].to(device)
        x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
        logits = model(x_t, t.to(device=device, dtype=torch.float32), key_padding_mask=real, **prompt_kwargs(batch))
        ce = _masked_ce_per_token(logits, input_ids, scored, self.exclude).sum(dim=1)  # [B] float32 (SUBS)
        w = self.plan_weight(t, plan, importance).to(device=device, dtype=torch.float32)
        return w * ce, masked, scored

    def training_loss(self, model, batch: dict, rng: StepRNG) -> tuple[torch.Tensor, LossStats]:
        input_ids, target = batch["input_ids"], targets_of(batch)
        t = self.sampler.sample(input_ids.shape[0], rng)  # float64, CPU
        weighted, masked, _ = self._pass(model, batch, t, rng)
        n_real_seq = target.sum(dim=1)
        n_real = n_real_seq.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            per_token = (weighted.detach() / n_real_seq.clamp(min=1)).cpu().double()
            stats = LossStats.of(loss, masked, n_real, t, per_token, self.loss_buckets, keep=n_real_seq.cpu() > 0)
        return loss, stats

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator) -> tuple[float, int]:
        """(sum over sequences of the semi-AR bound in nats, target tokens): uniform t stratified,
        t_bk = eps + (1 - eps)(u_b + k)/K, weight with q = 1/(1 - eps); whatever trained it."""
        input_ids, target = batch["input_ids"], targets_of(batch)
        B, K = input_ids.shape[0], self.eval_t_samples
        rng = eval_rng(generator)  # per-sample draws under validation: the same number on any layout
        u = rng.rand(B)
        total = torch.zeros(B, dtype=torch.float64)
        for k in range(K):
            t = self.eps + (1.0 - self.eps) * (u + k) / K
            weighted, _, _ = self._pass(model, batch, t, rng, importance=False)
            total += weighted.cpu().double() * (1.0 - self.eps)  # / q_uniform(t)
        return float(total.sum() / K), int(target.sum())


# `diffusion.masking: reverse_order`: the policy changes the loss too, so it brings its objective
# (which variants may use it: pretrain/variants.py, mdm only)
register_masking(MaskingSpec("reverse_order", lambda cfg: ReverseOrderMasking(0), objective=ReverseOrderObjective))
