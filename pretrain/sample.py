"""Samplers: fill the masked positions of a batch, conditioned on the given (prompt) tokens.

    result = generate(model, x, gen_mask, key_padding_mask, mask_id=..., cfg=SamplerConfig(...))

x Long[B, L] holds the prompt (and anything else that is given); gen_mask Bool[B, L] marks the
positions to generate (they are set to the mask token first); given tokens are never changed.
Batched and vectorised over the batch: the Python loops run over decoding *steps* (one model
forward each), never over tokens of a step. Deterministic given `cfg.seed` on one device type
(draws come from a torch.Generator on the batch's device). `result.nfe` counts model forwards that
predict tokens.

Samplers (`SamplerConfig.name`; `auto` picks the variant's own, in brackets):
- `ar` [ar]: left to right, one forward per generated position on the prefix (causal model); with
  `kv_cache` each forward runs on the tokens committed since the previous one only.
- masked diffusion [mdm]:
  `ancestral` (MDLM's reverse process: on the step t -> s each masked token is revealed with
  probability (alpha_s - alpha_t) / (1 - alpha_t), with the run's noise schedule), and the
  ordered, fixed-count samplers of LLaDA (a fixed number of tokens per step, split evenly over
  `steps` as LLaDA's `get_num_transfer_tokens`, or `tokens_per_step`), which reveal the tokens
  that score highest: `confidence` (probability of the drawn token: LLaDA's low-confidence
  remasking), `entropy` (lowest entropy first), `margin` (largest top1 - top2 gap first),
  `random` (uniform order). With `block_size` > 0 these run semi-autoregressively: blocks left to
  right, diffusion inside a block (LLaDA's semi-AR), `steps` per block.
- `block` [block]: BD3-LM decoding: blocks left to right, inside a block the masked-diffusion
  sampler `inner` with `steps` per block; earlier blocks are committed and never change. The model's
  block-causal mask makes a block independent of later ones, so each forward runs on the prefix up
  to the current block only; with `kv_cache` (default on) the committed blocks' keys/values are
  computed once (one `prefill` forward per committed block, or per run of given blocks) and each
  denoising forward runs on the current block alone (pretrain/model/kv_cache.py says why this is
  exact for `block` and `ar` only, and not for time-conditioned models).
- `jigsaw` [jigsaw]: as documented in pretrain/diffusion/blockwise.py: repeatedly pick a pending
  response block (`jigsaw_order`: `entropy` = the lowest mean predictive entropy, the authors'
  choice; `ltr` = left to right) and commit it. Single stream (model.jigsaw_streams 1, the
  authors'): one forward per block, in which every pending block holds only mask tokens (given
  tokens of a pending block are hidden until it is committed, as in training) and sees the
  prompt and the committed blocks only; the chosen block's tokens are drawn from that forward
  (the block model is a product of per-position marginals given the context). Two-stream (ours):
  the chosen block is generated left to right with the two-stream pass (its earlier tokens the
  teacher-forced x_0 prefix): B + 1 forwards per block (B with `ltr`).
- `scatter` [scatter]: as documented in pretrain/model/attention_masks.py: offsets 0, 1, ..., B-1
  in turn (counted from the response start when a prompt_mask is given), all blocks at once (one
  forward per offset: left to right inside every block, parallel across blocks). The only sampler
  for Scatter: its denoiser at offset o attends to no response token at an offset > o (directly;
  with a prompt, the authors' rule lets prompt positions see lower offsets, so higher offsets reach o
  from the second layer on, through the prompt: a side channel the offset order never relies on), so
  an order that reveals a position before the lower offsets are decoded (ancestral, random,
  confidence, ...) draws it largely ignoring tokens already committed at higher offsets: the decoded
  joint is then not the one the
  model factorises (e.g. data {AB, BA} with B = 2: revealing offset 1 first gives AA/BB half the
  time), and memorised sequences were not reproduced (issue 17). Refused with that reason.

Prompts: `prompt_mask` Bool[B, L] (the `[BOS] prompt` prefix of each row) is passed to the model for
models trained on responses (data.train_on), so Scatter and Jigsaw see the prompt and count their
blocks from the response start as in training.

Token draws: `temperature` 0 = greedy (argmax); otherwise Gumbel-max over the tempered, top-k /
top-p filtered distribution, in float64 by default (`float64`; docs/ARCHITECTURE.md: fp32 categorical sampling
lowers the effective temperature and flatters generative perplexity). The mask token and
`forbid_ids` (e.g. PAD, BOS) are never drawn, and every ordering score (including jigsaw's entropy
probe) is computed on the distribution without them: MDLM's SUBS "zero masking probabilities" (a
SUBS-trained model's raw [MASK] logit is untrained and meaningless). Given and committed tokens are
never changed (SUBS "carry-over unmasking"); see pretrain/diffusion/objective.py. Time-conditioned models get t = the masked fraction
of the sequence (for log-linear alpha_t = 1 - t that is the expected t).

`result.positions` counts the token positions run through the model (batch x length, summed over
forwards; two-stream passes count both copies): the work a KV cache saves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pretrain.diffusion.schedules import build_schedule
from pretrain.model import unwrap
from pretrain.model.attention_masks import check_prompt_prefix, max_blocks, response_blocks, response_index
from pretrain.model.kv_cache import KVCache, cache_support
from pretrain.variants import ANY_ORDER_SAMPLERS, resolve_sampler, samplers

# Which samplers fit which model variant, `auto`'s choice and the reasons for refusals are the variant
# table's (pretrain/variants.py); the names here are derived from it.
SAMPLERS = ("auto", *samplers())
MDM_SAMPLERS = ANY_ORDER_SAMPLERS  # the masked-diffusion samplers, also `inner` of block decoding
JIGSAW_ORDERS = ("entropy", "ltr")  # jigsaw's block order: lowest mean entropy first (the authors') | left to right


@dataclass
class SamplerConfig:
    name: str = "auto"  # see SAMPLERS; auto = the variant's own decoding (pretrain/variants.py)
    steps: int = 0  # denoising forwards (per block for block / semi-AR); 0 = one token per step
    tokens_per_step: int = 0  # alternative to steps for the fixed-count samplers (0 = use steps)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    block_size: int = 0  # semi-AR blocks for the masked-diffusion samplers (0 = none); block: the model's
    inner: str = "confidence"  # block variant: the masked-diffusion sampler inside a block
    jigsaw_order: str = "entropy"  # entropy | ltr
    float64: bool = True  # categorical draws in float64
    seed: int = 0
    # reuse the committed prefix's keys/values where that is exact (ar, block without time
    # conditioning; pretrain/model/kv_cache.py); elsewhere ignored. Same samples, less work.
    kv_cache: bool = True


@dataclass
class SampleResult:
    tokens: torch.Tensor  # Long[B, L]: x with the generated positions filled
    nfe: int  # model forwards that predict tokens (KV-cache prefills of committed tokens are not counted)
    positions: int = 0  # token positions run through the model, summed over forwards (batch x length)
    kv_cache: bool = False  # whether the clean-prefix KV cache was used




# ---------------------------------------------------------------------------------------------
# Token draws and scores
# ---------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering of [N, V] logits (removed entries -> -inf)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def draw(
    logits: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator, forbid: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens Long[N], probs [N, V]) from logits [N, V]: greedy or Gumbel-max in float64/float32.
    probs is the (tempered, filtered) distribution the token came from, used for ordering scores."""
    dtype = torch.float64 if cfg.float64 else torch.float32
    logits = logits.to(dtype)
    if forbid:
        logits[:, list(forbid)] = -math.inf
    if cfg.temperature > 0:
        logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    logp = logits.log_softmax(dim=-1)
    if cfg.temperature > 0:
        u = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=dtype)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))
        tokens = (logp + gumbel).argmax(dim=-1)
    else:
        tokens = logp.argmax(dim=-1)
    return tokens, logp.exp()


