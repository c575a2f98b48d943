"""The login-node side of `pretrain.launch` with the slurm backend: choose it, describe it, submit, watch.

    backend, why = choose_backend(cfg)            # auto -> slurm only when Slurm answers and is needed
    print(dry_run_text(cfg, run_dir, run_name))   # --dry-run: submitit parameters + sbatch header
    code = submit_training(cfg, run_dir, run_name, wait=False)
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common.config_file import ConfigError
from data_pipeline.build import check_config, is_complete, resolve_shard_dir
from data_pipeline.sources import DataSourceError, local_files
from pretrain.config import save_config
from pretrain.tracking import prepare_store
from slurm.cluster import (
    TERMINAL,
    SlurmError,
    array_task_ids,
    explain_failure,
    job_state,
    refuse_if_hopeless,
    slurm_answers,
)
from slurm.executor import (
    executor_parameters,
    make_executor,
    resource_hint,
    sbatch_header,
    snapshot_code,
    snapshot_dir,
    snapshot_setup,
    submit,
)


def local_capacity(device: str) -> tuple[int, str]:
    """How many ranks this machine can hold: its GPUs for a cuda run, else its CPU cores."""
    if device in ("cuda", "auto"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n or device == "cuda":
            return n, f"{n} GPU(s)"
    n = os.cpu_count() or 1
    return n, f"{n} CPU core(s)"


def choose_backend(cfg) -> tuple[str, str]:
    """(local | slurm, why) for launch.backend; `auto` picks Slurm when the job needs more than this
    machine has (several nodes, or more ranks than its GPUs/cores) and a Slurm controller answers."""
    lc = cfg.launch
    if lc.backend != "auto":
        return lc.backend, "launch.backend"
    have, what = local_capacity(cfg.train.device)
    if lc.nodes <= 1 and lc.nproc <= have:
        return "local", f"{lc.nproc} rank(s) fit on this machine ({what})"
    ok, why = slurm_answers()
    if not ok:
        if lc.nodes > 1:
            raise SlurmError(f"launch.nodes = {lc.nodes} needs Slurm, but {why}")
        return "local", f"needs more than this machine ({what}) but Slurm is not usable: {why}"
    return "slurm", f"needs {lc.nodes} node(s) x {lc.nproc} rank(s), more than this machine ({what})"


def gpus_per_node(cfg) -> int:
    g = cfg.launch.slurm.gpus_per_node
    return g if g >= 0 else (cfg.launch.nproc if cfg.train.device == "cuda" else 0)


def folder_for(cfg, run_dir: Path) -> Path:
    return Path(cfg.launch.slurm.folder).expanduser().resolve() if cfg.launch.slurm.folder else run_dir / "slurm"


def training_parameters(cfg, run_dir: Path, run_name: str, code_dir: Path | None) -> dict[str, Any]:
    lc = cfg.launch
    # a task that exits non-zero ends the whole step at once: without it the other ranks wait for the dead one
    # (for shards, then in the rendezvous) until parallel.timeout_s and the job sits RUNNING
    return executor_parameters(lc.slurm, nodes=lc.nodes, tasks_per_node=lc.nproc, gpus_per_node=gpus_per_node(cfg),
                               name=run_name, setup=snapshot_setup(code_dir), slurm_srun_args=["--kill-on-bad-exit=1"])


def preflight(cfg) -> None:
    """What the local launcher finds out before any rank starts, checked before submitting: the shards are
    built, or their source exists (a local path) and the build settings are valid. A SlurmError says what
    is wrong and that nothing was submitted."""
    d = cfg.data
    if is_complete(resolve_shard_dir(d)):
        return
    try:
        check_config(d)
        if not d.source.startswith(("task:", "hf:")):
            local_files(d.source)
        tok = d.tokenizer.partition(":")[2] if d.tokenizer.startswith("sentencepiece:") else ""
        if tok and not Path(tok).expanduser().exists():
            raise DataSourceError(f"data.tokenizer={d.tokenizer!r}: no such sentencepiece model file")
    except (ConfigError, DataSourceError) as e:
        raise SlurmError(f"not submitted: {e}") from None


def dry_run_text(cfg, run_dir: Path, run_name: str) -> str:
    run_dir = Path(run_dir).resolve()
    code = snapshot_dir(run_dir) if cfg.launch.slurm.snapshot else None
    params = training_parameters(cfg, run_dir, run_name, code)
    folder = folder_for(cfg, run_dir)
    lines = ["# submitit parameters (AutoExecutor.update_parameters)"]
    lines += [f"{k}: {v!r}" for k, v in params.items()]
    lines += [f"slurm_max_num_timeout: {cfg.launch.slurm.max_requeues}", "",
              "# equivalent sbatch header", sbatch_header(params, folder),
              "", f"# code snapshot: {code or 'off (runs the checkout as it is when the job starts)'}",
              f"# logs: {folder}/<job id>_<task>_log.out|err"]
    return "\n".join(lines)


def submit_training(cfg, run_dir: Path, run_name: str, wait: bool = False, log_level: str = "INFO") -> int:
    """Submit the training job; print its id, logs and how to follow them; with `wait`, its outcome."""
    from slurm.job import TrainJob

    preflight(cfg)
    run_dir = Path(run_dir).resolve()
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")  # the resolved config, as submitted (the job carries it too)
    if cfg.tracking.enabled:
        prepare_store(cfg.tracking.uri)  # create/migrate a local store once, before the ranks use it
    code_dir = snapshot_code(snapshot_dir(run_dir)) if cfg.launch.slurm.snapshot else None
    folder = folder_for(cfg, run_dir)
    params = training_parameters(cfg, run_dir, run_name, code_dir)
    executor = make_executor(folder, params, max_requeues=cfg.launch.slurm.max_requeues)
    try:
        job = submit(executor, TrainJob(cfg, str(run_dir), run_name, cfg.launch.slurm.max_requeues, log_level))
        refuse_if_hopeless(job.job_id, job.paths.submission_file)
    except SlurmError as e:
        raise SlurmError(_forget_refused(str(e), run_dir if created else None, code_dir)
                         + resource_hint(str(e), cfg.launch.slurm, cfg.launch.nproc)) from None
    out, err = log_paths(folder, job.job_id)
    print(
        f"submitted Slurm job {job.job_id}: {cfg.launch.nodes} node(s) x {cfg.launch.nproc} task(s), "
        f"time limit {cfg.launch.slurm.time_min} min, up to {cfg.launch.slurm.max_requeues} requeue(s)\n"
        f"run dir:  {run_dir}\n"
        + (f"code:     {code_dir}\n" if code_dir else "")
        + f"logs:     {out}\n          {err}\n"
        f"follow:   tail -f {err}   |   squeue -j {job.job_id}   |   cancel: scancel {job.job_id}",
        flush=True,
    )
    (run_dir / "slurm_job_id").write_text(f"{job.job_id}\n")
    if not wait:
        return 0
    n_tasks = cfg.launch.nodes * cfg.launch.nproc
    return wait_for(job.job_id, err, lambda: job.results()[0],  # task 0's return value
                    task_logs=[log_paths(folder, job.job_id, k)[1] for k in range(n_tasks)])


def launch(cfg, run_dir: Path, run_name: str, *, dry_run: bool = False, wait: bool = False,
           log_level: str = "INFO") -> int:
    """`launch.backend=slurm` for pretrain.launch: submit (or with dry_run describe) the training job;
    Slurm's refusals are reported, not raised."""
    if dry_run:
        print(dry_run_text(cfg, run_dir, run_name), flush=True)
        return 0
    try:
        return submit_training(cfg, run_dir, run_name, wait=wait, log_level=log_level)
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _forget_refused(message: str, run_dir: Path | None, code_dir: Path | None) -> str:
    """Nothing ran: remove the code snapshot, and the run directory when this submission created it (a
    later launch must not take it for a run to resume). The refused script's #SBATCH lines go into the
    message instead of its path, which is removed with the run directory."""
    if run_dir is None and code_dir is None:
        return message
    m = re.search(r"sbatch script: (\S+)", message)
    if m and run_dir is not None and Path(m.group(1)).is_file():
        header = [ln for ln in Path(m.group(1)).read_text().splitlines() if ln.startswith("#SBATCH")]
        message = message.replace(m.group(0), "the refused sbatch header:\n  " + "\n  ".join(header))
    for path in (code_dir, run_dir):
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
    return message


