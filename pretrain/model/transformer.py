"""The diffusion transformer: one pre-norm backbone for every variant (ar, mdm, block, jigsaw, scatter).

Reads top to bottom like the model description:

    tokens -> embedding -> n_layers x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> head -> logits

- Rotary position embeddings (RoPE) on queries and keys, so the same weights work for any
  attention pattern and there is no learned position table to resize.
- Attention is `F.scaled_dot_product_attention`: flash attention on GPUs whenever the variant
  needs no mask (mdm and unpadded ar); the mask family lives in `attention_masks.py`. On a GPU,
  padded or masked batches go through FlexAttention with a block mask from per-row lengths
  (`attention_kernel.py` chooses; `model.attention_kernel` says what the last batch took).
- Two-stream pass for the blockwise variants trained in one vectorised pass (`block`: BD3-LM,
  `jigsaw` with `model.jigsaw_streams: 2`, ours; the default Jigsaw is the authors' single stream): `forward(x_t, ..., x0=x_0)` runs the backbone over [x_t | x_0] (2L positions) with the
  variant's two-stream mask, rotary positions 0..L-1 for both copies (a clean token and its noised
  copy sit at the same position), and returns the logits of the x_t half only (the head is not
  applied to the x_0 half: nothing is predicted there).
- Optional adaLN time conditioning as in MDLM's DiT (`cfg.time_conditioning`): t -> sinusoidal
  features -> MLP -> c [B, cond_dim]; each block maps c to shift/scale/gate for its two sublayers,
  zero-initialised so that every block starts as the identity (DiT's "adaLN-Zero"). MDLM shows the
  log-linear masked diffusion does not need it, hence off by default.
- Optional clean-prefix KV cache for left-to-right decoding (`kv_cache=`, `prefill`; variants ar and
  block only, see kv_cache.py): committed positions' keys/values are computed once and reused.

Parallelism is not woven in. Tensor parallelism is applied later (package `parallel/`) by replacing
the plain modules named here: `tok_emb` (nn.Embedding), `attn.qkv` / `mlp.fc_in` / `mlp.gate`
(column-parallel), `attn.proj` / `mlp.fc_out` (row-parallel), `head`. The fused qkv output is laid
out per head as [head, (q, k, v), head_dim], and the head count is read from the tensor, so a
column-sharded qkv holds whole heads and the attention code runs unchanged on each rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.attention_kernel import attention_inputs, flex_attention, is_block_mask, note_kernel
from pretrain.model.attention_masks import block_len, is_two_stream, two_stream_mask
from pretrain.model.kv_cache import KVCache, LayerKV, cache_support, cached_attention_mask

if TYPE_CHECKING:  # annotations only: the config sits above the model (it reads the variant table)
    from pretrain.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight (no mean subtraction, no bias): cheaper than LayerNorm, same quality."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; expected rmsnorm or layernorm")


def swiglu_hidden(d_model: int, mlp_ratio: float) -> int:
    """SwiGLU has three matrices instead of two; 2/3 of the GELU width keeps the parameter count
    equal (3 * 2/3 * r * d^2 = 2 * r * d^2). Rounded up to a multiple of 8 for efficient matmuls."""
    hidden = int(2 * mlp_ratio * d_model / 3)
    return 8 * math.ceil(hidden / 8)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq_len, head_dim] for rotate-half RoPE (frequencies repeated twice)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [L, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [L, D]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) of x [B, H, L, D] by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        """kv: this layer's clean-prefix cache (decoding only): keys/values of the prefix are
        prepended to this pass's, cos/sin being the rotary angles of the new positions."""
        B, L, _ = x.shape
        qkv = self.qkv(x)
        n_heads = qkv.shape[-1] // (3 * self.head_dim)  # local heads: correct under a column-sharded qkv
        q, k, v = qkv.view(B, L, n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # 3 x [B, H, L, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k, v = kv.attach(k, v)
        if is_block_mask(mask):  # FlexAttention over per-row lengths (attention_kernel.py; no dropout)
            y = flex_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
            )
        return self.proj(y.transpose(1, 2).reshape(B, L, n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: fc_out(silu(gate(x)) * fc_in(x)), or GELU: fc_out(gelu(fc_in(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            hidden = swiglu_hidden(cfg.d_model, cfg.mlp_ratio)
            self.gate = nn.Linear(cfg.d_model, hidden, bias=False)
        elif cfg.mlp == "gelu":
            hidden = int(cfg.mlp_ratio * cfg.d_model)
        else:
            raise ValueError(f"unknown mlp {cfg.mlp!r}; expected swiglu or gelu")
        self.fc_in = nn.Linear(cfg.d_model, hidden, bias=False)
        self.fc_out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.fc_out(F.silu(self.gate(x)) * self.fc_in(x))
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-norm transformer block; with a time condition c, adaLN-Zero modulation as in DiT/MDLM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg.norm, cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)  # residual branches (MDLM's dropout1 / dropout2)
        # shift, scale, gate for attention and for the MLP; zero-initialised in _init_weights
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * cfg.d_model) if cfg.time_conditioning else None

    def forward(self, x, c, cos, sin, mask, is_causal, kv=None):
        if self.adaLN is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask, is_causal, kv))
            return x + self.drop(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None, :].chunk(6, dim=-1)
        x = x + gate1 * self.drop(
            self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, mask, is_causal, kv)
        )
        return x + gate2 * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> c [B, cond_dim]: sinusoidal features of 1000*t (DiT's timestep scale, so the
    low frequencies resolve t), then a 2-layer MLP, then SiLU (c feeds the adaLN linears)."""

    def __init__(self, cond_dim: int, n_freq: int = 256, max_period: float = 10000.0):
        super().__init__()
        half = n_freq // 2
        self.register_buffer(
            "freqs",
            torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half),
            persistent=False,
        )
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 1000.0 * t.float()[:, None] * self.freqs[None, :]
        return F.silu(self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1)))


# ---------------------------------------------------------------------------------------------
# The three parts of a pass: embed -> blocks -> unembed (a pipeline cuts between them)
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerContext:
    """What every block of one pass needs besides the hidden states, built once per pass (or per
    pipeline stage, from the small tensors that travel between stages). Absent inputs are None
    (torchtitan's pass-through: a model without time conditioning has c = None)."""

    c: torch.Tensor | None  # time condition [B, cond_dim] (adaLN), or None
    cos: torch.Tensor  # rotary tables for the pass's positions [positions, head_dim / 2]
    sin: torch.Tensor
    mask: torch.Tensor | None  # SDPA's boolean attention mask, or None
    is_causal: bool
    n_out: int  # positions the head reads: the x_t half of a two-stream pass, else all
    kernel: str = "sdpa:dense-mask"  # the attention kernel the mask selects (attention_kernel.py)


def layer_context(cfg: ModelConfig, rope_cos: torch.Tensor, rope_sin: torch.Tensor, L: int, device: torch.device,
                  key_padding_mask: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                  revealed_blocks: torch.Tensor | None = None, two_stream: bool = False,
                  c: torch.Tensor | None = None, dropout_active: bool = False,
                  use_flex: bool | None = False) -> LayerContext:
    """The variant's attention mask and rotary tables for L data positions (a two-stream pass: the
    [x_t | x_0] mask over 2L positions, rotary positions 0..L-1 twice: a clean token and its noised
    copy sit at the same position). The single-stream mask is what attention_kernel.py picks for the
    batch: none without padding (flash can run), a FlexAttention block mask (use_flex; None = on CUDA;
    the pipeline keeps False: a block mask does not travel between stages), else SDPA's dense mask."""
    cos, sin = rope_cos[:L], rope_sin[:L]
    if not two_stream:
        mask, is_causal, kernel = attention_inputs(cfg.variant, L, cfg.block_size, device, key_padding_mask,
                                                   prompt_mask, revealed_blocks, dropout_active=dropout_active,
                                                   use_flex=use_flex)
        return LayerContext(c, cos, sin, mask, is_causal, L, kernel)
    mask = two_stream_mask(cfg.variant, L, cfg.block_size, device, key_padding_mask, revealed_blocks, prompt_mask)
    return LayerContext(c, cos.repeat(2, 1), sin.repeat(2, 1), mask, False, L, "sdpa:dense-mask")


def embed_tokens(tok_emb: nn.Module, drop: nn.Module, time_emb: nn.Module | None, input_ids: torch.Tensor,
                 t: torch.Tensor | None = None, x0: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, time condition c or None): the token embedding of input_ids, or of [x_t | x_0]
    for a two-stream pass (x0 given), and the time embedding of t when the model is time-conditioned."""
    c = None
    if time_emb is not None:
        if t is None:
            raise ValueError("this model is time-conditioned (model.time_conditioning): pass t")
        c = time_emb(t.to(input_ids.device))
    if x0 is not None:
        input_ids = torch.cat([input_ids, x0], dim=1)  # [x_t | x_0]
    return drop(tok_emb(input_ids)), c


def unembed(norm_f: nn.Module, final_adaLN: nn.Module | None, head: nn.Module, x: torch.Tensor,
            ctx: LayerContext) -> torch.Tensor:
    """Logits of the first ctx.n_out positions: final norm (adaLN-modulated when time-conditioned), head."""
    x = norm_f(x[:, : ctx.n_out])  # the x_t half (everything, for a single stream)
    if final_adaLN is not None:
        shift, scale = final_adaLN(ctx.c)[:, None, :].chunk(2, dim=-1)
        x = modulate(x, shift, scale)
    return head(x)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DiffusionTransformer(nn.Module):
    # The parts as plain functions of the modules they use, for callers that hold those modules but
    # not the model: a pipeline stage (parallel/pipeline.py reaches them through the model it is cut
    # from, so parallel/ needs no import of the model package and keeps no reference to the model).
    # Bound before the methods `unembed` and `block_len` shadow the functions of the same names.
    embed_fn = staticmethod(embed_tokens)
    context_fn = staticmethod(layer_context)
    unembed_fn = staticmethod(unembed)
    block_len_fn = staticmethod(block_len)
    LayerContext = LayerContext

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.embedding_dropout)
        self.time_emb = TimestepEmbedder(cfg.cond_dim) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg.norm, cfg.d_model)
        self.final_adaLN = nn.Linear(cfg.cond_dim, 2 * cfg.d_model) if cfg.time_conditioning else None
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        # FlexAttention for masked/padded batches: None = on CUDA (attention_kernel.py), True/False forces it
        self.use_flex: bool | None = None
        self.attention_kernel = ""  # the kernel the last forward pass took
        cos, sin = rotary_tables(max_seq_len, cfg.d_model // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: each residual branch adds to the stream; 1/sqrt(2 * n_layers) keeps its variance O(1).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        for mod in (*(b.adaLN for b in self.blocks), self.final_adaLN):
            if (
                mod is not None
            ):  # adaLN-Zero: gates (and shifts/scales) start at 0 -> blocks start as identity
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def two_stream(self) -> bool:
        """Whether training runs the two-stream [x_t | x_0] pass: block, and jigsaw_streams 2."""
        return is_two_stream(self.cfg.variant, self.cfg.jigsaw_streams)

    def block_len(self, seq_len: int) -> int:
        """Tokens per block for a sequence of seq_len tokens (cfg.block_size 0 = the whole sequence)."""
        return block_len(seq_len, self.cfg.block_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        t: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        revealed_blocks: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        extend_cache: bool = False,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, L] long; t [B] diffusion time (used only with time conditioning);
        key_padding_mask Bool[B, L], True = real token. Returns logits [B, L, V] in the compute dtype.

        x0 [B, L] (variants block, and jigsaw with model.jigsaw_streams 2): the clean sequence; runs
        the two-stream training pass over [input_ids | x0] and returns the logits of the input_ids
        half. revealed_blocks Bool[B, n_blocks] (jigsaw): which response blocks are committed, clean
        context in this pass (single stream: the others are masked blocks, see attention_masks.py).
        prompt_mask Bool[B, L] (task data): the prompt, a prefix of each row; scatter and jigsaw see
        it from every position and count their blocks from the response start (attention_masks.py).

        kv_cache (decoding, variants ar and block; see kv_cache.py): input_ids [B, n] are the
        positions right after the cached clean prefix; they attend to [prefix | themselves] and only
        their logits are computed. extend_cache: they are committed and join the cached prefix."""
        if kv_cache is not None:
            if x0 is not None or revealed_blocks is not None or prompt_mask is not None:
                raise ValueError("a KV-cached pass (ar, block) takes neither x0, revealed_blocks nor prompt_mask")
            x, ctx = self._cached_backbone(input_ids, key_padding_mask, kv_cache, extend_cache)
            return self.unembed(x, ctx)
        B, L = input_ids.shape
        if L > self.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_seq_len {self.max_seq_len}")
        if x0 is not None and not self.two_stream:
            raise ValueError("x0 (the two-stream pass) is for variant block and for jigsaw with "
                             f"model.jigsaw_streams=2, not {self.cfg.variant!r} "
                             f"(jigsaw_streams={self.cfg.jigsaw_streams})")
        x, c = self.embed(input_ids, t, x0)
        ctx = self.context(L, input_ids.device, key_padding_mask, prompt_mask, revealed_blocks,
                           two_stream=x0 is not None, c=c)
        self.attention_kernel = ctx.kernel  # which kernel this batch took (attention_kernel.py)
        note_kernel(ctx.kernel)
        for block in self.blocks:
            x = block(x, ctx.c, ctx.cos, ctx.sin, ctx.mask, ctx.is_causal)
        return self.unembed(x, ctx)

    # the three parts of forward, which the pipeline (parallel/pipeline.py) runs on different stages
    def embed(self, input_ids: torch.Tensor, t: torch.Tensor | None = None, x0: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return embed_tokens(self.tok_emb, self.drop, self.time_emb, input_ids, t, x0)

    def context(self, L: int, device: torch.device, key_padding_mask=None, prompt_mask=None, revealed_blocks=None,
                two_stream: bool = False, c: torch.Tensor | None = None) -> LayerContext:
        return layer_context(self.cfg, self.rope_cos, self.rope_sin, L, device, key_padding_mask, prompt_mask,
                             revealed_blocks, two_stream, c, dropout_active=self.training and self.cfg.attention_dropout > 0,
                             use_flex=self.use_flex)

    def unembed(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return unembed(self.norm_f, self.final_adaLN, self.head, x, ctx)

    def prefill(self, input_ids: torch.Tensor, kv_cache: KVCache, key_padding_mask: torch.Tensor | None = None) -> None:
        """Append the clean, committed tokens input_ids [B, n] (the positions right after the cached
        prefix) to kv_cache; no logits are computed (e.g. a prompt, or a block BD3-LM just decoded)."""
        self._cached_backbone(input_ids, key_padding_mask, kv_cache, extend=True)

    def _cached_backbone(self, input_ids, key_padding_mask, kv_cache: KVCache, extend: bool
                         ) -> tuple[torch.Tensor, LayerContext]:
        """The blocks over new positions start..start+n-1 against the cached prefix 0..start-1."""
        reason = cache_support(self.cfg.variant, self.cfg.block_size, self.time_emb is not None)
        if reason is not None:
            raise ValueError(f"a KV cache is not exact for this model: {reason}")
        B, n = input_ids.shape
        start = kv_cache.length
        if start + n > self.max_seq_len:
            raise ValueError(f"cached prefix {start} + {n} new positions exceed the model's max_seq_len {self.max_seq_len}")
        if self.cfg.variant == "block" and start % self.cfg.block_size:
            raise ValueError(f"block: the cached prefix ({start} tokens) must be whole blocks of {self.cfg.block_size}")
        real = (torch.ones(B, n, dtype=torch.bool, device=input_ids.device) if key_padding_mask is None
                else key_padding_mask.to(input_ids.device).bool())
        keys_real = kv_cache.begin(real, extend)
        mask = cached_attention_mask(self.cfg.variant, start, n, self.cfg.block_size, keys_real)
        ctx = LayerContext(c=None, cos=self.rope_cos[start : start + n], sin=self.rope_sin[start : start + n],
                           mask=mask, is_causal=False, n_out=n)  # absolute positions
        x, _ = self.embed(input_ids)
        for block, kv in zip(self.blocks, kv_cache.layers, strict=True):
            x = block(x, ctx.c, ctx.cos, ctx.sin, ctx.mask, ctx.is_causal, kv)
        return x, ctx

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the token-embedding table (with tied
        embeddings that table is also the head, so the head is dropped too)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, forward + backward: 6 * N + 12 * n_layers * d_model * seq_len.

        N counts every parameter used in a per-token matmul: all but the embedding lookup and the
        per-sequence time conditioning, with the output head always included (tied or not: its
        matmul is real work). 6 = 2 (multiply-add) x 3
        (forward, and backward for activations and for weights). The second term is attention's
        QK^T and AV products (PaLM/nanoGPT convention), counted over the full L x L matrix for every
        variant, causal included, so MFU numbers compare across variants. The one formula for MFU.

        Two-stream variants (block, jigsaw with jigsaw_streams 2) run every layer on 2 positions per data token (x_t and
        x_0) over 2L keys, and the head on one: 6 * (2 (N - head) + head) + 12 n_layers d (2L) * 2.
        """
        n = self.num_parameters(exclude_embeddings=True)
        if self.cfg.tie_embeddings:
            n += self.head.weight.numel()
        # time conditioning runs once per sequence, not per token: not part of N
        per_sequence = [self.time_emb, self.final_adaLN, *(b.adaLN for b in self.blocks)]
        n -= sum(p.numel() for m in per_sequence if m is not None for p in m.parameters())
        if self.two_stream:
            head = self.head.weight.numel()
            return 6.0 * (2 * (n - head) + head) + 12.0 * self.cfg.n_layers * self.cfg.d_model * (2 * seq_len) * 2
        return 6.0 * n + 12.0 * self.cfg.n_layers * self.cfg.d_model * seq_len
