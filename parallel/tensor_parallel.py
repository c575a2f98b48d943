"""Tensor parallelism applied to the plain DiffusionTransformer (Megatron-style, megatron-core layers).

    model = build_model(cfg.model, vocab, seq_len)       # same seed on every rank of a TP group
    model = apply_tensor_parallel(model)                  # after parallel.state.init_distributed

The model file stays free of parallelism; this module swaps its linear layers for megatron-core's
in place, under the same names, so the model's forward code, its state-dict keys and the objective
do not change:

    tok_emb                          VocabParallelEmbedding   rows (vocab) sharded, output all-reduced
    blocks.i.attn.qkv                ColumnParallelLinear     whole heads per rank (see below)
    blocks.i.mlp.fc_in / .gate       ColumnParallelLinear     hidden units sharded, SwiGLU is local
    blocks.i.attn.proj / .mlp.fc_out RowParallelLinear        input sharded, output all-reduced
    head                             ColumnParallelLinear, output all-gathered

- qkv: the plain model lays the fused qkv output out per head, [head, (q, k, v), head_dim], and
  reads the head count from the tensor. A contiguous row split of the [3d, d] weight therefore
  gives rank r the q, k and v of heads [r h/tp, (r+1) h/tp) and attention runs unchanged on
  local heads; attn.proj's input columns are the same heads in the same order.
- head: the output is all-gathered so the objective keeps receiving full [B, L, V] logits and
  `F.cross_entropy` on selected rows is untouched. This costs one all-gather of the logits and
  memory for them on every TP rank. A later optimisation (`vocab_parallel_loss=True`) would
  return vocab-sharded logits and use megatron's `vocab_parallel_cross_entropy` in the objective.
- vocab padding: megatron shards the vocabulary evenly, so the vocab is padded with zero rows
  to a multiple of tp (embedding rows never looked up; head logits sliced off after the gather,
  so their gradient is zero and AdamW leaves them at zero). Nothing outside sees the padding.
- tied embeddings: embedding and head shards have the same [V_pad/tp, d] layout, so the shared
  Parameter stays shared.
- replicated parameters (norms, adaLN, time embedding) stay plain nn.Modules, identical on every
  TP rank, and need no extra communication: they act on full hidden states (after a RowParallel
  or embedding all-reduce), and the gradient reaching them through a column-parallel layer is
  all-reduced over the TP group by that layer's backward; the head's gather is split in
  backward from identical full-logit gradients. So their gradients, and their AdamW updates,
  are the same on every TP rank (tested). What this needs from the trainer: every rank of a TP
  group sees the same batch, the same t and mask draws, and the same dropout RNG stream.
- every sharded parameter carries megatron's `tensor_model_parallel`, `partition_dim` and
  `partition_stride` attributes, which DeepSpeed reads to count each in the gradient norm once.

The shard <-> full conversions (`shard_state_dict`, `merge_state_dicts`, and the collective
`gather_tensor_parallel_state_dict` / `gather_tensor_parallel_tensors`) use the same plan, keyed by
the plain model's parameter names; the checkpoint converter builds on them.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from torch import nn

from parallel import comm

# module-name pattern (full match) -> how it is split; the single source of truth for both the
# module substitution and the state-dict conversions
TP_PLAN: dict[str, str] = {
    r"tok_emb": "vocab_embedding",
    r"blocks\.\d+\.attn\.qkv": "colwise",
    r"blocks\.\d+\.mlp\.fc_in": "colwise",
    r"blocks\.\d+\.mlp\.gate": "colwise",
    r"blocks\.\d+\.attn\.proj": "rowwise",
    r"blocks\.\d+\.mlp\.fc_out": "rowwise",
    r"head": "vocab_head",
}
_PLAN = [(re.compile(p), s) for p, s in TP_PLAN.items()]


def plan_style(module_name: str) -> str | None:
    """The TP_PLAN style of a module of the plain model, or None when it stays replicated."""
    for pattern, style in _PLAN:
        if pattern.fullmatch(module_name):
            return style
    return None


def shard_layout(key: str) -> tuple[int | None, bool]:
    """(dimension split across TP ranks or None if replicated, whether it is vocab-padded) of a
    state-dict key. Row-parallel biases are replicated: they are added after the all-reduce."""
    module, _, leaf = key.rpartition(".")
    style = plan_style(module)
    if style is None:
        return None, False
    if style == "rowwise":
        return (1 if leaf == "weight" else None), False
    return 0, style.startswith("vocab")


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")  # megatron layers' empty TransformerEngine-compat entry


# ---------------------------------------------------------------------------------------------
# State-dict conversions (pure: no process group)
# ---------------------------------------------------------------------------------------------


def shard_state_dict(full_sd: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """The plain model's full state dict -> the state dict of TP rank tp_rank of tp_size (same keys,
    sharded tensors cloned so the full ones can be freed; replicated ones shared)."""
    out = {}
    for key, value in full_sd.items():
        if _is_extra_state(key):
            continue
        dim, vocab = shard_layout(key)
        if dim is None or tp_size == 1:
            out[key] = value
            continue
        if vocab and value.shape[0] % tp_size:
            pad = padded_vocab_size(value.shape[0], tp_size) - value.shape[0]
            value = torch.cat([value, value.new_zeros((pad, *value.shape[1:]))], dim=0)
        if value.shape[dim] % tp_size:
            raise ValueError(f"{key}: size {value.shape[dim]} of dim {dim} is not divisible by tensor_parallel {tp_size}")
        n = value.shape[dim] // tp_size
        out[key] = value.narrow(dim, tp_rank * n, n).clone()
    return out


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], vocab_size: int) -> dict[str, torch.Tensor]:
    """The state dicts of TP ranks 0..tp-1 (in order) -> the plain model's full state dict.
    vocab_size is the model's real vocabulary (the padding rows are dropped)."""
    out = {}
    for key, value in shards[0].items():
        if _is_extra_state(key):
            continue
        dim, vocab = shard_layout(key)
        if dim is None or len(shards) == 1:
            out[key] = value
            continue
        full = torch.cat([s[key] for s in shards], dim=dim)
        out[key] = full[:vocab_size] if vocab else full
    return out


