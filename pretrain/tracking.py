"""MLflow tracking of a run: rank 0 only, batched, asynchronous, never able to stall or kill training.

The embedded default is a local sqlite store (`sqlite:///mlruns.db`) with artifacts in `./mlruns`;
a cluster points `tracking.uri` at its server (`http://host:5000`).

- One MLflow call over HTTP costs ~20 ms (and a sqlite transaction as much CPU), so the training thread
  only puts records on a queue; a background thread sends what accumulated with `log_batch` once
  every `flush_interval` seconds (tracking.flush_interval_s).
- If the server cannot be reached, records go to `<run_dir>/mlflow_spool.jsonl` and a warning says
  so; the thread keeps trying, and when the server answers again the spool is replayed first, in
  order. Whatever is still spooled at the end is replayed on the next start of the run (a resume or
  requeue) or by `python -m pretrain.tracking replay RUN_DIR`.
- The MLflow run id lives in `<run_dir>/mlflow_run_id`, so a resumed run logs into the same run.
  If the server is down when the run starts, the run is created when it comes back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
RUN_INFO_FILE = "mlflow_run.json"  # what is needed to create the run later (offline start, replay)
SPOOL_FILE = "mlflow_spool.jsonl"
MAX_METRICS = 1000  # MLflow's limit of metrics per log_batch call
MAX_PARAMS = 100  # MLflow's limit of params per log_batch call
_STOP = object()


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """Commit and dirty flag of the code that runs (empty when not in a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return {"git.commit": commit.stdout.strip(), "git.dirty": str(bool(dirty.stdout.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def system_metrics() -> dict[str, float]:
    """Host (and GPU) resource use of this process, for the `system/` metrics."""
    out: dict[str, float] = {}
    try:
        import psutil

        proc = psutil.Process()
        out["system/rss_gb"] = proc.memory_info().rss / 2**30
        out["system/cpu_percent"] = psutil.cpu_percent(interval=None)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            out["system/gpu_mem_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
            out["system/gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except ImportError:
        pass
    return out


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///relative.db` or `sqlite:////absolute.db` URI, else None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


_prepared: set[str] = set()


def prepare_store(uri: str) -> None:
    """Create/migrate a local store once, under a file lock, before any process logs to it.

    MLflow creates and migrates a new sqlite store when a client first opens it; two processes doing
    that at once (two first launches in one directory, a launch beside `mlflow ui`) race in the schema
    creation and one dies with "table ... already exists". `fcntl.flock` on `<db>.lock` makes the
    first one create it while the others wait, then find it ready. Called by the launcher and by the
    tracker itself (the Slurm path has no launcher process)."""
    if _is_remote(uri) or uri in _prepared:
        return
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    else:
        import fcntl

        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (and if this process dies)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _prepared.add(uri)


def start_local_server(backend_uri: str, artifact_root: str | Path, port: int,
                       host: str = "127.0.0.1", timeout_s: float = 60.0) -> subprocess.Popen:
    """Start `mlflow server` on this machine (tests, benchmarks, a laptop) and wait until it answers.

    Job execution is switched off: it makes the server start in ~7 s with ~0.5 GB instead of ~1.5 GB.
    Stop it with `stop_local_server` (the server runs its workers in its own process group)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    artifact_uri = Path(artifact_root).resolve().as_uri()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--default-artifact-root", artifact_uri, "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    url = f"http://{host}:{port}/health"
    deadline = time.monotonic() + timeout_s
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server on port {port} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_local_server(proc)
    raise TimeoutError(f"mlflow server on port {port} did not answer {url} within {timeout_s:.0f} s")


def stop_local_server(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _quick_failing_http() -> None:
    # MLflow's HTTP client retries for minutes by default; we have our own retry loop and spool.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def dataset_input(source: str, shard_dir: str | Path, splits: dict[str, str | Path]) -> dict[str, Any]:
    """The run's data as an MLflow dataset input (`mlflow.data`'s Dataset, sent with log_inputs): named
    after the source, its digest the sha256 of the shards' checksums in the splits' index.json (the
    same shards give the same digest wherever they were built), with each split's tokens and documents."""
    import hashlib

    shas, profile = [], {}
    for split, d in splits.items():
        index = json.loads((Path(d) / "index.json").read_text())
        shas += [entry["sha256"] for entry in index["shards"]]
        profile[f"{split}_tokens"] = index["total_tokens"]
        profile[f"{split}_docs"] = index["total_docs"]
    profile["tokenizer"] = index["tokenizer_fingerprint"]
    return {"name": source, "digest": hashlib.sha256("".join(shas).encode()).hexdigest()[:16],
            "source_type": "local" if "://" not in str(shard_dir) else str(shard_dir).split("://")[0],
            "source": json.dumps({"uri": str(shard_dir)}), "profile": json.dumps(profile), "context": "training"}


class MlflowSender:
    """The MLflow calls of one run, made from one thread: create/reopen the run, send, spool, replay."""

    def __init__(self, run_dir: str | Path, uri: str | None = None) -> None:
        _quick_failing_http()
        from mlflow.tracking import MlflowClient  # imported lazily: ~1.5 s, and only rank 0 needs it

        self.run_dir = Path(run_dir)
        info_file = self.run_dir / RUN_INFO_FILE
        if not info_file.is_file():
            raise FileNotFoundError(f"{self.run_dir} has no {RUN_INFO_FILE}: it is not a tracked run directory")
        self.info = json.loads(info_file.read_text())
        self.uri = uri or self.info["uri"]
        prepare_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.spool = self.run_dir / SPOOL_FILE
        self.run_id: str | None = None
        self.sent_metrics = 0

    @staticmethod
    def write_run_info(run_dir: Path, uri: str, experiment: str, run_name: str, artifact_location: str,
                       params: dict[str, Any], tags: dict[str, str]) -> None:
        info_file = run_dir / RUN_INFO_FILE
        if not info_file.is_file():  # a resumed run keeps what it was created with
            # start_time: when the run really started, for a run created later (offline start, replay)
            info = {"uri": uri, "experiment": experiment, "run_name": run_name,
                    "artifact_location": artifact_location, "params": {k: str(v) for k, v in params.items()},
                    "tags": tags, "start_time": int(time.time() * 1000)}
            info_file.write_text(json.dumps(info, indent=1))

    def ensure_run(self) -> None:
        if self.run_id is not None:
            return
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            log.info("MLflow: resuming run %s at %s", run_id, self.uri)
            return
        info = self.info
        exp = self.client.get_experiment_by_name(info["experiment"])
        if exp is None:
            location = None if _is_remote(self.uri) else Path(info["artifact_location"]).resolve().as_uri()
            exp_id = self.client.create_experiment(info["experiment"], artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=info["run_name"], tags=info["tags"],
                                     start_time=info.get("start_time"))
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in sorted(info["params"].items())]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(run.info.run_id, params=params[i : i + MAX_PARAMS])
        id_file.write_text(run.info.run_id + "\n")
        self.run_id = run.info.run_id
        log.info("MLflow: run %s (%s) in experiment %r at %s", info["run_name"], self.run_id, info["experiment"],
                 self.uri)

    def send(self, records: list) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(*m) for kind, payload in records if kind == "metrics" for m in payload]
        for i in range(0, len(metrics), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS])
        self.sent_metrics += len(metrics)
        for kind, payload in records:
            if kind == "tags":
                for k, v in payload.items():
                    self.client.set_tag(self.run_id, k, v)
            elif kind == "artifact":
                if Path(payload).is_file():
                    self.client.log_artifact(self.run_id, payload)
            elif kind == "artifacts":  # a directory, under artifact_path
                local_dir, artifact_path = payload
                if Path(local_dir).is_dir():
                    self.client.log_artifacts(self.run_id, local_dir, artifact_path)
            elif kind == "dataset":
                from mlflow.entities import Dataset, DatasetInput, InputTag

                d = payload
                dataset = Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"])
                tags = [InputTag("mlflow.data.context", d["context"])]
                self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])
            elif kind == "terminate":  # [status, end time in ms] (a bare status from older spools)
                status, end = (payload, None) if isinstance(payload, str) else payload
                self.client.set_terminated(self.run_id, status=status, end_time=end)

    def append_spool(self, records: list) -> None:
        if not records:
            return
        with open(self.spool, "a") as f:
            for kind, payload in records:
                f.write(json.dumps([kind, payload]) + "\n")

    def drop_stale_terminations(self) -> None:
        """A spooled end-of-run record belongs to an earlier process of this run; this one is running."""
        if self.spool.is_file():
            kept = [line for line in self.spool.read_text().splitlines() if line and json.loads(line)[0] != "terminate"]
            tmp = self.spool.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.spool)

    def replay_spool(self) -> int:
        """Send spooled records in order, removing what was sent from the spool as it goes."""
        if not self.spool.is_file():
            return 0
        lines = [json.loads(line) for line in self.spool.read_text().splitlines() if line.strip()]
        chunk = 200
        for i in range(0, len(lines), chunk):
            self.send([tuple(r) for r in lines[i : i + chunk]])
            tmp = self.spool.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in lines[i + chunk :]))
            os.replace(tmp, self.spool)
        self.spool.unlink(missing_ok=True)
        log.info("MLflow: replayed %d buffered records from %s", len(lines), self.spool)
        return len(lines)


