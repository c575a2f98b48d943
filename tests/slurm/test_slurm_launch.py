"""pretrain.launch on a real single-node Slurm (the `slurm_cluster` fixture): a 2-task training job,
preemption (USR2) -> collective checkpoint -> requeue -> exact continuation, Slurm's refusals and
failures reported in Slurm's words; plus the backend choice and --dry-run, which need no cluster."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from pretrain.callbacks import read_metrics
from pretrain.config import load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STEPS = 30
TINY = [
    "data.task.num_train=256", "data.task.num_val=32", "train.batch_size=8", "train.eval_batches=1",
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", f"train.steps={STEPS}", "train.eval_every=15",
    "train.log_every=1", "train.device=cpu", "launch.nproc=2",
]
SLURM = ["launch.backend=slurm", "launch.slurm.cpus_per_task=1", "launch.slurm.time_min=10",
         "launch.slurm.signal_delay_s=60"]


def launch(cwd: Path, *sets: str, extra: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pretrain.launch", "--config", str(QUICKSTART), "--set", *sets, *extra]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=timeout)


def run_dir_of(cwd: Path) -> Path:
    (run_dir,) = (cwd / "runs" / "quickstart").iterdir()
    return run_dir


def assert_same_trajectory(run_dir: Path, ref_dir: Path) -> None:
    got, ref = read_metrics(run_dir), read_metrics(ref_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("train/loss", "train/grad_norm"):  # compared as text: bit for bit
            assert repr(got[step][key]) == repr(ref[step][key]), (step, key)
    assert read_metrics(run_dir, "eval")[STEPS]["val/nll"] == read_metrics(ref_dir, "eval")[STEPS]["val/nll"]


def mlflow_run(cwd: Path, run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return client, client.get_run(run_id)


def job_processes(job_id: str) -> dict[int, str]:
    """pid -> SLURM_NODEID:SLURM_PROCID of every process of the job's tasks, on every node (the namespaces
    share this machine's process table), without slurmstepd."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() == "slurmstepd":
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job_id and "SLURM_PROCID" in env:
            out[int(proc.name)] = f"{env.get('SLURM_NODEID')}:{env['SLURM_PROCID']}"
    return out


