"""Losses for the blockwise variants: block diffusion (BD3-LM) and Jigsaw; Scatter needs none of its own.

All three split the sequence into contiguous blocks of B = model.block_len(L) tokens (config
`model.block_size`, 0 = one block); the objective reads B from the model, so the trainer's
`build_objective(cfg.diffusion, variant, mask_id)` call (pretrain/variants.py, the variant table) is
the same for every variant (plus `jigsaw_streams`). With a prompt (task data, `prompt_mask`; objective.py) every objective leaves
the prompt clean and scores the response only; `block` keeps absolute blocks (the prompt's tokens
in a block are simply never noised), jigsaw and scatter count blocks from the response start.

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
    lower clip; `diffusion.t_min`/`t_max` clip the time range). With time conditioning the model gets
    the mean t of a sequence's blocks (adaLN is per sequence); BD3-LM itself trains without time
    conditioning. Masking policies: all three (masking.py); `complementary` gives each sequence a
    logical and a syntactic row, per block at t_bj and its complementary time (`_complementary_block_loss`).
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
    Their mask (`_create_bad_ar_attention_bias`): key j is visible to query i iff j is in the prompt,
    or j is in an unmasked (visible) block, or i and j are in the same masked block and j <= i.
    Prompt and blocks: with task data (`prompt_mask`) the prompt is never masked nor scored and the
    response is cut into blocks from the response start (as theirs: blocks of the response);
    n = ceil((L - s) / B) response blocks per row (rows may differ). Without a prompt, n = L / B.

    Single stream (default, `model.jigsaw_streams: 1`, the authors' form): a masked block holds
    only mask tokens (no clean copy); the mask above is applied as is (attention_masks.jigsaw_mask).
    Position i of a masked block b is then predicted from the prompt, the visible blocks and the
    block's earlier positions, which hold mask tokens only: the block's tokens are predicted
    *independently* given the context, q(x_b | x_C) = prod_{i in b} p(x_i | x_C, i). (In the
    authors' regression task a masked block still shows its clean x inputs, so their causal
    in-block mask carries information; over tokens it carries only positions.)
    What the objective is, precisely: the generative model is a block-level any-order model (a
    uniformly random order of the response blocks; each block drawn at once from the product of
    its marginals given the prompt and the blocks before it). For it, by Jensen over orders and
    the any-order identity (Uria et al. 2014; Hoogeboom et al. ARDM 2022),
        -log p(x_resp | prompt) <= E_{m ~ U{1..n}} E_{|S| = m} [ (n / m) sum_{b in S} -log q(x_b | x_{not S}) ],
    with -log q(x_b | .) = sum_{i in b} -log p(x_i | x_{not S}, i), the per-token CE we compute. So
    the n/m-weighted loss is a valid upper bound on -log p for that product-of-marginals block
    model. It is not a bound for a left-to-right model inside the block (that model is the
    two-stream option), and not for the entropy-ordered sampler (an adaptive order is another
    generative process); at its optimum it still exceeds the data's NLL by the within-block total
    correlation, which no product of marginals can capture. Decoding (pretrain/sample.py) draws a
    block's tokens from one forward, matching this model.

    Two streams (`model.jigsaw_streams: 2`, ours): left to right inside a masked block is
    teacher-forced with a clean copy (the two-stream [x_t | x_0] pass, as for `block`): x_t token
    i (masked block b) sees the visible blocks and prompt, itself (a mask token: its position) and
    x_0 tokens j < i of block b, so q(x_b | x_C) = prod_{i in b} p(x_i | x_{b,<i}, x_C) and the
    same identity makes the loss an exact bound for the block-level any-order model whose blocks
    are generated left to right. Decoding: B + 1 forwards per block (one per position).

    What else is ours (both forms):
    - Corruption: m = ceil(n * (1 - alpha(t))) clamped to [1, n], t from the time sampler (so
      `linear` reproduces theirs), then a uniformly random set of m response blocks.
    - `elbo` importance-weights the drawn m: 1 / (m P_q(m)), where P_q(m) is the exact probability
      that the sampler's t maps to m (computed from q's CDF, per distinct n); `reweighted` uses
      n / m, the weight of the uniform-m bound, so q reshapes which masking levels are emphasised.
      The losses' normalisation (per response token) is the one `mdm` uses.
    - Evaluation: m stratified uniformly over {1..n} (K draws per sequence, fixed generator),
      weight n / m: unbiased for the bound above, whatever the training sampler. With one block
      (block_size 0) m = 1: two streams give the exact AR NLL, one stream the product of the
      per-position marginals given the prompt.
    - Time conditioning sees m / n (the masked fraction), in training and evaluation alike.

scatter (seed 000, `BOPARPromptRespond`, "BOP-AR (ScatDiff): Block-Offset Parallel Autoregressive",
named the paper's Scatter) needs no objective of its own: their training is the MDM one (uniform
random masking of the response at rate t, loss on masked tokens weighted as MDLM) with their mask
("Query i can see Key j if j is in the Prompt region, OR (j % block) <= (i % block)"; offsets from
the response start here, see attention_masks.py). A denoiser that looks at part of x_t is still a
function of x_t, so the MDLM NELBO stays a valid bound: `MaskedDiffusionObjective` is used as is,
and its eval NLL is the NELBO of the random-order reverse process with that denoiser. That process
is not what Scatter decodes with: a position revealed before its lower offsets would ignore tokens
already committed at higher offsets, so sampling is offset by offset only (pretrain/sample.py), a
different generative process whose likelihood is not evaluated here. (With one response block it is
sum_o -log p(x_o | prompt, x_{<o}, higher offsets masked): decoding's own NLL.) What the NELBO asks of
the denoiser at offset o: the number of lower offsets left visible is uniform on {0..o} (for the
log-linear schedule), so only 1/(o+1) of offset o's training signal is the all-lower-offsets-visible
case decoding uses, against all of AR's; with a prompt, higher offsets also reach o through the
prompt positions from the second layer on (attention_masks.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.diffusion.masking import UniformMasking
from pretrain.diffusion.objective import (
    LossStats,
    MaskedDiffusionObjective,
    _masked_ce_per_sequence,
    prompt_kwargs,
    selected_logits,
    subs_exclude,
    targets_of,
    token_info_of,
)
from pretrain.diffusion.rng import SampleRNG, StepRNG, eval_rng
from pretrain.diffusion.schedules import Schedule
from pretrain.diffusion.time_samplers import TimeSampler
from pretrain.model import unwrap
from pretrain.model.attention_masks import max_blocks, response_blocks, response_index


def _masked_ce_per_token(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor,
                         exclude: int | None = None) -> torch.Tensor:
    """float32 [B, L]: -log softmax(logits)[target] where `where`, 0 elsewhere (only the selected
    rows are upcast to float32; `exclude`: SUBS, see objective.selected_logits)."""
    sel, rows = selected_logits(logits, where, exclude)
    ce = F.cross_entropy(sel, targets[rows], reduction="none")
    return torch.zeros(targets.shape, dtype=torch.float32, device=logits.device).index_put_(rows, ce)


class BlockDiffusionObjective(MaskedDiffusionObjective):
    """BD3-LM's block-diffusion NELBO, one t per (sequence, block); see the module docstring."""

    def _blocks(self, model, L: int) -> tuple[int, int]:
        bl = unwrap(model).block_len(L)
        return bl, L // bl

    def training_loss(self, model, batch: dict, rng: StepRNG) -> tuple[torch.Tensor, LossStats]:
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        target = targets_of(batch)  # the prompt (if any) is never noised nor scored
        device, (B, L) = input_ids.device, input_ids.shape
        bl, nb = self._blocks(model, L)
        t = self.sampler.sample(B * nb, rng).view(B, nb)  # float64, CPU; stratified over batch x blocks
        t_tok = t.repeat_interleave(bl, dim=1)  # [B, L]
        if getattr(self.masking, "expands", 1) == 2:
            return self._complementary_block_loss(model, batch, input_ids, real, target, t, bl, rng,
                                                  token_info_of(batch))
        masked = self.masking.mask(input_ids, target, self.schedule.alpha(t_tok), rng, **token_info_of(batch))
        x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
        logits = model(x_t, t.mean(dim=1).to(device=device, dtype=torch.float32), key_padding_mask=real, x0=input_ids,
                       **prompt_kwargs(batch))
        ce = _masked_ce_per_token(logits, input_ids, masked, self.exclude)  # [B, L]
        w = self.sequence_weight(t).to(device=device, dtype=torch.float32)  # [B, nb]
        weighted = w * ce.view(B, nb, bl).sum(dim=2)  # [B, nb]
        n_real = target.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            n_real_blk = target.view(B, nb, bl).sum(dim=2).cpu()
            per_token = weighted.detach().cpu().double() / n_real_blk.clamp(min=1)
            stats = LossStats.of(loss, masked, n_real, t, per_token, self.loss_buckets, keep=n_real_blk > 0)
        return loss, stats

    def _complementary_block_loss(self, model, batch, input_ids, real, target, t, bl: int, rng: StepRNG, info: dict):
        """Complementary masking (seed 002) under block diffusion, t [B, nb] one time per (sequence,
        block). Rows 2b / 2b + 1 are the logical / syntactic samples of sequence b; in block j the
        logical row is masked at rate 1 - alpha(t_bj) and the syntactic row at alpha(t_bj), i.e. at
        time t_S = alpha^{-1}(1 - alpha(t_bj)). Each block is its own MDLM NELBO term (module
        docstring), so `pair_weights` (objective.py's derivation, applied per block) gives its pair of
        weights, and the loss is
            sum_{b, j} 0.5 [ w_R(t_bj) CE_R(b, j) + w_S(t_bj) CE_S(b, j) ] / (real tokens of the batch),
        exactly the mdm pair loss with the sequence replaced by the block (one block: the same loss).
        Time conditioning sees each row's mean block time (t for the logical row, t_S for the syntactic).
        With a prompt, only `target` (the response) is masked and counted."""
        device, (B, L) = input_ids.device, input_ids.shape
        nb = L // bl
        t_tok = t.repeat_interleave(bl, dim=1)  # [B, L]
        masked = self.masking.mask(input_ids, target, self.schedule.alpha(t_tok), rng, **info)  # [2B, L]
        w_r, w_s, t_s = self.pair_weights(t)  # each [B, nb]
        ids2, real2 = input_ids.repeat_interleave(2, dim=0), real.repeat_interleave(2, dim=0)
        t2 = torch.stack([t, t_s], dim=1).flatten(0, 1)  # [2B, nb]: row 2b t, row 2b + 1 t_S
        x_t = torch.where(masked, torch.full_like(ids2, self.mask_id), ids2)
        logits = model(x_t, t2.mean(dim=1).to(device=device, dtype=torch.float32), key_padding_mask=real2, x0=ids2,
                       **prompt_kwargs(batch, repeat=2))
        ce = _masked_ce_per_token(logits, ids2, masked, self.exclude)  # [2B, L]
        w2 = 0.5 * torch.stack([w_r, w_s], dim=1).flatten(0, 1).to(device=device, dtype=torch.float32)  # [2B, nb]
        weighted = w2 * ce.view(2 * B, nb, bl).sum(dim=2)  # [2B, nb]
        n_real = target.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            n_real_blk = target.repeat_interleave(2, dim=0).view(2 * B, nb, bl).sum(dim=2).cpu()
            per_token = 2.0 * weighted.detach().cpu().double() / n_real_blk.clamp(min=1)
            stats = LossStats.of(loss, masked[0::2], n_real, t2, per_token, self.loss_buckets, keep=n_real_blk > 0)
        return loss, stats

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator: torch.Generator | SampleRNG) -> tuple[float, int]:
        """(sum of per-sequence block NELBOs in nats, real tokens). Per-block t stratified:
        t_bjk = eps + (1 - eps)(u_bj + k)/K, weighted by w(t)(1 - eps) = w(t)/q_uniform(t).
        With a prompt: the response tokens only (the prompt stays clean)."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        target = targets_of(batch)
        device, (B, L), K = input_ids.device, input_ids.shape, self.eval_t_samples
        bl, nb = self._blocks(model, L)
        rng = eval_rng(generator)
        masking = UniformMasking()
        u = rng.rand(B, nb)
        total = torch.zeros(B, dtype=torch.float64)
        for k in range(K):
            t = self.eps + (1.0 - self.eps) * (u + k) / K
            t_tok = t.repeat_interleave(bl, dim=1)
            masked = masking.mask(input_ids, target, self.schedule.alpha(t_tok), rng)
            x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
            logits = model(x_t, t.mean(dim=1).to(device=device, dtype=torch.float32), key_padding_mask=real,
                           x0=input_ids, **prompt_kwargs(batch))
            ce = _masked_ce_per_token(logits, input_ids, masked, self.exclude).cpu().double()
            total += (self.schedule.weight(t_tok) * (1.0 - self.eps) * ce).sum(dim=1)
        return float(total.sum() / K), int(target.sum())


class JigsawObjective:
    """Seed 000's Jigsaw: whole response blocks masked, masked blocks mutually invisible; a
    block-level any-order-AR bound (module docstring). streams 1: the authors' single stream;
    streams 2: our teacher-forced two-stream pass."""

    def __init__(
        self,
        schedule: Schedule,
        sampler: TimeSampler,
        mask_id: int,
        weighting: str = "elbo",
        eval_t_samples: int = 8,
        loss_buckets: int = 10,
        parameterization: str = "subs",
        streams: int = 1,
    ):
        if weighting not in ("elbo", "reweighted"):
            raise ValueError(f"unknown weighting {weighting!r}; expected elbo or reweighted")
        if streams not in (1, 2):
            raise ValueError(f"jigsaw streams must be 1 or 2 (model.jigsaw_streams), got {streams!r}")
        self.schedule, self.sampler, self.mask_id = schedule, sampler, mask_id
        self.weighting = weighting
        self.exclude = subs_exclude(parameterization, mask_id)
        self.eval_t_samples = eval_t_samples
        self.loss_buckets = loss_buckets
        self.streams = streams
        self.eps = sampler.eps
        self._count_probs: dict[int, torch.Tensor] = {}

    def masked_block_count(self, t: torch.Tensor, n) -> torch.Tensor:
        """m = ceil(n (1 - alpha(t))) clamped to [1, n]: how many of n blocks are masked at t
        (n: an int, or Long[B] when the rows have different numbers of response blocks)."""
        rate = 1.0 - self.schedule.alpha(t)
        n = torch.as_tensor(n, dtype=torch.long)
        m = torch.ceil(n * rate - 1e-9).long()
        return torch.minimum(torch.maximum(m, torch.ones_like(m)), n.expand_as(m))

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

    def sequence_weight(self, m: torch.Tensor, n) -> torch.Tensor:
        """float64 [B]: 1 / (m P_q(m)) for `elbo`, n / m for `reweighted` (n: int or Long[B])."""
        n = torch.as_tensor(n, dtype=torch.long).expand_as(m)
        if self.weighting == "elbo":
            p = torch.empty(m.shape, dtype=torch.float64)
            for k in n.unique().tolist():
                rows = n == k
                p[rows] = self.count_probabilities(int(k))[m[rows] - 1]
            return 1.0 / (m.double() * p)
        return n.double() / m.double()

    @staticmethod
    def choose_blocks(m: torch.Tensor, n, rng: StepRNG, columns: int | None = None) -> torch.Tensor:
        """Bool[B, columns]: a uniformly random set of m_b of the first n_b blocks per sequence (CPU
        draws; columns defaults to n). Blocks at or past n_b (rows with fewer response blocks) are
        never chosen."""
        n = torch.as_tensor(n, dtype=torch.long).expand_as(m)
        columns = int(n.max()) if columns is None else columns
        scores = rng.rand(m.shape[0], columns)
        scores = scores.masked_fill(torch.arange(columns)[None, :] >= n[:, None], 2.0)  # ranked last
        rank = scores.argsort(dim=1).argsort(dim=1)
        return rank < m[:, None]

    def _nll_per_sequence(self, model, batch: dict, masked_blocks: torch.Tensor, n_blocks: torch.Tensor):
        """(per-sequence sum of -log p over the masked blocks' response tokens [B] float32, token mask)."""
        input_ids, real = batch["input_ids"], batch["loss_mask"].bool()
        device, L = input_ids.device, input_ids.shape[1]
        prompt = batch.get("prompt_mask")
        masked_blocks = masked_blocks.to(device)
        blk, _ = response_index(prompt, L, self._bl, device)
        blk = blk.expand(input_ids.shape[0], -1)
        masked = (blk >= 0) & masked_blocks.gather(1, blk.clamp(min=0)) & targets_of(batch)
        x_t = torch.where(masked, torch.full_like(input_ids, self.mask_id), input_ids)
        # what time conditioning sees: m / n, the masked fraction of the response blocks
        frac = (masked_blocks.float().sum(dim=1) / n_blocks.to(device).float()).float()
        two = {"x0": input_ids} if self.streams == 2 else {}
        logits = model(x_t, frac, key_padding_mask=real, revealed_blocks=~masked_blocks, **two,
                       **prompt_kwargs(batch))
        return _masked_ce_per_sequence(logits, input_ids, masked, self.exclude), masked

    def _geometry(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        """(response blocks per row Long[B] CPU, columns of the block tensors); sets self._bl."""
        input_ids = batch["input_ids"]
        B, L = input_ids.shape
        self._bl = unwrap(model).block_len(L)
        return response_blocks(batch.get("prompt_mask"), B, L, self._bl), max_blocks(L, self._bl)

    def training_loss(self, model, batch: dict, rng: StepRNG) -> tuple[torch.Tensor, LossStats]:
        input_ids = batch["input_ids"]
        target = targets_of(batch)
        device, B = input_ids.device, input_ids.shape[0]
        n, columns = self._geometry(model, batch)
        t = self.sampler.sample(B, rng)  # float64, CPU
        m = self.masked_block_count(t, n)
        masked_blocks = self.choose_blocks(m, n, rng, columns)
        ce_seq, masked = self._nll_per_sequence(model, batch, masked_blocks, n)
        weighted = self.sequence_weight(m, n).to(device=device, dtype=torch.float32) * ce_seq
        n_real_seq = target.sum(dim=1)
        n_real = n_real_seq.sum().clamp(min=1)
        loss = weighted.sum() / n_real
        with torch.no_grad():
            per_token = (weighted / n_real_seq.clamp(min=1)).cpu().double()
            stats = LossStats.of(loss, masked, n_real, t, per_token, self.loss_buckets)
        return loss, stats

    @torch.no_grad()
    def eval_nll(self, model, batch: dict, generator: torch.Generator | SampleRNG) -> tuple[float, int]:
        """(sum of per-sequence bounds in nats, response tokens): m_k = floor(n (u + k) / K) + 1,
        k < K (stratified uniform on {1..n}), weight n / m; independent of the training sampler."""
        input_ids, K = batch["input_ids"], self.eval_t_samples
        B = input_ids.shape[0]
        n, columns = self._geometry(model, batch)
        rng = eval_rng(generator)
        u = rng.rand(B)
        total = torch.zeros(B, dtype=torch.float64)
        for k in range(K):
            m = torch.minimum((torch.floor(n * (u + k) / K).long() + 1).clamp(min=1), n)
            masked_blocks = self.choose_blocks(m, n, rng, columns)
            ce_seq, _ = self._nll_per_sequence(model, batch, masked_blocks, n)
            total += (n.double() / m.double()) * ce_seq.cpu().double()
        return float(total.sum() / K), int(targets_of(batch).sum())