class MlflowTracker:
    """The training thread's side: queue records; a background thread delivers them (or spools)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_location: str,
        run_dir: str | Path,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        flush_interval: float = 10.0,
        retry_interval: float = 5.0,
    ) -> None:
        run_dir = Path(run_dir)
        MlflowSender.write_run_info(run_dir, uri, experiment, run_name, artifact_location, params, tags)
        self.sender = MlflowSender(run_dir, uri)
        self.uri = uri
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.offline = False
        self._finished = False
        self._queue: queue.Queue = queue.Queue()
        self.sender.drop_stale_terminations()
        try:
            self.sender.ensure_run()
            self.sender.replay_spool()
        except Exception as e:  # the server is down: train anyway, spool, and retry in the background
            self._went_offline(e)
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        return self.sender.run_id

    # ------------------------------------------------------------------ the training thread's API
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._queue.put(("metrics", [[k, float(v), now, int(step)] for k, v in metrics.items()]))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue.put(("tags", {k: str(v) for k, v in tags.items()}))

    def log_artifact(self, path: str | Path) -> None:
        self._queue.put(("artifact", str(Path(path).resolve())))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self._queue.put(("artifacts", [str(Path(local_dir).resolve()), artifact_path]))

    def log_dataset(self, dataset: dict[str, Any]) -> None:
        """An input of the run (see `dataset_input`), shown in the MLflow UI's Datasets column."""
        self._queue.put(("dataset", dataset))

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Send everything queued (waiting up to `timeout` s), then mark the run ended (once: later
        calls, e.g. the trainer's safety net after its callback ended the run, do nothing)."""
        if self._finished:
            return
        self._finished = True
        self._queue.put(("terminate", [status, int(time.time() * 1000)]))  # the real end, even if replayed
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self.sender.spool.is_file():
            log.warning(
                "MLflow server %s unreachable: records kept in %s; they are replayed when this run resumes "
                "or with `python -m pretrain.tracking replay %s`", self.uri, self.sender.spool, self.sender.run_dir,
            )

    # ------------------------------------------------------------------ the background thread
    def _worker(self) -> None:
        """Collect records until the flush is due, then send them together (or spool them while the
        server is down); a stop request flushes at once."""
        records: list = []
        due = time.monotonic() + self.flush_interval
        stopping = False
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, due - time.monotonic()))
                if item is _STOP:
                    stopping = True
                else:
                    records.append(item)
            except queue.Empty:
                pass
            if not stopping and time.monotonic() < due:
                continue
            while True:  # everything queued by now goes out in the same batch
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    records.append(item)
            if records or self.sender.spool.is_file():
                self._deliver(records)
            records = []
            due = time.monotonic() + (self.retry_interval if self.offline else self.flush_interval)
            if stopping:
                return

    def _deliver(self, records: list) -> None:
        try:
            self.sender.ensure_run()
            self.sender.replay_spool()
            self.sender.send(records)
            if self.offline:
                log.warning("MLflow server %s reachable again: buffered records replayed", self.uri)
            self.offline = False
        except Exception as e:
            self.sender.append_spool(records)
            self._went_offline(e)

    def _went_offline(self, e: Exception) -> None:
        if not self.offline:
            log.warning("MLflow server %s unreachable (%s): training continues, records are buffered in %s",
                        self.uri, type(e).__name__, self.sender.spool)
        self.offline = True


def replay(run_dir: str | Path, uri: str | None = None) -> int:
    """Send a run's spooled records (after the server is back); returns how many were replayed."""
    sender = MlflowSender(run_dir, uri)
    sender.ensure_run()
    return sender.replay_spool()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.tracking", description="MLflow tracking utilities.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="send a run's buffered records once its tracking server is reachable")
    r.add_argument("run_dir", help="the run directory (holds mlflow_spool.jsonl)")
    r.add_argument("--uri", help="tracking URI to send to (default: the one the run used)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        n = replay(args.run_dir, args.uri)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"replayed {n} records from {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