# ---------------------------------------------------------------------------------------------
# Collective gathers (every rank of the TP group calls them)
# ---------------------------------------------------------------------------------------------


def _tp_group_of(model: nn.Module):
    for module in model.modules():
        if getattr(module, "tp_group", None) is not None:
            return module.tp_group
    return None


def gather_tensor_parallel_tensors(
    tensors: dict[str, torch.Tensor], vocab_size: int, tp_group
) -> dict[str, torch.Tensor]:
    """Full tensors from TP-sharded ones keyed by the plain model's parameter names: parameters,
    their gradients or optimizer moments alike. Replicated entries are taken from this rank."""
    tp = dist.get_world_size(group=tp_group) if tp_group is not None else 1
    if tp == 1:
        return {k: v for k, v in tensors.items() if not _is_extra_state(k)}
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, value in tensors.items():
        if _is_extra_state(key):
            continue
        if shard_layout(key)[0] is None:
            shards[0][key] = value
            continue
        parts = [torch.empty_like(value) for _ in range(tp)]
        dist.all_gather(parts, value.contiguous(), group=tp_group)
        for rank, part in enumerate(parts):
            shards[rank][key] = part
    return merge_state_dicts(shards, vocab_size)


def gather_tensor_parallel_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full plain-model state dict of a tensor-parallel model (on every TP rank)."""
    sd = {k: v.detach() for k, v in model.state_dict().items() if not _is_extra_state(k)}
    return gather_tensor_parallel_tensors(sd, model.vocab_size, _tp_group_of(model))


# ---------------------------------------------------------------------------------------------
# Layer substitution
# ---------------------------------------------------------------------------------------------


def _mark_sharded(param: torch.Tensor, dim: int) -> None:
    """megatron's TP attributes (it sets them only when it initialises the weight itself)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if not getattr(param, "tensor_model_parallel", False):
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(param, attr):
                delattr(param, attr)
        set_tensor_model_parallel_attributes(param, True, dim, 1)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension; backward keeps this rank's slice of the gradient.

    Megatron's gather_from_tensor_model_parallel_region with a device-agnostic buffer. Taking
    the slice (no reduce-scatter) is right because everything after the gather (the loss) runs
    replicated on every TP rank, so the full gradient is the same on each."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = grad.shape[-1] // dist.get_world_size(group=ctx.group)
        rank = dist.get_rank(group=ctx.group)
        return grad.narrow(-1, rank * n, n).contiguous(), None


