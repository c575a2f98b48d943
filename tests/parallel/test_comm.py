"""Collectives go through parallel/comm.py: no module outside parallel/ calls torch.distributed."""

import re
from pathlib import Path

from parallel import comm

REPO = Path(__file__).resolve().parents[2]
CALL = re.compile(r"^\s*(import torch\.distributed|from torch import distributed|from torch\.distributed import)"
                  r"|\bdist\.(all_reduce|broadcast|barrier|all_gather|reduce_scatter|send|recv)\(", re.M)


def test_no_collective_outside_parallel():
    offenders = []
    for pkg in ("common", "pretrain", "data_pipeline", "slurm"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for m in CALL.finditer(path.read_text()):
                line = path.read_text()[: m.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert not offenders, f"collectives outside parallel/ (use parallel.comm): {offenders}"


def test_helpers_are_no_ops_on_one_process():
    import torch

    assert comm.all_reduce_max(3.0) == 3.0
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(comm.dp_sum(t), t.double()) and comm.dp_sum(t).dtype == torch.float64
    assert comm.from_last_stage(t, 0) is t
    comm.barrier()


# collectives parallel/ may call directly: the tensor-parallel all-gathers of activations and shards,
# whose tensors already live on the model's (= the group's) device
DIRECT_ALLOWED = {"tensor_parallel.py": {"all_gather"}}


def test_parallel_reduces_and_broadcasts_only_through_comm():
    """The engines' step agreements and gradient norms, the pipeline's broadcasts: all through comm.py,
    which moves each tensor to the group's device (NCCL refuses CPU tensors)."""
    op = re.compile(r"\bdist\.(all_reduce|broadcast|barrier|all_gather|reduce_scatter|send|recv)\(")
    offenders = []
    for path in sorted((REPO / "parallel").glob("*.py")):
        if path.name == "comm.py":
            continue
        text = path.read_text()
        for m in op.finditer(text):
            if m.group(1) not in DIRECT_ALLOWED.get(path.name, set()):
                offenders.append(f"{path.name}:{text[: m.start()].count(chr(10)) + 1} dist.{m.group(1)}")
    assert not offenders, f"collectives in parallel/ outside comm.py: {offenders}"


def test_backend_follows_the_training_device_not_cuda_availability(monkeypatch):
    import torch

    from parallel.state import resolve_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    assert resolve_backend("auto", "cpu") == "gloo"  # train.device=cpu there still runs on gloo
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "cpu") == "gloo"


def test_all_reduce_is_a_no_op_on_one_process_and_refuses_unknown_ops():
    import pytest
    import torch

    t = torch.tensor([2.0])
    assert comm.all_reduce(t, "max") is t
    with pytest.raises(ValueError, match="all_reduce op 'mean'"):
        comm.all_reduce(t, "mean")


def test_the_trainer_has_one_path_for_every_layout():
    """The engine hides the layout (issue 21 item 1): no branch on the engine kind, no process groups."""
    text = (REPO / "pretrain" / "train.py").read_text()
    for needle in ('kind == "pipeline"', "megatron", "torch.distributed", "parallel_state", "PipelineEngine",
                   "DeepSpeedEngine", "_pipeline_train_step"):
        assert needle not in text, f"pretrain/train.py mentions {needle!r}: route it through parallel/"