def order_scores(kind: str, tokens: torch.Tensor, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Higher = reveal first. confidence: p(token); entropy: -H(p); margin: p1 - p2; random: U(0,1)."""
    if kind == "confidence":
        return probs.gather(-1, tokens[:, None])[:, 0]
    if kind == "entropy":
        return (probs * probs.clamp_min(1e-300).log()).sum(dim=-1)
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if kind == "random":
        return torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=probs.dtype)
    raise ValueError(f"unknown ordering {kind!r}")


def transfer_counts(n: torch.Tensor, steps: int, tokens_per_step: int) -> tuple[int, torch.Tensor]:
    """(number of steps S, Long[B, S] tokens to reveal per row and step), summing to n per row.
    steps: n split evenly (the first n % S steps take one more, as LLaDA); tokens_per_step: k per
    step until done; neither: one token per step."""
    n = n.long()
    n_max = int(n.max()) if n.numel() else 0
    if n_max == 0:
        return 0, torch.zeros(n.shape[0], 0, dtype=torch.long, device=n.device)
    if steps <= 0:
        k = max(tokens_per_step, 1)
        steps = math.ceil(n_max / k)
        s = torch.arange(steps, device=n.device)
        return steps, (n[:, None] - k * s[None, :]).clamp(0, k)
    s = torch.arange(steps, device=n.device)
    return steps, n[:, None] // steps + (s[None, :] < (n % steps)[:, None]).long()


def _select_top(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool[B, L]: the k_b highest-scoring candidates of each row (ties by position)."""
    scores = scores.masked_fill(~candidates, -math.inf)
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    return (rank < k[:, None]) & candidates


# ---------------------------------------------------------------------------------------------
# The samplers
# ---------------------------------------------------------------------------------------------


class _Ctx:
    """What every sampler needs: the model call, draws, and the forward counter."""

    def __init__(self, model, key_padding_mask, mask_id, cfg, forbid, schedule, generator, prompt_mask=None):
        self.model, self.kpm, self.mask_id, self.cfg = model, key_padding_mask, mask_id, cfg
        self.prompt = prompt_mask
        self.prompt_kw = {} if prompt_mask is None else {"prompt_mask": prompt_mask}
        self.forbid = sorted({int(mask_id), *(int(i) for i in forbid)})
        self.schedule, self.gen = schedule, generator
        self.nfe = 0
        self.positions = 0
        self.time_cond = bool(getattr(unwrap(model).cfg, "time_conditioning", False))
        self.cache: KVCache | None = None  # set by the samplers that decode a clean prefix left to right

    def t_of(self, masked: torch.Tensor, upto: int) -> torch.Tensor | None:
        if not self.time_cond:
            return None
        real = self.kpm[:, :upto]
        if self.prompt is not None:  # trained on responses: t is the response's masked fraction
            real = real & ~self.prompt[:, :upto]
        return (masked[:, :upto] & real).sum(1).float() / real.sum(1).clamp(min=1).float()

    def logits(self, x: torch.Tensor, masked: torch.Tensor, upto: int | None = None,
               extend: bool = False) -> tuple[torch.Tensor, int]:
        """(logits of positions lo..upto-1, lo): lo = 0, or the cached prefix's length with a cache.
        extend (ar): the positions passed are committed and join the cache."""
        upto = x.shape[1] if upto is None else upto
        self.nfe += 1
        if self.cache is None:
            self.positions += x.shape[0] * upto
            kw = {} if self.prompt is None else {"prompt_mask": self.prompt[:, :upto]}
            return self.model(x[:, :upto], self.t_of(masked, upto), key_padding_mask=self.kpm[:, :upto], **kw), 0
        lo = self.cache.length
        self.positions += x.shape[0] * (upto - lo)
        return self.model(x[:, lo:upto], None, key_padding_mask=self.kpm[:, lo:upto], kv_cache=self.cache,
                          extend_cache=extend), lo

    def commit(self, x: torch.Tensor, upto: int) -> None:
        """Add the committed positions cache.length..upto-1 of x to the KV cache (no logits)."""
        lo = self.cache.length
        if upto > lo:  # not a function evaluation of the sampler (no prediction): not in nfe
            self.positions += x.shape[0] * (upto - lo)
            unwrap(self.model).prefill(x[:, lo:upto], self.cache, key_padding_mask=self.kpm[:, lo:upto])

    def draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return draw(logits, self.cfg, self.gen, self.forbid)


def _diffuse(ctx: _Ctx, x: torch.Tensor, masked: torch.Tensor, active: torch.Tensor, kind: str,
             upto: int | None = None) -> None:
    """Fill the positions `active & masked` of x in place with masked-diffusion sampler `kind`."""
    cfg = ctx.cfg
    todo = active & masked
    if kind == "ancestral":
        steps = cfg.steps or (math.ceil(int(todo.sum(1).max()) / max(cfg.tokens_per_step, 1)) if todo.any() else 0)
        for k in range(steps):
            t_now = torch.tensor(1.0 - k / steps, dtype=torch.float64)
            t_next = torch.tensor(1.0 - (k + 1) / steps, dtype=torch.float64)
            a_now, a_next = float(ctx.schedule.alpha(t_now)), float(ctx.schedule.alpha(t_next))
            p_reveal = 1.0 if k == steps - 1 else min(max((a_next - a_now) / max(1.0 - a_now, 1e-12), 0.0), 1.0)
            cur = active & masked
            if not cur.any():
                ctx.nfe += 1  # a step of the schedule (MDLM's cache skips the forward; we count it)
                continue
            logits, lo = ctx.logits(x, masked, upto)
            r, c = cur[:, lo : lo + logits.shape[1]].nonzero(as_tuple=True)  # c: column of logits
            tokens, _ = ctx.draw(logits[r, c])
            u = torch.rand(tokens.shape, generator=ctx.gen, device=x.device, dtype=torch.float64)
            reveal = u < p_reveal
            r0, r1 = r[reveal], c[reveal] + lo
            x[r0, r1] = tokens[reveal]
            masked[r0, r1] = False
        return
    steps, counts = transfer_counts(todo.sum(1), cfg.steps, cfg.tokens_per_step)
    for s in range(steps):
        cur = active & masked
        if not cur.any():
            ctx.nfe += 1
            continue
        logits, lo = ctx.logits(x, masked, upto)
        r, c = cur[:, lo : lo + logits.shape[1]].nonzero(as_tuple=True)
        tokens, probs = ctx.draw(logits[r, c])
        rows = (r, c + lo)  # positions in x
        score = torch.full(x.shape, -math.inf, dtype=probs.dtype, device=x.device)
        score[rows] = order_scores(kind, tokens, probs, ctx.gen)
        proposal = torch.zeros_like(x)
        proposal[rows] = tokens
        chosen = _select_top(score, cur, counts[:, s])
        x[chosen] = proposal[chosen]
        masked &= ~chosen


def _ar(ctx: _Ctx, x: torch.Tensor, masked: torch.Tensor) -> None:
    cols = masked.any(0).nonzero()[:, 0].tolist()
    for p in cols:
        if p == 0:
            raise ValueError("AR decoding needs at least one given token (e.g. [BOS]) before the first generated one")
        # with a cache: the tokens committed since the last forward (given or generated) join it
        logits = ctx.logits(x, masked, upto=p, extend=True)[0][:, -1]
        rows = masked[:, p]
        tokens, _ = ctx.draw(logits[rows])
        x[rows, p] = tokens
        masked[rows, p] = False


def _blocks(ctx: _Ctx, x, masked, bl: int, inner: str, truncate: bool) -> None:
    L = x.shape[1]
    pos = torch.arange(L, device=x.device)
    for b in range(math.ceil(L / bl)):
        active = (pos // bl == b)[None, :].expand_as(masked)
        if not (active & masked).any():
            continue
        if ctx.cache is not None:  # every block before b is committed: cache what is not cached yet
            ctx.commit(x, b * bl)
        _diffuse(ctx, x, masked, active, inner, upto=min((b + 1) * bl, L) if truncate else None)


def _scatter(ctx: _Ctx, x, masked, bl: int) -> None:
    _, off = response_index(ctx.prompt, x.shape[1], bl, x.device)  # [B or 1, L], from the response start
    for o in range(bl):
        cur = masked & (off == o)
        if not cur.any():
            continue
        logits, _ = ctx.logits(x, masked)
        rows = cur.nonzero(as_tuple=True)
        tokens, _ = ctx.draw(logits[rows])
        x[rows] = tokens
        masked[rows] = False


def _jigsaw(ctx: _Ctx, x, masked, bl: int, order: str, streams: int) -> None:
    """Block-level any order over the response blocks (counted from the response start). A block is
    pending while it holds a position to generate; pending blocks are the masked blocks of the
    model's mask, the others (and the prompt) its visible context. Single stream: x is the model's
    input (mask tokens at the positions still to generate); two-stream: x is the x_0 stream and
    x_t shows the revealed blocks and mask tokens elsewhere."""
    B, L = x.shape
    if order not in JIGSAW_ORDERS:
        raise ValueError(f"unknown jigsaw_order {order!r}; expected one of {', '.join(JIGSAW_ORDERS)}")
    blk, _ = response_index(ctx.prompt, L, bl, x.device)
    blk = blk.expand(B, -1)
    nb = max_blocks(L, bl)
    col = blk.clamp(min=0)
    ar_B = torch.arange(B, device=x.device)
    pending = torch.zeros(B, nb, dtype=torch.bool, device=x.device)
    r, c = (masked & (blk >= 0)).nonzero(as_tuple=True)
    pending[r, col[r, c]] = True
    if bool((masked & (blk < 0)).any()):
        raise ValueError("jigsaw: a position to generate lies inside the prompt (prompt_mask)")

    n_resp = response_blocks(ctx.prompt, B, L, bl).to(x.device)  # what training divides by

    def forward(xx, revealed):
        ctx.nfe += 1
        frac = pending.sum(1).float() / n_resp.float() if ctx.time_cond else None  # m / n, as in training
        if streams == 1:  # a masked block holds only mask tokens, as in training: given tokens of a
            # pending block (an infill) are hidden until the block is committed
            ctx.positions += xx.numel()
            hidden = (blk >= 0) & ~revealed.gather(1, col)
            x_in = torch.where(hidden, torch.full_like(xx, ctx.mask_id), xx)
            return ctx.model(x_in, frac, key_padding_mask=ctx.kpm, revealed_blocks=revealed, **ctx.prompt_kw)
        in_revealed = (blk < 0) | revealed.gather(1, col)
        x_t = torch.where(in_revealed, xx, torch.full_like(xx, ctx.mask_id))
        ctx.positions += 2 * xx.numel()  # the two-stream pass runs on [x_t | x_0]
        return ctx.model(x_t, frac, key_padding_mask=ctx.kpm, x0=xx, revealed_blocks=revealed, **ctx.prompt_kw)

    def block_entropy(logits):
        logits = logits.double()
        logits[..., ctx.forbid] = -math.inf  # the distribution draws come from (SUBS: no [MASK])
        logp = logits.log_softmax(-1)
        ent = -(logp.exp() * logp.clamp_min(-1e300)).sum(-1)  # [B, L]; 0 * -inf -> 0
        tok = masked & (blk >= 0)
        num = torch.zeros(B, nb, dtype=ent.dtype, device=x.device).scatter_add_(1, col, ent * tok)
        den = torch.zeros(B, nb, dtype=ent.dtype, device=x.device).scatter_add_(1, col, tok.to(ent.dtype))
        return (num / den.clamp(min=1)).masked_fill(~pending, math.inf)

    while pending.any():
        todo_rows = pending.any(1)
        probe = None
        if order == "ltr":
            choice = pending.float().argmax(1)  # first pending block
        else:
            probe = forward(x, ~pending)
            choice = block_entropy(probe).argmin(1)
        if streams == 1:  # the chosen block's tokens from one forward (the probe, when there was one)
            logits = probe if probe is not None else forward(x, ~pending)
            sel = masked & (blk == choice[:, None]) & todo_rows[:, None]
            rows = sel.nonzero(as_tuple=True)
            tokens, _ = ctx.draw(logits[rows])
            x[rows] = tokens
            masked[rows] = False
        else:
            start = torch.where(blk == choice[:, None], torch.arange(L, device=x.device), L).min(1).values
            for i in range(bl):
                p = (start + i).clamp(max=L - 1)
                need = masked[ar_B, p] & todo_rows & (start + i < L) & (blk[ar_B, p] == choice)
                if not need.any():
                    continue
                logits = forward(x, ~pending)
                tokens, _ = ctx.draw(logits[ar_B[need], p[need]])
                x[ar_B[need], p[need]] = tokens
                masked[ar_B[need], p[need]] = False
        pending[ar_B[todo_rows], choice[todo_rows]] = False


@torch.no_grad()
def generate(
    model,
    x: torch.Tensor,
    gen_mask: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    mask_id: int,
    cfg: SamplerConfig | None = None,
    forbid_ids: Sequence[int] = (),
    schedule=None,
    prompt_mask: torch.Tensor | None = None,
) -> SampleResult:
    """Fill `gen_mask` positions of x (see the module docstring); x is not modified. prompt_mask
    Bool[B, L]: the prompt prefix of each row, for models trained on responses (data.train_on)."""
    cfg = cfg or SamplerConfig()
    inner_model = unwrap(model)
    variant = inner_model.cfg.variant
    name = resolve_sampler(variant, cfg.name)
    if schedule is None:
        schedule = build_schedule("loglinear")
    device = x.device
    x = x.clone()
    masked = gen_mask.to(device).bool().clone()
    x[masked] = mask_id
    kpm = torch.ones_like(masked) if key_padding_mask is None else key_padding_mask.to(device).bool()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if prompt_mask is not None:
        prompt_mask = prompt_mask.to(device).bool()
        if bool((prompt_mask & masked).any()):
            raise ValueError("prompt_mask and gen_mask overlap: the prompt is given, never generated")
        check_prompt_prefix(prompt_mask)
    ctx = _Ctx(model, kpm, mask_id, cfg, forbid_ids, schedule, gen, prompt_mask)
    was_training = inner_model.training
    inner_model.eval()
    try:
        L = x.shape[1]
        model_bl = inner_model.block_len(L)
        mcfg = inner_model.cfg
        if cfg.kv_cache and name in ("ar", "block") and cache_support(
                mcfg.variant, mcfg.block_size, mcfg.time_conditioning) is None:
            ctx.cache = KVCache(mcfg.n_layers)
        if name == "ar":
            _ar(ctx, x, masked)
        elif name == "block":
            if cfg.inner not in MDM_SAMPLERS:
                raise ValueError(f"inner sampler {cfg.inner!r}: expected one of {', '.join(MDM_SAMPLERS)}")
            _blocks(ctx, x, masked, model_bl, cfg.inner, truncate=True)
        elif name == "jigsaw":
            _jigsaw(ctx, x, masked, model_bl, cfg.jigsaw_order, getattr(mcfg, "jigsaw_streams", 1))
        elif name == "scatter":
            _scatter(ctx, x, masked, model_bl)
        elif cfg.block_size > 0:
            _blocks(ctx, x, masked, cfg.block_size, name, truncate=False)
        else:
            _diffuse(ctx, x, masked, torch.ones_like(masked), name)
    finally:
        inner_model.train(was_training)
    return SampleResult(tokens=x, nfe=ctx.nfe, positions=ctx.positions, kv_cache=ctx.cache is not None)


# ---------------------------------------------------------------------------------------------
# Sample quality for language runs
# ---------------------------------------------------------------------------------------------


def sample_lengths(samples: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Tokens up to and including the first EOS (the whole row when there is none), Long[B]."""
    is_eos = samples == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(samples[:, 0], samples.shape[1] - 1))
    return first + 1


@torch.no_grad()
def generative_nll(ref_model, samples: torch.Tensor, lengths: torch.Tensor) -> tuple[float, int]:
    """(sum of -log p_ref over tokens 1..len-1 of each sample, float64; token count) under an AR
    reference model (variant ar). Log-probabilities are taken in float64."""
    if unwrap(ref_model).cfg.variant != "ar":
        raise ValueError("the reference model for generative perplexity must be an AR model (variant ar)")
    L = samples.shape[1]
    real = torch.arange(L, device=samples.device)[None, :] < lengths[:, None]
    logits = ref_model(samples, None, key_padding_mask=real).double()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, samples[:, 1:, None])[..., 0]
    tgt = real[:, 1:]
    return float(-(logp * tgt).sum()), int(tgt.sum())


def unigram_entropy(samples: torch.Tensor, lengths: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token histogram (MDLM's check that
    low generative perplexity does not come from repetitive text)."""
    out = []
    for row, n in zip(samples.cpu(), lengths.cpu().tolist(), strict=True):
        counts = torch.bincount(row[:n]).double()
        p = counts[counts > 0] / n
        out.append(float(-(p * p.log()).sum()))
    return sum(out) / max(len(out), 1)



if __name__ == "__main__":  # the samplers are a library; their command line is pretrain.generate
    import sys

    from pretrain.generate import main

    sys.exit(main(prog="python -m pretrain.sample"))
