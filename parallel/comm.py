"""The communication layer: every collective the trainer and the stop path need, in one place.

Code outside `parallel/` calls these instead of `torch.distributed` (a test checks the source tree), so the
rules live here once: each helper is a no-op on one process, and each places its tensor on the process
group's device (the CUDA device under NCCL, the CPU under gloo) and hands back the caller's device and
dtype, so a CPU tensor never reaches an NCCL collective.
"""

from __future__ import annotations

import torch


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(t: torch.Tensor, op, group=None) -> torch.Tensor:
    import torch.distributed as dist

    on_group = t.to(group_device(), copy=True)  # a copy: the caller's tensor is left as it was
    dist.all_reduce(on_group, op=op, group=group)
    return on_group.to(t.device)


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """`t` reduced (`op`: sum, max or min) over `group` (None: every rank), returned as a new tensor on
    `t`'s device; `t` itself on one process. The engines' gradient norms and step agreements."""
    if op not in ("sum", "max", "min"):  # checked on one process too, where it would pass unnoticed
        raise ValueError(f"all_reduce op {op!r}: expected sum, max or min")
    if not _distributed():
        return t
    import torch.distributed as dist

    return _reduce(t, getattr(dist.ReduceOp, op.upper()), group)


def all_reduce_max(value: float) -> float:
    """The largest `value` over every rank (e.g. the stop decision)."""
    if not _distributed():
        return value
    import torch.distributed as dist

    return float(_reduce(torch.tensor([float(value)], dtype=torch.float64), dist.ReduceOp.MAX)[0])


def dp_sum(values: torch.Tensor) -> torch.Tensor:
    """float64 sum over the data-parallel group (tensor-parallel peers hold identical values)."""
    out = values.to(torch.float64).clone()
    if not _distributed():
        return out
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:  # tp/pp only: nothing to sum, no collective
        return out
    return _reduce(out, dist.ReduceOp.SUM, ps.get_data_parallel_group())


def from_last_stage(values: torch.Tensor, last_stage_rank: int) -> torch.Tensor:
    """`values` as the last pipeline stage holds them, on every stage of its pipeline group."""
    if not _distributed():
        return values
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    on_group = values.to(group_device())
    dist.broadcast(on_group, src=last_stage_rank, group=ps.get_pipeline_model_parallel_group())
    return on_group.to(values.device)


def barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()
