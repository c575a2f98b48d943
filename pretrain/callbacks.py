"""The trainer's callbacks (OLMo-core style): everything optional around the loop lives here.

Per optimizer step the loop calls, in this order:

    on_step_end(metrics)      the step's metrics (CheckpointCallback writes a due periodic checkpoint)
    on_eval_end(metrics)      when an evaluation was due at this step, after it
    post_step(info)           last: `info` says whether this step was evaluated and checkpointed and
                              whether it is the final step, so a callback that acts between steps (the
                              stop/preemption callback) does not recompute the loop's schedule

plus on_train_start, on_step_skipped (a non-finite step) and on_train_end(status).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pretrain import checkpoint as ckpt
from pretrain.convert import export_hf
from pretrain.evaluate import task_metrics
from pretrain.sample import SamplerConfig, generate
from pretrain.tracking import dataset_input, system_metrics

if TYPE_CHECKING:
    from pretrain.train import Trainer

log = logging.getLogger(__name__)
progress = logging.getLogger("pretrain.progress")  # the progress bar's numbers, for train.log only (launch)
progress.propagate = False  # the bar shows them on the console


@dataclass(frozen=True)
class StepInfo:
    """What the loop did at the end of optimizer step `step` (post_step's argument)."""

    step: int
    evaluated: bool  # the validation pass ran after this step
    checkpointed: bool  # a checkpoint of this very step is on disk
    final: bool  # the step budget is reached: the run ends here (with its final checkpoint)


class Callback:
    """Hooks the trainer calls; override what you need."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_step_skipped(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...  # non-finite
    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def post_step(self, trainer: Trainer, info: StepInfo) -> None: ...  # after evaluation and checkpoint
    def on_train_end(self, trainer: Trainer, status: str) -> None: ...


class ProgressCallback(Callback):
    """Rank 0's progress bar: step, loss, tokens/s, ETA; evaluations go to the log."""

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.state.step, desc="train",
                        unit="step", mininterval=1.0, dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.bar.update(1)
        # the first step's loss at once (a new user sees it train), then every log_every steps
        if trainer.state.step % trainer.cfg.train.log_every == 0 or trainer.state.step == trainer.start_step + 1:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}",
                                 val_nll=f"{trainer.state.last_val_nll:.4f}", refresh=False)
            progress.info("step %d/%d: loss %.4f, %.0f tokens/s, validation NLL %.4f", trainer.state.step,
                          trainer.cfg.train.steps, metrics["train/loss"], metrics["train/tokens_per_s"],
                          trainer.state.last_val_nll)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        log.info("step %d: validation NLL %.4f nats/token (ppl %.3f)", trainer.state.step, metrics["val/nll"],
                 metrics["val/ppl"])

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        if hasattr(self, "bar"):  # absent when the run failed before it started (e.g. its resume)
            self.bar.close()


