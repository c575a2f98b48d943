"""submitit executors from `launch.slurm`, the equivalent sbatch header, and the code snapshot.

    params = executor_parameters(cfg.launch.slurm, nodes=2, tasks_per_node=8, gpus_per_node=8, name="run")
    executor = make_executor(folder, params, max_requeues=3, snapshot=code_dir)
    job = submit(executor, fn)          # SlurmError with sbatch's own message when Slurm refuses

`params` are AutoExecutor's names (generic ones like `timeout_min`, Slurm-only ones prefixed `slurm_`);
`sbatch_header` renders them with submitit's own sbatch writer, so `--dry-run` shows exactly the
header a submission would write.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.config import SlurmConfig
from slurm.cluster import SlurmError, use_scontrol_states

# the packages a job imports from the snapshot (pyproject's package set)
PACKAGES = ("common", "pretrain", "data_pipeline", "parallel", "slurm")
REPO = Path(__file__).resolve().parents[1]


def executor_parameters(s: SlurmConfig, *, nodes: int, tasks_per_node: int, gpus_per_node: int, name: str,
                        setup: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """AutoExecutor.update_parameters arguments for one job (empty settings are left to the cluster)."""
    p: dict[str, Any] = {
        "name": name,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": s.cpus_per_task,
        "timeout_min": s.time_min,
        "slurm_signal_delay_s": s.signal_delay_s,
    }
    if gpus_per_node > 0:
        p["gpus_per_node"] = gpus_per_node
    if s.mem_gb > 0:
        p["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            p[f"slurm_{key}"] = getattr(s, key)
    if s.exclusive:
        p["slurm_exclusive"] = True
    lines = [*(setup or []), *s.setup]
    if lines:
        p["slurm_setup"] = lines
    p.update(extra)
    return p


_GENERIC = {"name": "job_name", "timeout_min": "time", "tasks_per_node": "ntasks_per_node"}


def sbatch_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """AutoExecutor names -> the SlurmExecutor (sbatch) names submitit writes the header from."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k == "mem_gb":
            out["mem"] = f"{v}GB"
        elif k.startswith("slurm_"):
            out[k[len("slurm_"):]] = v
        else:
            out[_GENERIC.get(k, k)] = v
    return out


def sbatch_header(params: dict[str, Any], folder: str | Path, command: str = "python -u -m submitit.core._submit"
                  ) -> str:
    """The `#SBATCH` lines (and setup lines) submitit will write for these parameters."""
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command=command, folder=str(folder), **sbatch_parameters(params))
    return "\n".join(line for line in text.splitlines() if line.strip())


def snapshot_code(dest: Path) -> Path:
    """Copy the project's packages into `dest` (Meta lingua style): the job imports them from there, so
    editing the checkout while a job waits in the queue (or between requeues) cannot change it."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", ".*")
    for pkg in PACKAGES:
        src = REPO / pkg
        if src.is_dir():
            shutil.copytree(src, dest / pkg, ignore=ignore, dirs_exist_ok=True)
    return dest


def snapshot_dir(root: Path) -> Path:
    return root / "code" / time.strftime("%Y%m%d-%H%M%S")


def snapshot_setup(code_dir: Path | None) -> list[str]:
    """Setup lines that put the snapshot first on the job's import path."""
    if code_dir is None:
        return []
    return [f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}}"]


def python_command() -> str:
    """How the job starts Python: this interpreter; with -P (3.11+) the submission directory, which may be the
    checkout, does not shadow the snapshot on sys.path."""
    py = shlex.quote(sys.executable)
    return f"{py} -P" if sys.version_info >= (3, 11) else py


def make_executor(folder: Path, params: dict[str, Any], max_requeues: int = 3):
    import submitit

    use_scontrol_states()
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues,
                                     slurm_python=python_command())
    executor.update_parameters(**params)
    return executor


def slurm_message(e: BaseException) -> str:
    """sbatch's own words from a submitit submission error (no traceback)."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if "sbatch:" in ln or "error" in ln.lower()]
    # submitit repeats sbatch's stderr in its message: each line once, in order
    return "\n".join(dict.fromkeys(lines or text.splitlines()[-3:])) or type(e).__name__


# sbatch's words for a request no node of the partition can hold, and the settings that make the request
RESOURCE_REFUSALS = ("Requested node configuration is not available", "CPU count per node can not be satisfied",
                     "More processors requested than permitted", "Memory specification can not be satisfied",
                     "Node count specification invalid")


def resource_hint(message: str, slurm, tasks_per_node: int) -> str:
    """For a refusal about resources: which settings the request came from, and how to see what nodes have."""
    if not any(r in message for r in RESOURCE_REFUSALS):
        return ""
    return (f"\nthe job asks each node for {tasks_per_node} task(s) x launch.slurm.cpus_per_task={slurm.cpus_per_task}"
            f" CPUs" + (f", launch.slurm.mem_gb={slurm.mem_gb} GB" if getattr(slurm, "mem_gb", 0) else "")
            + ": lower them (e.g. --set launch.slurm.cpus_per_task=1); `sinfo -N -o '%N %c %m %G'` shows each node's"
            " CPUs, memory (MB) and GPUs")


def _quiet_sbatch():
    """submitit prints a refused sbatch's stderr itself before raising it: the SlurmError carries those words,
    so they would be shown twice."""
    import io

    return contextlib.redirect_stderr(io.StringIO())


@contextlib.contextmanager
def _refusal(executor, what: str):
    """sbatch quiet; Slurm's refusal (bad partition, impossible request) of `what` as a SlurmError."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        with _quiet_sbatch():
            yield
    except (FailedJobError, FailedSubmissionError) as e:
        raise SlurmError(f"Slurm refused the {what}: {slurm_message(e)}\n"
                         f"sbatch script: {_last_script(executor)}") from None


def submit(executor, fn, *args):
    """executor.submit, with Slurm's refusal (bad partition, impossible request) as a SlurmError."""
    with _refusal(executor, "job"):
        return executor.submit(fn, *args)


def submit_array(executor, fn, *iterables):
    with _refusal(executor, "job array"):
        return executor.map_array(fn, *iterables)


def _last_script(executor) -> str:
    """The sbatch script submitit wrote for a refused submission (kept as .submission_file_*.sh)."""
    folder = Path(str(executor.folder))
    scripts = sorted(folder.glob(".submission_file_*.sh"), key=lambda p: p.stat().st_mtime)
    return str(scripts[-1]) if scripts else str(folder)
