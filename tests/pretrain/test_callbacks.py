"""The callbacks' hooks as the real loop calls them (issue 21 item 4): post_step comes after the step's
evaluation and checkpoint and says which of them happened, so no callback recomputes the schedule."""

from pathlib import Path

from parallel.topology import Topology
from pretrain.callbacks import Callback, CheckpointCallback, StepInfo
from pretrain.config import load_config
from pretrain.train import Trainer

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list = []

    def on_step_end(self, trainer, metrics) -> None:
        self.events.append(("step", trainer.state.step))

    def on_eval_end(self, trainer, metrics) -> None:
        self.events.append(("eval", trainer.state.step))

    def post_step(self, trainer, info: StepInfo) -> None:
        # what the loop reports is what is on disk and in the log
        assert (trainer.run_dir / "checkpoints" / f"step_{info.step:07d}").is_dir() == info.checkpointed
        self.events.append(("post", info))


def test_post_step_follows_the_evaluation_and_checkpoint_and_reports_them(tmp_path):
    cfg = load_config(QUICKSTART, [
        "data.task.num_train=32", "data.task.num_val=8", "train.batch_size=4", "train.eval_batches=1",
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.steps=4", "train.eval_every=2",
        "train.checkpoint_every=3", "tracking.enabled=false", "train.device=cpu",
        f"data.shard_dir={tmp_path / 'shards'}"])
    rec = Recorder()
    Trainer(cfg, tmp_path / "run", Topology(), [CheckpointCallback(), rec]).fit()
    assert rec.events == [
        ("eval", 0),  # the untrained model's validation: no step, no post_step
        ("step", 1), ("post", StepInfo(1, evaluated=False, checkpointed=False, final=False)),
        ("step", 2), ("eval", 2), ("post", StepInfo(2, evaluated=True, checkpointed=False, final=False)),
        ("step", 3), ("post", StepInfo(3, evaluated=False, checkpointed=True, final=False)),
        ("step", 4), ("eval", 4), ("post", StepInfo(4, evaluated=True, checkpointed=False, final=True)),
    ]  # (the final checkpoint is written when the run ends, after the last post_step)


def test_the_stop_callback_imports_its_base_at_the_top_and_has_no_schedule_of_its_own():
    import inspect

    import pretrain.stop as stop

    assert issubclass(stop.StopCallback, Callback)
    source = inspect.getsource(stop)
    assert "eval_every" not in source and "checkpoint_every" not in source
    assert "from pretrain.train import" not in source