def log_paths(folder: Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    return folder / f"{job_id}_{task}_log.out", folder / f"{job_id}_{task}_log.err"


# searched anywhere in a line: srun writes into the batch log after a progress bar that ended without a newline
SRUN_FAILURE = re.compile(r"srun: error: (\S+): tasks? ([\d,\-]+): ([^\r\n]+)")


# what a rank logs when a peer it was talking to disappeared (gloo, NCCL, the TCP store)
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
             "remote process exited", "NCCL communicator was aborted")


def srun_failures(batch_log: Path | str) -> list[tuple[int, str, str]]:
    """(task, node, how it ended) from srun's own lines in the batch script's log, in the order srun saw the
    tasks end ("srun: error: dlmnode2: task 1: Killed", "... tasks 0,2-3: Exited with exit code 1")."""
    try:
        text = Path(batch_log).read_text(errors="replace")
    except OSError:
        return []
    out = []
    for m in SRUN_FAILURE.finditer(text):
        out += [(k, m.group(1), m.group(3).strip()) for k in array_task_ids(m.group(2))]
    return out


def failed_tasks(task_logs: list[Path]) -> list[tuple[int, str]]:
    """(task, the end of its log) for each task whose log ends in a Python error (submitit logs the traceback
    of a task that raised) or in an error line of its own (srun's and slurmstepd's lines, which land in task
    0's log, the batch script's, are not task 0's)."""
    out = []
    for k, path in enumerate(task_logs):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        tail = [ln for ln in text.strip().splitlines()[-60:] if not ln.startswith(("srun:", "slurmstepd"))][-40:]
        if any(ln.startswith("Traceback") or "error:" in ln.lower() for ln in tail):
            errors = [ln for ln in tail if ln and not ln.startswith((" ", "\t", "Traceback"))]
            out.append((k, "\n".join(errors[-4:])))
    return out


