"""Collectives go through parallel/comm.py: no module outside parallel/ calls torch.distributed."""

import re
from pathlib import Path

from parallel import comm

REPO = Path(__file__).resolve().parents[2]
CALL = re.compile(r"^\s*(import torch\.distributed|from torch import distributed|from torch\.distributed import)"
                  r"|\bdist\.(all_reduce|broadcast|barrier|all_gather|reduce_scatter|send|recv)\(", re.M)


def test_no_collective_outside_parallel():
    offenders = []
    for pkg in ("pretrain", "data_pipeline", "slurm"):
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
