"""MLflow tracking against a real `mlflow server` on 127.0.0.1: logging over HTTP, and a server that
goes away mid-run (training finishes; the buffered records are replayed after a restart, none lost)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.tracking import SPOOL_FILE, MlflowTracker, start_local_server, stop_local_server

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TINY = ["data.task.num_train=256", "data.task.num_val=32", "train.batch_size=16", "train.eval_batches=2",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    proc = start_local_server(backend, tmp_path / "artifacts", port)
    handle = {"proc": proc, "port": port, "backend": backend, "artifacts": tmp_path / "artifacts"}
    yield handle
    stop_local_server(handle["proc"])


def launch_cmd(uri: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pretrain.launch", "--config", str(QUICKSTART), "--set", *TINY,
            f"tracking.uri={uri}", *extra]


def test_tracker_logs_over_http(server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{server['port']}"
    tracker = MlflowTracker(uri, "http-exp", "unused", tmp_path, "r1", params={"a.b": 1}, tags={"variant": "mdm"},
                            flush_interval=0.2)
    for step in range(1, 31):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.finish()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["a.b"] == "1" and run.data.tags["variant"] == "mdm"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted(h.step for h in history) == list(range(1, 31))
    assert not (tmp_path / SPOOL_FILE).exists()


@pytest.mark.slow
def test_server_stopped_mid_run_then_replayed(server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{server['port']}"
    steps, every, log_every = 60, 20, 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        launch_cmd(uri, [f"train.steps={steps}", f"train.eval_every={every}", f"train.log_every={log_every}"]),
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    run_dirs = tmp_path / "runs" / "quickstart"
    deadline = time.monotonic() + 120
    while not list(run_dirs.glob("*/mlflow_run_id")):  # the run exists on the server: now take it away
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    stop_local_server(server["proc"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]  # training finished without the server
    assert "unreachable" in err
    (run_dir,) = run_dirs.iterdir()
    assert (run_dir / SPOOL_FILE).is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps

    server["proc"] = start_local_server(server["backend"], server["artifacts"], server["port"])
    replay = subprocess.run([sys.executable, "-m", "pretrain.tracking", "replay", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert not (run_dir / SPOOL_FILE).exists()

    client = MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    loss_steps = sorted(h.step for h in client.get_metric_history(run_id, "train/loss"))
    assert loss_steps == list(range(log_every, steps + 1, log_every))  # none lost, none twice
    val = sorted(client.get_metric_history(run_id, "val/nll"), key=lambda m: m.step)
    assert [m.step for m in val] == [0, 20, 40, 60]
    assert val[-1].value == pytest.approx(summary["final_val_nll"])
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_only_rank0_creates_a_run_in_a_two_process_job(tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    proc = subprocess.run(launch_cmd(uri, ["launch.nproc=2", "train.steps=6", "train.eval_every=3",
                                           "train.log_every=1"]),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["layout"] == "dp2-tp1-pp1-zero0" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 7))


def test_first_launches_at_once_on_a_new_sqlite_store_all_succeed(tmp_path):
    """Three processes open a brand-new sqlite store at the same moment, as the launcher does (store
    preparation, then the tracker creating its run); without the lock MLflow's schema creation races
    and a process dies with "table ... already exists"."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    script = (
        "import sys, time\n"
        "from pretrain.tracking import MlflowTracker, prepare_store\n"
        "import mlflow.store.tracking.sqlalchemy_store\n"  # imports done before the start signal
        "start = float(sys.argv[1])\n"
        "while time.time() < start: time.sleep(0.001)\n"
        f"prepare_store({uri!r})\n"
        f"t = MlflowTracker({uri!r}, 'race', {str(tmp_path / 'art')!r}, sys.argv[2], sys.argv[2], {{}}, {{}})\n"
        "t.finish()\n"
        "print('run', t.run_id)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.time() + 8
    procs = []
    for i in range(3):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(start), str(run_dir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, out, err in results:
        assert code == 0 and out.startswith("run "), err[-2000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