def usr2_pending(pid: int) -> bool:
    """Whether SIGUSR2 waits for process `pid` (stopped processes keep it pending until SIGCONT)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & (1 << (signal.SIGUSR2 - 1)) for m in masks)


def usr2_between_steps(job_id: str, run_dir: Path) -> tuple[int, dict[int, str]]:
    """Send USR2 to a running job where the test, not a race, decides: every process of the job (on every node)
    is stopped with SIGSTOP, USR2 is sent while they are stopped and, once every rank holds it (scancel returns
    before the nodes' slurmstepd deliver it), SIGCONT lets it arrive. So the run cannot finish before the
    signal, and at most the step in flight completes first. (`scontrol suspend` would do the stopping, but
    Slurm refuses to signal a suspended job.) Returns the last logged step when signalled, and the processes."""
    from slurm.cluster import job_info

    procs = job_processes(job_id)
    assert procs, job_info(job_id)
    for pid in procs:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.2)
        signalled_at = max(read_metrics(run_dir))
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        deadline = time.monotonic() + 20
        while {where for pid, where in procs.items() if usr2_pending(pid)} != set(procs.values()):
            assert time.monotonic() < deadline, "USR2 did not reach every rank of the job"
            time.sleep(0.05)
    finally:
        for pid in procs:
            os.kill(pid, signal.SIGCONT)
    return signalled_at, procs


def sbatch_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("#SBATCH"))


# ------------------------------------------------------------------------------------- real Slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_trains_like_the_local_launcher_and_logs_to_mlflow(slurm_cluster, shards, reference, tmp_path):
    sets = [*TINY, *SLURM, f"data.shard_dir={shards}"]
    dry = launch(tmp_path, *sets, extra=("--dry-run",))
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*_submission.sh"))

    t0 = time.monotonic()
    r = launch(tmp_path, *sets, extra=("--wait",))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "submitted Slurm job" in r.stdout and "tail -f" in r.stdout and "COMPLETED" in r.stdout
    run_dir = run_dir_of(tmp_path)
    job_id = (run_dir / "slurm_job_id").read_text().strip()
    # the job ran the code snapshot taken at submit time, and the sbatch header is the dry run's
    log = (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert f"code {run_dir.resolve()}/code/" in log, log[-2000:]
    submitted = (run_dir / "slurm" / f"{job_id}_submission.sh").read_text()
    assert sbatch_lines(dry.stdout) == sbatch_lines(submitted)
    assert_same_trajectory(run_dir, reference)
    client, run = mlflow_run(tmp_path, run_dir)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == STEPS
    assert run.data.tags.get("slurm.job_id") == job_id
    print(f"2-task Slurm job: {time.monotonic() - t0:.1f} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_continues_exactly(slurm_cluster, shards, reference, tmp_path):
    from slurm.cluster import job_info

    sets = [*TINY, *SLURM, f"data.shard_dir={shards}"]
    r = launch(tmp_path, *sets)  # returns once submitted
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    job_id = (run_dir / "slurm_job_id").read_text().strip()
    deadline = time.monotonic() + 180
    while max(read_metrics(run_dir), default=0) < 5:  # mid-training
        assert time.monotonic() < deadline, job_info(job_id)
        time.sleep(0.1)
    signalled_at, _ = usr2_between_steps(job_id, run_dir)
    assert signalled_at < STEPS - 5

    deadline = time.monotonic() + 240
    while (state := job_info(job_id).get("JobState")) != "COMPLETED":
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT"), job_info(job_id)
        assert time.monotonic() < deadline, job_info(job_id)
        time.sleep(1)
    assert job_info(job_id)["Restarts"] == "1"
    log = (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    # the checkpoint is taken at the step boundary the signal reached (the step in flight may finish first),
    # and the requeued job resumes exactly there
    saved = [int(m) for m in re.findall(r"checkpoint at step (\d+) written by all ranks", log)]
    assert len(saved) == 1 and saved[0] in (signalled_at, signalled_at + 1), (saved, signalled_at, log[-3000:])
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert resumed == saved, (resumed, saved, log[-3000:])
    assert_same_trajectory(run_dir, reference)  # the requeued job's lines win for steps logged twice
    client, run = mlflow_run(tmp_path, run_dir)  # one MLflow run across the requeue
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}) == \
        list(range(1, STEPS + 1))


@pytest.mark.slurm
def test_slurm_refusals_and_start_failures_are_reported_in_slurms_words(slurm_cluster, shards, tmp_path):
    sets = [*TINY, *SLURM, f"data.shard_dir={shards}", "tracking.enabled=false"]
    r = launch(tmp_path, *sets, "launch.slurm.partition=nosuchpartition")
    assert r.returncode == 1
    assert "invalid partition" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "#SBATCH --partition=nosuchpartition" in r.stderr, r.stderr  # what was refused, shown once
    assert r.stderr.count("invalid partition specified: nosuchpartition") == 1, r.stderr  # each sbatch line once
    left = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()] if (tmp_path / "runs").exists() else []
    assert not left, left  # no run directory or code snapshot left behind

    r = launch(tmp_path, *sets, "launch.slurm.cpus_per_task=512")
    assert r.returncode == 1
    assert "Requested node configuration is not available" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("Requested node configuration is not available") == 1, r.stderr
    assert "launch.slurm.cpus_per_task=512" in r.stderr and "sinfo" in r.stderr, r.stderr  # the setting to change

    r = launch(tmp_path, *sets, 'launch.slurm.setup=["echo no such module >&2", "exit 3"]', extra=("--wait",))
    assert r.returncode == 1
    assert "FAILED" in r.stderr and "exit code 3:0" in r.stderr and "_0_log.err" in r.stderr, r.stderr
    assert "no such module" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_a_rank_that_fails_at_start_ends_the_job_at_once_with_its_reason(slurm_cluster, tmp_path):
    # rank 0 fails building the shards (a line that is not UTF-8: the source exists, so the pre-submit check
    # passes); rank 1 would wait for the shards until parallel.timeout_s: the job must end at once instead
    source = tmp_path / "corpus.txt"
    source.write_bytes(b"a first line of text\n\xff\xfe this line is not UTF-8\n")
    sets = [*TINY, *SLURM, "tracking.enabled=false", f"data.source={source}", "data.tokenizer=sentencepiece",
            "data.vocab_size=64", f"data.shard_dir={tmp_path / 'shards'}", "parallel.timeout_s=600"]
    t0 = time.monotonic()
    r = launch(tmp_path, *sets, extra=("--wait",), timeout=240)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "task 0 (rank 0)" in r.stderr and "UTF-8" in r.stderr and "_0_log.err" in r.stderr, r.stderr[-3000:]
    assert elapsed < 120, f"the failed job took {elapsed:.0f} s to end (parallel.timeout_s is 600)"
    from slurm.cluster import job_info

    info = job_info((run_dir_of(tmp_path) / "slurm_job_id").read_text().strip())
    ran = datetime.fromisoformat(info["EndTime"]) - datetime.fromisoformat(info["StartTime"])
    assert ran.total_seconds() < 60, f"the job ran {ran} after its rank 0 failed at start: {info}"

    # and what the local path checks is checked before submitting: nothing is submitted for a missing source
    r = launch(tmp_path, *sets[:-3], f"data.source={tmp_path / 'missing.txt'}", "data.tokenizer=sentencepiece")
    assert r.returncode == 2 and "data.source" in r.stderr and "missing.txt" in r.stderr, r.stderr[-2000:]
    assert "submitted Slurm job" not in r.stdout


@pytest.mark.slurm
def test_auto_backend_picks_slurm_only_when_the_job_does_not_fit_here(slurm_cluster):
    from slurm.submit import choose_backend

    assert choose_backend(load_config(QUICKSTART, ["launch.backend=auto"]))[0] == "local"
    many = load_config(QUICKSTART, ["launch.backend=auto", "launch.nproc=4096", "train.batch_size=4096"])
    assert choose_backend(many)[0] == "slurm"


# ------------------------------------------------------------------------------------- no cluster needed
def test_auto_backend_does_not_trust_srun_without_a_controller(tmp_path, monkeypatch):
    from slurm.cluster import SlurmError
    from slurm.submit import choose_backend

    many = load_config(QUICKSTART, ["launch.backend=auto", "launch.nproc=4096", "train.batch_size=4096"])
    monkeypatch.setenv("PATH", str(tmp_path))
    backend, why = choose_backend(many)
    assert backend == "local" and "sbatch is not on the PATH" in why
    for tool in ("sbatch", "srun", "sinfo"):  # installed clients, no controller answering
        (tmp_path / tool).write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
        (tmp_path / tool).chmod(0o755)
    backend, why = choose_backend(many)
    assert backend == "local" and "Unable to contact slurm controller" in why
    with pytest.raises(SlurmError, match="launch.nodes = 2 needs Slurm"):
        choose_backend(load_config(QUICKSTART, ["launch.backend=auto", "launch.nodes=2"]))


def test_dry_run_prints_submitit_parameters_and_sbatch_header(tmp_path):
    r = launch(tmp_path, "launch.backend=slurm", "launch.nodes=2", "launch.nproc=8", "train.device=cuda",
               "launch.slurm.partition=gpu", "launch.slurm.account=lm", "launch.slurm.qos=high",
               "launch.slurm.constraint=h100", "launch.slurm.exclusive=true", "launch.slurm.mem_gb=500",
               'launch.slurm.setup=["module load cuda/12.4"]', extra=("--dry-run",), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lm", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --mem=500GB",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=60", "module load cuda/12.4",
                 "slurm_partition: 'gpu'", "tasks_per_node: 8"):
        assert line in r.stdout, line
    assert not (tmp_path / "runs").exists()  # nothing submitted, nothing written


def test_master_port_is_shared_by_all_tasks_and_moves_on_requeue():
    from slurm.job import master_port

    assert master_port("1234") == master_port("1234")
    assert master_port("1234", restart=1) != master_port("1234")
    assert all(20000 <= master_port(str(j), r) < 40000 for j in range(0, 10**6, 9973) for r in range(3))


@pytest.mark.slurm
def test_data_build_array_job_writes_the_same_shards_as_a_local_build(slurm_cluster, tmp_path):
    from data_pipeline.build import build
    from data_pipeline.config import load_data_config

    data = ["data.task.num_train=600", "data.task.num_val=64", "data.shard_size_mb=0.02"]
    local = tmp_path / "local"
    build(load_data_config(QUICKSTART, [*data, f"data.shard_dir={local}"]), workers=1, progress=False)
    remote = tmp_path / "slurm"
    sets = [f"--set={s}" for s in (*data, f"data.shard_dir={remote}", "launch.slurm.cpus_per_task=1",
                                   "launch.slurm.time_min=10", "launch.slurm.signal_delay_s=60")]
    r = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--config", str(QUICKSTART), *sets,
                        "--slurm", "2", "--wait"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "submitted build array" in r.stdout and "merge job" in r.stdout and "preparation job" in r.stdout
    def content(root: Path) -> list[Path]:  # shards, indexes, tokenizer (not the per-part build manifests)
        return sorted(p.relative_to(root) for p in root.rglob("*")
                      if p.is_file() and p.name != "build.json" and not p.name.startswith("part-"))

    files = content(local)
    assert len([f for f in files if f.name.startswith("shard-")]) >= 4, files  # several shards over 2 parts
    assert files == content(remote)
    assert len(list(remote.rglob("part-*-of-00002.json"))) >= 2  # it was built as 2 parts
    for f in files:
        assert (local / f).read_bytes() == (remote / f).read_bytes(), f
    fields = [json.loads((d / "build.json").read_text()).get("fields") for d in (local, remote)]
    assert fields[0] == fields[1]