@contextlib.contextmanager
def _no_cpu_autocast(x: torch.Tensor):
    """megatron-core's linears declare their autocast behaviour for CUDA only (custom_fwd/custom_bwd with
    device_type="cuda"): under CPU autocast their forward computes in bf16 and their backward, which
    runs outside autocast, multiplies the bf16 gradient by the fp32 weight and fails. On the CPU they
    compute in fp32 (the weights are fp32 in every layout); on a GPU autocast applies to them as to
    every other layer."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            yield x.float()
    else:
        yield x


def _layer_classes():
    """megatron-core layers returning a tensor instead of (output, bias), so that they drop into
    the plain model's forward code (biases are added inside: skip_bias_add=False)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnParallel(ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with _no_cpu_autocast(x) as x:
                return super().forward(x)[0]

    class RowParallel(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with _no_cpu_autocast(x) as x:
                return super().forward(x)[0]

    class VocabParallelHead(ColumnParallelLinear):
        """Column-parallel over the padded vocabulary, gathered, padding sliced off. Built with
        gather_output=False: megatron's own gather allocates its buffer on CUDA."""

        vocab_size: int

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with _no_cpu_autocast(x) as x:
                logits = _GatherLastDim.apply(super().forward(x)[0], self.tp_group)
            return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]

    return ColumnParallel, RowParallel, VocabParallelHead


def _check_same_weights(model: nn.Module, group) -> None:
    """Each TP rank copies its shard from its own full model, so all of them must have built the
    same one; a cheap float64 checksum per parameter catches a seed taken from the global rank."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()] or [torch.zeros(())]).cpu()
    sq = torch.stack([p.detach().double().square().sum() for p in model.parameters()] or [torch.zeros(())]).cpu()
    local = torch.cat([sums, sq])
    hi, lo = comm.all_reduce(local, "max", group), comm.all_reduce(local, "min", group)
    if not torch.equal(hi, lo):
        raise ValueError(
            "the plain model's weights differ across tensor-parallel ranks: build it with the same seed "
            "on every rank of a TP group (seed from (seed, dp_rank, pp_rank), never the global rank)"
        )


def _check_divisible(model: nn.Module, tp: int) -> None:
    cfg = model.cfg
    if cfg.n_heads % tp:
        raise ValueError(f"n_heads {cfg.n_heads} is not divisible by tensor_parallel {tp} (qkv is split by whole heads)")
    for block in model.blocks:
        for lin in (block.mlp.fc_in, getattr(block.mlp, "gate", None)):
            if lin is not None and lin.out_features % tp:
                raise ValueError(f"MLP hidden size {lin.out_features} is not divisible by tensor_parallel {tp}")


def apply_tensor_parallel(model: nn.Module, tp_group=None, *, check_same_init: bool = True) -> nn.Module:
    """Shard a plain DiffusionTransformer over the tensor-parallel group, in place; returns it.

    tp_group defaults to megatron-core's (`parallel.state.init_distributed` builds it). Each
    rank copies its shards out of the full weights it holds, so a TP model equals the plain model
    built with the same seed exactly; check_same_init verifies (one small all-reduce) that the
    ranks did build the same one. At tp=1 the model is returned unchanged.

    Every rank holds the full model for a moment: fine at the sizes trained here; a model too
    large for that would be built on the meta device and loaded with `shard_state_dict`."""
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    group = tp_group if tp_group is not None else ps.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    if tp == 1:
        return model
    _check_divisible(model, tp)
    if check_same_init:
        _check_same_weights(model, group)

    ColumnParallel, RowParallel, VocabParallelHead = _layer_classes()
    full_sd = model.state_dict()
    vocab, vocab_pad = model.vocab_size, padded_vocab_size(model.vocab_size, tp)
    init = nn.init.zeros_  # placeholder: perform_initialization=False, weights are copied below

    for name, old in list(model.named_modules()):
        style = plan_style(name)
        if style is None:
            continue
        weight = old.weight
        config = ModelParallelConfig(
            tensor_model_parallel_size=tp,
            use_cpu_initialization=True,
            perform_initialization=False,
            params_dtype=weight.dtype,
        )
        if style == "vocab_embedding":
            new = VocabParallelEmbedding(
                vocab_pad, old.embedding_dim, init_method=init, config=config, tp_group=group
            )
            _mark_sharded(new.weight, 0)
        else:
            has_bias = old.bias is not None
            common = dict(config=config, init_method=init, bias=has_bias, tp_group=group)
            if style == "colwise":
                new = ColumnParallel(old.in_features, old.out_features, gather_output=False, **common)
                _mark_sharded(new.weight, 0)
            elif style == "rowwise":
                new = RowParallel(
                    old.in_features, old.out_features, input_is_parallel=True, skip_bias_add=False, **common
                )
                _mark_sharded(new.weight, 1)
            else:  # vocab_head
                new = VocabParallelHead(old.in_features, vocab_pad, gather_output=False, **common)
                new.vocab_size = vocab
                _mark_sharded(new.weight, 0)
        new.to(device=weight.device)
        model.set_submodule(name, new)

    if model.cfg.tie_embeddings:
        model.head.weight = model.tok_emb.weight
    model.load_state_dict(shard_state_dict(full_sd, rank, tp), strict=True)
    return model