def first_failure(task_logs: list[Path]) -> tuple[int, str] | None:
    """(task, what to say) for the task that failed first, or None when no log shows a failure.

    srun's lines say which task ended first and on which node: on several nodes a task killed on one
    node takes down the others, which then log tracebacks of their own (a connection closed by the peer)
    that would otherwise be taken for the cause."""
    own = dict(failed_tasks(task_logs))
    srun = srun_failures(task_logs[0]) if task_logs else []
    if srun:
        k, node, how = srun[0]
        # a task whose own error is the lost connection to a peer is a consequence: when srun saw another task
        # die of a signal (killed, out of memory, segfault), that one is the cause, whatever srun reported first
        signalled = [f for f in srun if not f[2].startswith("Exited with exit code")]
        if signalled and k in own and any(m in own[k] for m in LOST_PEER):
            k, node, how = signalled[0]
        text = f"task {k} (rank {k}) on {node}: {how}" + (f"\n{own[k]}" if k in own else "")
    elif own:
        k = min(own)
        text = f"task {k} (rank {k}):\n{own[k]}"
    else:
        return None
    others = sorted(({t for t, _, _ in srun} | set(own)) - {k})
    if others:
        text += f"\n(also failed: task{'s' if len(others) > 1 else ''} {', '.join(str(t) for t in others)})"
    return k, text


def wait_for(job_id: str, log: Path, result=None, poll_s: float = 2.0, task_logs: list[Path] | None = None) -> int:
    """Poll until the job ends (a requeued job goes back to PENDING and is followed on); 0 if it completed.
    A job that failed is explained with Slurm's reason and exit code and, given `task_logs` (each task's
    stderr log), which task failed first and how."""
    last = None
    while True:
        state = job_state(job_id)
        if state != last:
            print(f"job {job_id}: {state}", flush=True)
            last = state
        if state in TERMINAL or state == "UNKNOWN":
            break
        time.sleep(poll_s)
    if state == "COMPLETED":
        if result is not None:
            try:
                value = result()
            except Exception as e:  # the job's own error, as submitit recorded it
                print(f"error: {str(e).strip().splitlines()[-1] if str(e).strip() else e}\nlog: {log}",
                      file=sys.stderr)
                return 1
            if isinstance(value, dict) and "steps" in value:
                print(f"done: {value['steps']} steps, final validation NLL {value['final_val_nll']:.4f}", flush=True)
        return 0
    failed = first_failure(task_logs or [])
    if failed:
        k, why = failed
        print(f"error: in job {job_id}, the first task to fail was {why}\nits log: {task_logs[k]}", file=sys.stderr)
    print(f"error: {explain_failure(job_id, log)}", file=sys.stderr)
    return 1
