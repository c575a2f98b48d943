"""MLflow as users know it (issue 20 item 5), against real stores: run names that say what differs, a
replayed run's real start and end times (an http server on 127.0.0.1 that is down while the run trains)."""

import socket
import time

from pretrain.config import descriptive_run_name, load_config, recipe_defaults
from pretrain.launch import name_the_run
from pretrain.tracking import SPOOL_FILE, MlflowTracker, replay, start_local_server, stop_local_server

QUICKSTART = "configs/quickstart.yaml"


def test_run_names_say_recipe_seed_and_the_overridden_keys(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    recipe = recipe_defaults(QUICKSTART)

    def name(*overrides):
        return descriptive_run_name(load_config(QUICKSTART, list(overrides)), recipe)

    plain = name()
    assert plain.startswith("quickstart-s0-") and len(plain.split("-")) == 3
    assert name("seed=3", "train.lr=0.0003").startswith("quickstart-s3-lr=0.0003-")
    # what only changes the run's length or where it is tracked keeps the name: extending resumes the run
    assert name("train.steps=800", "tracking.experiment=x", "launch.nproc=1") == plain
    assert name("model.n_layers=2") != name("model.n_layers=3")
    many = name(*[f"data.task.num_train={n}" for n in (5,)], "model.d_model=64", "model.n_layers=2",
                "model.n_heads=2", "train.batch_size=8", "train.lr=0.002", "train.warmup_steps=3")
    assert many.startswith("quickstart-s0-7changes-")
    # an existing run directory of the older <recipe>-<hash> name keeps resuming under that name
    cfg = load_config(QUICKSTART, [f"launch.output_dir={tmp_path}"])
    from pretrain.config import config_hash

    legacy = tmp_path / "quickstart" / f"quickstart-{config_hash(cfg)}"
    legacy.mkdir(parents=True)
    name_the_run(cfg, QUICKSTART)
    assert cfg.launch.run_name == legacy.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_replayed_after_the_server_came_back_keeps_its_real_start_and_end_times(tmp_path):
    from mlflow.tracking import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"  # no server yet: the run trains offline
    started = int(time.time() * 1000)
    tracker = MlflowTracker(uri, "offline", "unused", tmp_path, "r", params={"a": 1}, tags={}, flush_interval=0.1,
                            retry_interval=60)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.finish("FINISHED", timeout=10)
    ended = int(time.time() * 1000)
    assert (tmp_path / SPOOL_FILE).is_file() and tracker.run_id is None
    time.sleep(1.0)  # the replay is later than the run: its times must not be taken
    proc = start_local_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", port, timeout_s=300)
    try:
        replayed_at = int(time.time() * 1000)
        assert replay(tmp_path) == 2  # the metrics, and the end of the run
        run_id = (tmp_path / "mlflow_run_id").read_text().strip()
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    finally:
        stop_local_server(proc)
    assert run.info.status == "FINISHED"
    assert started <= run.info.start_time <= run.info.end_time <= ended < replayed_at


def test_the_dataset_is_a_run_input_with_the_shards_digest_and_the_model_is_logged_when_asked(tmp_path, monkeypatch):
    """sqlite store: the run's data is an MLflow dataset input whose digest comes from the shards'
    checksums; tracking.log_model=hf logs the Hugging Face export as the run's model/; the run's name
    says recipe, seed and the overridden keys."""
    import hashlib
    import json
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from pretrain.launch import main as launch

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert launch(["--log-level", "WARNING", "--config", str(repo / QUICKSTART), "--set", "train.steps=2",
                   "train.eval_every=2", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                   "train.batch_size=4", "train.eval_batches=1", "data.task.num_train=32", "data.task.num_val=8",
                   "tracking.log_samples=0", "tracking.log_model=hf", f"tracking.uri={uri}",
                   f"tracking.artifact_location={tmp_path / 'mlruns'}"]) == 0
    (run_dir,) = (tmp_path / "runs" / "quickstart").iterdir()
    assert run_dir.name.startswith("quickstart-s0-7changes-")  # seven keys away from the recipe
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.run_name == run_dir.name
    (shards,) = (tmp_path / "data" / "shards").iterdir()
    shas = [e["sha256"] for split in ("train", "val")
            for e in json.loads((shards / split / "index.json").read_text())["shards"]]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "task:sudoku"
    assert dataset.dataset.digest == hashlib.sha256("".join(shas).encode()).hexdigest()[:16]
    assert json.loads(dataset.dataset.profile)["train_docs"] == 32
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/modeling_dlm.py"} <= logged
