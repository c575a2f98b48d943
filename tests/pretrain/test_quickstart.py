"""The quickstart is quick (issue 20 item 6): samples are decoded only as `tracking.log_samples` and
`tracking.samples_every` ask, and a finished launch ends with the commands to run next on that run."""

import shlex
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.launch import main as launch
from pretrain.launch import mlflow_ui_hint

REPO = Path(__file__).resolve().parents[2]
TINY = ["train.steps=4", "train.eval_every=2", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
        "train.batch_size=4", "train.eval_batches=1", "data.task.num_train=32", "data.task.num_val=8"]


def _launch(root: Path, *overrides: str) -> Path:
    assert launch(["--log-level", "WARNING", "--config", str(REPO / "configs/quickstart.yaml"), "--set", *TINY,
                   f"data.shard_dir={root.parent / 'shards'}", f"launch.output_dir={root / 'runs'}",
                   f"tracking.uri=sqlite:///{root / 'mlruns.db'}", f"tracking.artifact_location={root / 'mlruns'}",
                   *overrides]) == 0
    (run,) = (root / "runs" / "quickstart").iterdir()
    return run


def test_a_finished_launch_ends_with_the_next_commands_for_its_run_and_decodes_no_sample_when_off(
        tmp_path, capsys, monkeypatch):
    from pretrain.generate import main as generate

    monkeypatch.chdir(tmp_path)
    run = _launch(tmp_path / "off", "tracking.log_samples=0")
    assert not (run / "samples").exists()  # log_samples=0: nothing decoded, at no evaluation
    out = capsys.readouterr().out
    tail = out[out.index("\nnext:\n"):]
    commands = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
                for line in tail.strip().splitlines()[1:]}
    assert set(commands) == {"evaluate", "generate", "export", "compare", "MLflow"}
    assert commands["evaluate"] == f"python -m pretrain.evaluate --run {run}"
    assert commands["compare"] == f"python -m pretrain.compare --uri sqlite:///{tmp_path / 'off/mlruns.db'} " \
                                  "--experiment quickstart"
    assert commands["MLflow"].startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'off/mlruns.db'}")
    # the run directory keeps what the console showed: the plan, the log, each logged step's loss, the end
    log = (run / "train.log").read_text()
    for shown in ("# plan", "validation NLL", "step 1/4: loss ", "next:", commands["generate"]):
        assert shown in log, shown
    # the printed generate command works on the run just made: it answers the validation prompt it names
    argv = shlex.split(commands["generate"])
    assert argv[:4] == ["python", "-m", "pretrain.generate", "--run"]
    assert generate(argv[3:]) == 0
    prompt = argv[argv.index("--prompt") + 1]
    assert capsys.readouterr().out.startswith(prompt)


def test_samples_are_decoded_only_at_the_cadence_asked_and_as_many_as_asked(tmp_path):
    run = _launch(tmp_path / "final", "tracking.log_samples=2", "tracking.enabled=false")
    # evaluations at steps 0, 2 and 4; samples_every=0: only the final one decodes, 2 prompts
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000004.txt"]
    assert (run / "samples" / "step_0000004.txt").read_text().count("prompt: ") == 2
    run = _launch(tmp_path / "every", "tracking.log_samples=1", "tracking.samples_every=2", "tracking.enabled=false")
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.txt", "step_0000004.txt"]


def test_samples_every_must_fall_on_an_evaluation():
    with pytest.raises(ConfigError, match="tracking.samples_every.*multiple of train.eval_every"):
        load_config(REPO / "configs/quickstart.yaml", ["train.eval_every=100", "tracking.samples_every=150"])


def test_the_mlflow_hint_opens_a_tracking_server_and_starts_a_ui_on_a_local_store():
    assert mlflow_ui_hint("http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser (the tracking server's UI)"
    assert mlflow_ui_hint("sqlite:///mlruns.db") == "mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1"
