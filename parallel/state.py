"""Process groups: torch.distributed from the launcher's environment, then megatron-core's groups.

One call at start-up, on every rank:

    topology = init_distributed(backend="auto", tp=2, pp=1)   # -> parallel.topology.Topology
    ...
    engine, *_ = deepspeed.initialize(model=model, mpu=DeepSpeedMpu(), ...)
    ...
    destroy()

Why megatron-core's `parallel_state` and not our own groups: its tensor-parallel layers
(`parallel/tensor_parallel.py`) look their group up there by default, and its rank order
(tp varies fastest, then dp, then pp: "tp-cp-ep-dp-pp") is the one DeepSpeed's pipeline
topology (`PipeModelDataParallelTopology`, axes pipe/data/model) also uses, so the groups agree.

`DeepSpeedMpu` exists because megatron-core's `parallel_state` is not a DeepSpeed `mpu` as is:
DeepSpeed 0.19.8 asks an mpu for the "model-parallel" group (all non-data ranks: tp x pp; it
all-reduces gradient norms and overflow flags there, and names checkpoint files mp_rank_XX by it)
under names megatron-core no longer has (`get_model_parallel_rank`, `get_model_parallel_world_size`).
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.topology import Topology

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SINGLE_PROCESS_ENV: dict[str, str] = {}  # what init_distributed set for a single process; destroy() unsets it


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str, device: str | torch.device | None = None) -> str:
    """`auto`: the backend of the device the ranks train on (`train.device`, resolved): nccl for
    cuda, gloo for cpu, so a CPU run on a GPU machine does not put its CPU tensors into NCCL. With
    no device given: nccl when CUDA is available, else gloo."""
    if backend == "auto":
        if device is not None:
            return "nccl" if torch.device(device).type == "cuda" else "gloo"
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; expected auto, gloo or nccl")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend nccl needs CUDA, and torch.cuda.is_available() is False; use gloo or auto")
    return backend


def check_parallel_sizes(world_size: int, tp: int, pp: int) -> int:
    """The data-parallel size world / (tp * pp); a clear error when that does not divide."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel ({tp}) and pipeline_parallel ({pp}) must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"tensor_parallel ({tp}) x pipeline_parallel ({pp}) = {tp * pp} does not divide the world size "
            f"{world_size}: launch a multiple of {tp * pp} processes or change the parallel sizes"
        )
    return world_size // (tp * pp)


def init_distributed(backend: str = "auto", tp: int = 1, pp: int = 1, timeout_s: float = 1800.0,
                     device: str | torch.device | None = None) -> Topology:
    """Initialise torch.distributed (unless already done, e.g. by deepspeed.init_distributed) and
    megatron-core's tensor/pipeline/data groups; return this process's Topology.

    Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK (torchrun, Slurm via our
    launcher). With none of them set it runs as a single process (rank 0 of 1, a free local port),
    so the same code path serves a laptop run. `device`: what the ranks train on, which `auto` picks
    the backend for (resolve_backend). The tp x pp check happens before any process group
    exists, so a bad layout fails fast on every rank instead of hanging in a collective."""
    backend = resolve_backend(backend, device)
    if dist.is_initialized():
        world = dist.get_world_size()
        check_parallel_sizes(world, tp, pp)
    else:
        present = [k for k in _ENV if k in os.environ]
        if present and len(present) != len(_ENV):
            missing = sorted(set(_ENV) - set(present))
            raise RuntimeError(f"distributed environment incomplete: {', '.join(missing)} unset (set by the launcher)")
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        check_parallel_sizes(world, tp, pp)
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ["MASTER_PORT"]) if present else _free_port()
        if not present:  # one process (e.g. ZeRO at launch.nproc=1): DeepSpeed asserts LOCAL_RANK is set
            _SINGLE_PROCESS_ENV.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR=addr,
                                       MASTER_PORT=str(port))
            os.environ.update(_SINGLE_PROCESS_ENV)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )

    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise RuntimeError(
                f"model-parallel groups already built with tp={have[0]}, pp={have[1]}; asked for tp={tp}, pp={pp} "
                "(call destroy(process_group=False) first)"
            )
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
            # extra gloo twins of the data-parallel groups serve megatron's own distributed
            # optimizer on GPUs; with a gloo backend they would only duplicate the groups
            create_gloo_process_groups=dist.get_backend() != "gloo",
        )
    return Topology.from_parallel_state()


def destroy(process_group: bool = True) -> None:
    """Forget megatron-core's groups and, unless process_group=False, the default process group
    (process_group=False lets one process rebuild a different tp/pp layout, as the tests do)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
    if process_group:
        for key in _SINGLE_PROCESS_ENV:
            os.environ.pop(key, None)
        _SINGLE_PROCESS_ENV.clear()


def _megatron(name: str):
    """A method of DeepSpeedMpu that returns megatron-core's `parallel_state.<name>()` (named one by one,
    not through __getattr__: DeepSpeed asks hasattr(mpu, ...) to choose code paths)."""

    def getter(self):
        from megatron.core import parallel_state as ps

        return getattr(ps, name)()

    getter.__name__ = name
    return getter


class DeepSpeedMpu:
    """What DeepSpeed 0.19.8 calls on `deepspeed.initialize(mpu=...)`, backed by megatron-core.

    Found by reading DeepSpeed's sources (runtime/engine.py, runtime/utils.py, runtime/zero/*,
    runtime/config.py, utils/groups.py, utils/bwc.py, runtime/model_checkpointing/utils.py):
    - "model parallel" = every non-data axis (tp x pp), as in DeepSpeed's own pipeline grid:
      gradient-norm and overflow all-reduces, checkpoint file names (mp_rank_XX), ZeRO-3.
      Parameters without `tensor_model_parallel=True` count in the norm on tp rank 0 only
      (ZeRO 1/2 ask `get_tensor_model_parallel_rank` for that), so replicated parameters are not
      counted tp times; `apply_tensor_parallel` marks every sharded parameter.
    - data parallel: the batch-size arithmetic, gradient all-reduce and ZeRO partitioning.
    - tensor/pipeline getters: `deepspeed.utils.bwc` prefers them to the legacy names.
    No sequence-parallel methods on purpose: DeepSpeed takes `initialize_sequence_parallel` to mean
    a DeepSpeed-Ulysses mpu and then ignores the data-parallel group.
    """

    # tensor, pipeline and data parallel: megatron-core's own getters, under the same names
    get_tensor_model_parallel_group = _megatron("get_tensor_model_parallel_group")
    get_tensor_model_parallel_rank = _megatron("get_tensor_model_parallel_rank")
    get_tensor_model_parallel_world_size = _megatron("get_tensor_model_parallel_world_size")
    get_tensor_model_parallel_src_rank = _megatron("get_tensor_model_parallel_src_rank")
    get_pipeline_model_parallel_group = _megatron("get_pipeline_model_parallel_group")
    get_pipeline_model_parallel_rank = _megatron("get_pipeline_model_parallel_rank")
    get_pipeline_model_parallel_world_size = _megatron("get_pipeline_model_parallel_world_size")
    get_data_parallel_group = _megatron("get_data_parallel_group")
    get_data_parallel_rank = _megatron("get_data_parallel_rank")
    get_data_parallel_world_size = _megatron("get_data_parallel_world_size")
    get_model_parallel_group = _megatron("get_model_parallel_group")

    # model parallel = tensor x pipeline
    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())
