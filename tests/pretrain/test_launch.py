"""The single entry point, run as users run it: `python -m pretrain.launch` in a subprocess.

The quickstart path at tiny size exercises every stage: task generation -> shards -> training ->
validation NLL -> checkpoint -> MLflow (a real local sqlite store).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

TINY = [
    "data.task.num_train=256", "data.task.num_val=32", "train.steps=40", "train.eval_every=20",
    "train.batch_size=16", "train.eval_batches=2", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
    "train.log_every=5", "tracking.samples_every=20",
]


def launch(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pretrain.launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    proc = launch(["--config", str(QUICKSTART), "--set", *TINY], cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd, proc


def test_quickstart_trains_and_lowers_validation_nll(tiny_run):
    cwd, proc = tiny_run
    m = re.search(r"validation NLL: ([\d.]+) at step 0 -> ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    initial, final = float(m.group(1)), float(m.group(2))
    assert final < initial
    (run_dir,) = (cwd / "runs" / "quickstart").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 16 * 168
    assert summary["final_val_nll"] == pytest.approx(final, abs=1e-4)
    assert summary["device"] == "cpu" and summary["dtype"] == "fp32"
    assert (run_dir / "config.yaml").is_file()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_0000040" and (run_dir / "checkpoints" / latest / "model.pt").is_file()
    shards = list((cwd / "data" / "shards").glob("*/train/index.json"))
    assert len(shards) == 1


def test_quickstart_metrics_land_in_mlflow(tiny_run):
    from mlflow.tracking import MlflowClient

    cwd, _ = tiny_run
    (run_dir,) = (cwd / "runs" / "quickstart").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns.db'}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.variant"] == "mdm" and run.data.tags["variant"] == "mdm"
    history = client.get_metric_history(run.info.run_id, "val/nll")
    assert [h.step for h in history] == [0, 20, 40]
    assert history[0].value == pytest.approx(summary["initial_val_nll"])
    assert history[-1].value == pytest.approx(summary["final_val_nll"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 40 // 5
    # generations at every tracking.samples_every steps (not the untrained model's): text files and
    # artifacts, and the task's metrics under the names pretrain.evaluate logs
    samples = (run_dir / "samples" / "step_0000040.txt").read_text()
    assert samples.count("prompt: ") == 3 and samples.count("answer: ") == 3
    assert [h.step for h in client.get_metric_history(run.info.run_id, "task/cell_acc")] == [20, 40]
    assert not any(k.startswith("sample/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"step_0000040.txt", "config.yaml"} <= artifacts


def test_rerun_resumes_the_finished_run_into_the_same_mlflow_run(tiny_run):
    from mlflow.tracking import MlflowClient

    cwd, first = tiny_run
    proc = launch(["--config", str(QUICKSTART), "--set", *TINY], cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    assert re.search(r"done: 40 steps", proc.stdout)
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns.db'}")
    exp = client.get_experiment_by_name("quickstart")
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_dry_run_prints_resolved_config_and_plan(tmp_path):
    proc = launch(["--config", str(REPO / "configs" / "lm1b_bell.yaml"), "--dry-run"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "time_sampler: bell" in proc.stdout and "source: hf:lm1b" in proc.stdout
    assert "# plan" in proc.stdout and "will be built first" in proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_unknown_key_fails_with_closest_key(tmp_path):
    proc = launch(["--config", str(REPO / "configs" / "lm1b_bell.yaml"), "--set", "model.n_layer=2", "--dry-run"],
                  tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "unknown key `model.n_layer`" in proc.stderr and "`model.n_layers`" in proc.stderr


def test_lm1b_offline_fails_fast_with_a_hint(tmp_path):
    start = time.monotonic()
    proc = launch(["--config", str(REPO / "configs" / "lm1b_bell.yaml"), "--set", "tracking.enabled=false"],
                  tmp_path, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "lm1b" in proc.stderr and "--set data.source=" in proc.stderr
    assert elapsed < 90