class CheckpointCallback(Callback):
    """Checkpoint every `checkpoint_every` steps and at the end (every rank calls; rank 0 writes)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        every = trainer.cfg.train.checkpoint_every
        if every and trainer.state.step % every == 0 and trainer.state.step < trainer.cfg.train.steps:
            trainer.save_checkpoint()

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        if status == "FINISHED" and trainer.state.step > trainer.start_step:
            trainer.save_checkpoint()


class MetricsFileCallback(Callback):
    """Rank 0 appends every logged step's and every evaluation's metrics to `<run_dir>/metrics.jsonl`:
    a plain record of the run that needs no tracking server (tests, quick plots, grep). A resumed
    run appends; a step logged twice (killed after logging, before checkpointing) keeps its last line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.state.step % trainer.cfg.train.log_every == 0:
            self._write("train", trainer.state.step, metrics)

    def on_step_skipped(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._write("skip", trainer.state.step, metrics)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._write("eval", trainer.state.step, metrics)


def read_metrics(run_dir: str | Path, kind: str = "train") -> dict[int, dict[str, float]]:
    """step -> metrics of a run's metrics.jsonl (the last line wins for a step logged twice)."""
    out: dict[int, dict[str, float]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if rec.pop("kind") == kind:
            out[rec.pop("step")] = rec
    return out


class SamplesCallback(Callback):
    """Decode `tracking.log_samples` generations with the variant's own sampler and keep them as text,
    at the evaluations of every `tracking.samples_every`-th step (0: only the final evaluation): task
    runs answer that many validation prompts (and log the task's metrics on them, `task/*`), language runs
    sample unconditionally from [BOS]. Written to `<run_dir>/samples/step_*.txt` and sent to MLflow
    as artifacts. Rank 0, on its own replica: skipped under ZeRO-3, tensor and pipeline parallelism,
    whose weights are spread across ranks (sample from the consolidated checkpoint). Decoding runs the
    model once per sampler step, so it is kept small and rare: at every evaluation it cost the
    quickstart more than its validation passes."""

    def __init__(self, n: int, tracker=None, every: int = 0) -> None:
        self.n = n
        self.every = every
        self.tracker = tracker
        self.decoded_at: list[int] = []  # steps whose samples were decoded (tests, the summary)

    def due(self, trainer: Trainer) -> bool:
        step, t = trainer.state.step, trainer.cfg.train
        if self.n <= 0:
            return False
        if step == t.steps:
            return True
        return self.every > 0 and step > 0 and step % self.every == 0  # not the untrained model's noise

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        topo = trainer.topology
        if not self.due(trainer) or trainer.cfg.parallel.zero_stage == 3 or topo.tp_size > 1 or topo.pp_size > 1:
            return
        cfg, data, model = trainer.cfg, trainer.data, trainer.engine.module
        self.decoded_at.append(trainer.state.step)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), trainer.ema_weights():
                if cfg.data.source.startswith("task:"):
                    scores, shown = task_metrics(model, cfg, data, SamplerConfig(), num_samples=self.n,
                                                 device=trainer.device, return_samples=self.n)
                    lines = [f"prompt: {p}\nsample: {g}\nanswer: {a}\n" for p, g, a in shown]
                else:
                    scores = {}
                    L = cfg.data.seq_len
                    x = torch.full((self.n, L), data.pad_id, dtype=torch.long)
                    x[:, 0] = data.bos_id
                    gen = torch.ones(self.n, L, dtype=torch.bool)
                    gen[:, 0] = False
                    out = generate(model, x.to(trainer.device), gen.to(trainer.device), mask_id=data.mask_id,
                                   cfg=SamplerConfig(temperature=1.0, seed=trainer.state.step),
                                   forbid_ids=(data.pad_id, data.bos_id))
                    lines = [f"sample: {data.tokenizer.decode(t.tolist())}\n" for t in out.tokens.cpu()]
        finally:
            model.train(was_training)
        path = trainer.run_dir / "samples" / f"step_{trainer.state.step:07d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(lines))
        if self.tracker is not None:
            # the same names `pretrain.evaluate` logs (task/<metric>; task/examples says on how many)
            self.tracker.log_metrics(scores, step=trainer.state.step)
            self.tracker.log_artifact(path)


class TrackingCallback(Callback):
    """Sends step metrics (every log_every steps), evaluations and the run's outcome to MLflow."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def on_train_start(self, trainer: Trainer) -> None:
        data = trainer.data  # logged again on a resume: MLflow keeps one input per digest
        self.tracker.log_dataset(dataset_input(trainer.cfg.data.source, data.shard_dir,
                                               {"train": data.train_dir, "val": data.val_dir}))

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.state.step % trainer.cfg.train.log_every == 0:
            self.tracker.log_metrics({**metrics, **system_metrics()}, step=trainer.state.step)

    def on_step_skipped(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=trainer.state.step)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=trainer.state.step)
        if metrics["val/nll"] <= trainer.state.best_val_nll:
            self.tracker.set_tags({"val.best_nll_step": str(trainer.state.step)})

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        config_file = trainer.run_dir / "config.yaml"
        if config_file.is_file():
            self.tracker.log_artifact(config_file)
        latest = ckpt.latest_checkpoint(trainer.run_dir, checksums=False)
        if latest is not None:
            self.tracker.set_tags({"checkpoint.latest": str(latest.resolve())})
        if status == "FINISHED" and latest is not None and trainer.cfg.tracking.log_model == "hf":
            try:  # the final checkpoint is on disk (CheckpointCallback ran first)
                out = export_hf(latest, trainer.run_dir / "hf")
                self.tracker.log_artifacts(out, "model")
                log.info("tracking.log_model=hf: the Hugging Face export %s is logged as the run's model/", out)
            except Exception as e:  # the run itself is done and saved: say what is missing, do not fail it
                log.error("tracking.log_model=hf: the export failed (%s: %s); run `python -m pretrain.convert %s "
                          "--hf OUT` by hand", type(e).__name__, e, trainer.run_dir)
        self.tracker.finish(status if status in ("FINISHED", "KILLED") else "FAILED")
