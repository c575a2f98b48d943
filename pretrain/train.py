"""The training loop: data from the shard stream, the model, the diffusion objective, AdamW.

Everything optional (progress display, MLflow, checkpoints, stopping) is a small callback
(OLMo-core style, pretrain/callbacks.py), so the loop itself stays readable:

    for step in steps:
        batch -> loss (objective, with this step's RNG) -> backward -> clip -> optimizer step
        on_step_end; every eval_every: validation NLL, on_eval_end; post_step (evaluated? checkpointed?)

Determinism: the diffusion draws of a step come from `step_rng(seed, step, dp_rank, dp_size)`, the
loader's position is part of the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.device import resolve_device
from data_pipeline.build import ensure_shards
from data_pipeline.stream import (
    check_shards_before_training,
    make_train_loader,
    make_val_loader,
    skipped_rows,
)
from parallel import comm
from parallel.build import build_engine
from parallel.state import destroy, init_distributed
from parallel.topology import Topology
from pretrain import checkpoint as ckpt
from pretrain.callbacks import (
    Callback,
    CheckpointCallback,
    MetricsFileCallback,
    ProgressCallback,
    SamplesCallback,
    StepInfo,
    TrackingCallback,
)
from pretrain.checkpoint import consolidated_state_dict
from pretrain.config import Config, flatten, to_yaml
from pretrain.diffusion import step_rng
from pretrain.ema import EMA
from pretrain.evaluate import validation_nll
from pretrain.model import build_model
from pretrain.stop import StopFlag, make_stop_callback
from pretrain.throughput import device_peak_flops, mfu
from pretrain.tracking import MlflowTracker, git_state
from pretrain.variants import build_objective

if TYPE_CHECKING:
    from pretrain.stop import StopFlag

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses or gradients in a row: the run stops with its last good checkpoint intact."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # tokens consumed, all data-parallel ranks together
    skipped_steps: int = 0  # optimizer steps skipped (every rank) for a non-finite loss or gradient
    best_val_nll: float = math.inf
    initial_val_nll: float = math.nan
    last_val_nll: float = math.nan
    elapsed_s: float = 0.0  # wall-clock seconds of training so far, across resumes (evaluation included)


def resolve_dtype(name: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup, then constant (MDLM), cosine or linear decay down to `min_ratio`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1 - min_ratio) * progress


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; norms, biases and gains keep their scale (nanoGPT's split)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def end_status(e: BaseException) -> str:
    """How a run that raised `e` ended, in MLflow's terms: a stop on request (Ctrl-C, SIGTERM, Slurm's
    preemption: `pretrain.stop`) is KILLED, anything else FAILED."""
    if isinstance(e, KeyboardInterrupt):
        return "KILLED"
    return getattr(e, "status", "FAILED")


def build_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer: AdamW (fused on CUDA), or plain SGD (no momentum), whose step is lr x gradient."""
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.0)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, topology: Topology, callbacks: list[Callback]):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.topology = topology
        self.callbacks = callbacks
        self.device = resolve_device(cfg.train.device, "train.device")
        self.dtype = resolve_dtype(cfg.train.dtype, self.device)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.data = ensure_shards(cfg.data)
        check_shards_before_training(cfg.data, self.data)  # a damaged split stops the run here, not mid-way
        self.skipped_rows = 0  # rows of corrupt shards trained around by this rank (data.skip_corrupt_shards)
        model = build_model(cfg.model, self.data.vocab_size, cfg.data.seq_len).to(self.device)
        self.n_params = model.num_parameters()  # counted on the plain model: shards would count less
        self.n_params_nonembedding = model.num_parameters(exclude_embeddings=True)
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        # checked against its manifest once (every byte): damaged newer ones are named and skipped
        self.resume_from = ckpt.latest_checkpoint(self.run_dir) if cfg.launch.resume else None
        self.portable = self._portable_checkpoint()
        if self.portable is not None:  # weights from another layout: load before sharding/wrapping
            try:
                model.load_state_dict(consolidated_state_dict(self.portable))
            except RuntimeError as e:
                raise ckpt.CheckpointError(f"checkpoint {self.portable} does not fit this model: {e}") from None
        self.objective = build_objective(cfg.diffusion, cfg.model.variant, mask_id=self.data.mask_id,
                                         jigsaw_streams=cfg.model.jigsaw_streams)
        t = cfg.train
        dp = topology.dp_size
        self.micro_batch = t.micro_batch_size or t.batch_size // dp
        self.accumulation = t.batch_size // (self.micro_batch * dp)
        self.engine = build_engine(
            model, cfg, topology, make_optimizer=self._make_optimizer, device=self.device, dtype=self.dtype,
            micro_batch=self.micro_batch, accumulation=self.accumulation, vocab_size=self.data.vocab_size,
            n_params=self.n_params,
        )
        self.ema = None
        if t.ema > 0:
            self.ema = EMA(self.engine.module, t.ema)
        self.train_loader = make_train_loader(
            cfg.data, self.data, batch_size=self.micro_batch, dp_rank=topology.dp_rank, dp_size=dp, seed=cfg.seed,
        )
        self.val_loader = make_val_loader(
            cfg.data, self.data, batch_size=self.micro_batch, dp_rank=topology.dp_rank, dp_size=dp,
        )
        self.state = TrainState()
        self.start_step = 0  # where this process began (the checkpoint's step when resuming)
        self.peak_flops = device_peak_flops(self.device, self.dtype, t.peak_tflops)

    def _make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimizer over the parallelised model and its LR schedule (set before the engine wraps it)."""
        t = self.cfg.train
        optimizer = build_optimizer(model, t, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, t.warmup_steps, t.steps, t.lr_schedule, t.min_lr_ratio),
        )
        return optimizer

    @property
    def layout(self) -> dict[str, Any]:
        tp = self.topology
        return {"engine": self.engine.kind, "dp": tp.dp_size, "tp": tp.tp_size, "pp": tp.pp_size,
                "zero_stage": self.cfg.parallel.zero_stage}

    @property
    def adaptive_sampler(self):
        """The time sampler if it learns from the loss (diffusion.time_sampler=adaptive), else None: its
        state is updated after every step on every rank and checkpointed (pretrain/diffusion/adaptive_time.py)."""
        sampler = getattr(self.objective, "sampler", None)
        return sampler if hasattr(sampler, "sync_and_update") else None

    # ------------------------------------------------------------------ checkpoints
    def _portable_checkpoint(self) -> Path | None:
        """The run's latest checkpoint if it is a portable one (pretrain.convert --portable)."""
        path = self.resume_from
        if path is None or ckpt.load_trainer_state(path).get("layout", {}).get("engine") != "portable":
            return None
        return path

    def save_checkpoint(self) -> Path:
        trainer_state = {
            "vocab_size": self.data.vocab_size,
            "train_state": asdict(self.state),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "layout": self.layout,
        }
        if self.adaptive_sampler is not None:
            trainer_state["time_sampler"] = self.adaptive_sampler.state_dict()
        rank_state = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }
        if self.ema is not None:  # this rank's average, under this rank's parameter names
            rank_state["ema"] = self.ema.state_dict()
        self.checkpointed_step = self.state.step  # post_step tells the callbacks
        return ckpt.save_checkpoint(
            self.run_dir, self.state.step, lambda d: self.engine.save(d, self.topology.is_rank0),
            trainer_state, rank_state, to_yaml(self.cfg), keep=self.cfg.train.keep_checkpoints,
            rank=self.topology.rank, barrier=comm.barrier,
        )

    def maybe_resume(self) -> bool:
        path = self.resume_from
        if path is None:
            return False
        s = ckpt.load_trainer_state(path)
        if self.portable is not None:  # weights are in already; the optimizer starts afresh
            log.warning("resuming from portable checkpoint %s (converted from layout %s) in layout %s: "
                        "weights, counters, LR schedule and data position carry over, optimizer moments restart",
                        path, s["layout"].get("converted_from"), self.layout)
        elif s.get("layout", self.layout) != self.layout:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written with layout {s['layout']}, this run is {self.layout}; "
                f"resume with the checkpoint's layout, or convert it for any layout: "
                f"python -m pretrain.convert {path} --portable <new run dir>"
            )
        else:
            try:
                self.engine.load(path, self.device)
            except RuntimeError as e:
                raise ckpt.CheckpointError(
                    f"checkpoint {path} does not fit this model (was the model config changed?): {e}"
                ) from None
        self.scheduler.load_state_dict(s["scheduler"])
        self.train_loader.load_state_dict(s["loader"])
        if self.adaptive_sampler is not None:
            if "time_sampler" not in s:
                raise ckpt.CheckpointError(f"checkpoint {path} has no state of the adaptive time sampler")
            self.adaptive_sampler.load_state_dict(s["time_sampler"])
        r = ckpt.load_rank_state(path, self.topology.rank)
        if r is not None:
            torch.set_rng_state(r["torch_rng"].cpu())
            if self.device.type == "cuda" and r["cuda_rng"]:
                torch.cuda.set_rng_state_all([x.cpu() for x in r["cuda_rng"]])
        if self.ema is not None:
            if r is not None and "ema" in r and self.portable is None:
                self.ema.load_state_dict(r["ema"])
            else:
                log.warning("checkpoint %s has no weight average for this layout: train.ema restarts from the "
                            "resumed weights", path)
        self.state = TrainState(**s["train_state"])
        self.start_step = self.state.step
        log.info("resumed from %s at step %d", path, self.state.step)
        return True

    # ------------------------------------------------------------------ loop
    def ema_weights(self) -> contextlib.AbstractContextManager:
        """The moving-average weights swapped in (train.ema), or nothing when it is off."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def evaluate(self) -> dict[str, float]:
        with self.ema_weights():
            # eval_batches counts global batches (train.batch_size sequences), so every layout evaluates
            # the same validation sequences whatever its micro-batch size
            metrics = self.engine.eval_step(lambda model: validation_nll(
                model, self.objective, self.val_loader, self.device, seed=self.cfg.seed,
                max_batches=self.cfg.train.eval_batches * self.accumulation,
                reduce=comm.dp_sum, dp_rank=self.topology.dp_rank, dp_size=self.topology.dp_size,
            ))
        self.state.elapsed_s = self._elapsed_base + (time.perf_counter() - self._fit_start)
        metrics["val/tokens_seen"] = float(self.state.tokens)
        metrics["val/elapsed_s"] = self.state.elapsed_s
        nll = metrics["val/nll"]
        if math.isnan(self.state.initial_val_nll):
            self.state.initial_val_nll = nll
        self.state.last_val_nll = nll
        self.state.best_val_nll = min(self.state.best_val_nll, nll)
        metrics["val/best_nll"] = self.state.best_val_nll
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        return metrics

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any] | None:
        """One optimizer step over `accumulation` micro-batches; None when it was skipped (a non-finite
        loss or gradient in any micro-batch on any rank: every rank skips the whole step). The engine
        (parallel/engine.py) runs the layout: loss scaling to the global per-token loss, accumulation,
        the skip rule; this method says what a micro-batch's loss is and what its statistics are."""
        dp, n_micro = self.topology.dp_size, len(micro_batches)

        def loss_fn(model, batch: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor]:
            rng = step_rng(self.cfg.seed, self.state.step, self.topology.dp_rank, dp, micro=i, n_micro=n_micro)
            loss, stats = self.objective.training_loss(model, batch, rng)
            return loss, self._loss_totals(loss, stats, batch)

        out = self.engine.train_step(micro_batches, loss_fn)
        if not out.applied:
            return None
        self.scheduler.step()
        return self._step_stats(out.totals, out.grad_norm, n_micro)

    # The statistics of a step, in one place: what one micro-batch contributes (summed by the engine over
    # micro-batches and data-parallel ranks) and what the step reports from those sums.
    def _loss_totals(self, loss: torch.Tensor, stats: dict, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """float64 [loss x tokens, tokens, per-t-bucket loss sums, bucket counts, real tokens, masked fraction]
        of one micro-batch on this rank (real tokens: non-padding, what MFU counts)."""
        n_local = float(stats["n_tokens"])
        return torch.cat([
            torch.tensor([float(loss.detach()) * n_local, n_local], dtype=torch.float64),
            stats["t_bucket_loss_sum"].detach().double().cpu(), stats["t_bucket_count"].double().cpu(),
            torch.tensor([float((batch["input_ids"] != self.data.pad_id).sum()),
                          float(stats.get("masked_fraction", 0.0))], dtype=torch.float64),
        ])

    def _step_stats(self, totals: torch.Tensor, grad_norm: float, n_micro: int) -> dict[str, Any]:
        k = (len(totals) - 4) // 2
        return {
            "loss": float(totals[0] / totals[1].clamp(min=1.0)),
            "grad_norm": grad_norm,
            "real_tokens": float(totals[-2]),
            "masked_fraction": float(totals[-1]) / (n_micro * self.topology.dp_size),  # mean over micro-batches
            "t_bucket_loss_sum": totals[2:2 + k],
            "t_bucket_count": totals[2 + k:2 + 2 * k],
        }

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg.train
        status = "FAILED"
        try:  # from the resume on: whatever happens, every callback hears how the run ended
            self.maybe_resume()
            self._fit_start, self._elapsed_base = time.perf_counter(), self.state.elapsed_s
            self.checkpointed_step = -1
            for cb in self.callbacks:
                cb.on_train_start(self)
            if self.state.step == 0:
                self.evaluate()
            batches = iter(self.train_loader)
            nonfinite_in_a_row = 0
            while self.state.step < cfg.steps:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(self.accumulation)]
                load_s = time.perf_counter() - t0
                if self.cfg.data.skip_corrupt_shards:
                    self.skipped_rows += skipped_rows(micro)
                micro = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro]
                stats = self.train_step(micro)
                if stats is None:  # skipped on every rank: the weights and the step counter are unchanged
                    nonfinite_in_a_row += 1
                    self.state.skipped_steps += 1
                    log.warning("non-finite loss or gradient at step %d: optimizer step skipped on every rank "
                                "(%d in a row, %d in all)", self.state.step, nonfinite_in_a_row,
                                self.state.skipped_steps)
                    for cb in self.callbacks:
                        cb.on_step_skipped(self, {"train/skipped_steps": float(self.state.skipped_steps),
                                                  "train/nonfinite_in_a_row": float(nonfinite_in_a_row)})
                    if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                        last = ckpt.latest_checkpoint(self.run_dir, checksums=False)
                        raise NonFiniteLossError(
                            f"loss or gradient was NaN/inf for {nonfinite_in_a_row} steps in a row at step "
                            f"{self.state.step} (train.max_nonfinite_steps = {cfg.max_nonfinite_steps}); stopping. "
                            f"Last good checkpoint: {last or 'none'}. Lower train.lr, raise train.warmup_steps "
                            f"or check the data."
                        )
                    continue
                nonfinite_in_a_row = 0
                if self.ema is not None:
                    self.ema.update()
                step_s = time.perf_counter() - t0
                tokens = sum(b["input_ids"].numel() for b in micro) * self.topology.dp_size  # padding included
                self.state.step += 1
                self.state.tokens += tokens
                metrics = self._step_metrics(stats, tokens, step_s, load_s)
                if self.adaptive_sampler is not None:  # the same update on every rank, before any checkpoint
                    self.adaptive_sampler.sync_and_update(self.state.step, reduce=comm.dp_sum)
                    metrics.update(self.adaptive_sampler.metrics())
                for cb in self.callbacks:
                    cb.on_step_end(self, metrics)
                step = self.state.step
                evaluated = step % cfg.eval_every == 0 or step == cfg.steps
                if evaluated:
                    self.evaluate()
                info = StepInfo(step, evaluated, self.checkpointed_step == step, final=step >= cfg.steps)
                for cb in self.callbacks:
                    cb.post_step(self, info)
            status = "FINISHED"
        except BaseException as e:
            status = end_status(e)
            raise
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self, status)
        summary = self.summary()
        if self.topology.is_rank0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _step_metrics(self, stats: dict[str, Any], tokens: int, step_s: float, load_s: float) -> dict[str, float]:
        tps = tokens / step_s
        m = {
            "train/loss": float(stats["loss"]),
            "train/grad_norm": stats["grad_norm"],
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/tokens": float(self.state.tokens),
            "train/tokens_per_s": tps,
            "train/samples_per_s": tps / self.cfg.data.seq_len,
            "train/step_time_s": step_s,
            "train/loader_wait_s": load_s,
            "train/skipped_steps": float(self.state.skipped_steps),
        }
        if self.cfg.data.skip_corrupt_shards:  # a running total over the data-parallel ranks
            m["train/skipped_rows"] = float(comm.dp_sum(torch.tensor([float(self.skipped_rows)]))[0])
        if "masked_fraction" in stats:
            m["train/masked_fraction"] = float(stats["masked_fraction"])
        sums, counts = stats.get("t_bucket_loss_sum"), stats.get("t_bucket_count")
        if sums is not None and counts is not None:
            k = len(sums)
            for i in range(k):
                if counts[i] > 0:
                    m[f"train/loss_t{i / k:.1f}-{(i + 1) / k:.1f}"] = float(sums[i] / counts[i])
        real_tps = stats["real_tokens"] / step_s  # non-padding tokens, all ranks
        m["train/real_tokens_per_s"] = real_tps
        u = mfu(self.flops_per_token, real_tps, self.peak_flops, n_devices=self.topology.world_size)
        if u is not None:
            m["train/mfu"] = u
        return m

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "skipped_steps": self.state.skipped_steps,
            "initial_val_nll": self.state.initial_val_nll,
            "final_val_nll": self.state.last_val_nll,
            "best_val_nll": self.state.best_val_nll,
            "elapsed_s": self.state.elapsed_s,
            "device": self.device.type,
            "dtype": self.dtype,
            "seed": self.cfg.seed,
            "parameters": self.n_params,
            "layout": self.layout,
            "checkpoint": str(ckpt.latest_checkpoint(self.run_dir, checksums=False) or ""),
        }


def run_tags(cfg: Config, trainer_device: str) -> dict[str, str]:
    return {
        "variant": cfg.model.variant,
        "time_sampler": cfg.diffusion.time_sampler,
        "masking": cfg.diffusion.masking,
        "packing": cfg.data.packing,
        "layout": f"dp{cfg.launch.nproc * cfg.launch.nodes // (cfg.parallel.tp * cfg.parallel.pp)}-tp{cfg.parallel.tp}"
                  f"-pp{cfg.parallel.pp}-zero{cfg.parallel.zero_stage}",
        "device": trainer_device,
        **({"slurm.job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {}),
        **git_state(),
    }


def train(cfg: Config, run_dir: str | Path, run_name: str, extra_callbacks: tuple[Callback, ...] = (),
          stop_flags: tuple[StopFlag, ...] = (),
          stop_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> dict[str, Any]:
    """Train `cfg` in `run_dir` (resuming if it holds a checkpoint) and return the run's summary.

    Every rank calls this. With several ranks (WORLD_SIZE from the launcher) or ZeRO, it first
    builds the process groups (parallel.state.init_distributed: tensor, pipeline and data groups).
    `extra_callbacks` run after the built-in ones on every rank. `stop_signals` (Ctrl-C and SIGTERM by
    default) and `stop_flags` (e.g. Slurm's preemption flag) stop the run at a step boundary with a
    checkpoint, raising `pretrain.stop.Stopped` (see pretrain/stop.py). Once the MLflow run exists,
    no way out of here leaves it RUNNING: FINISHED, KILLED (stopped on request) or FAILED."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    signal_flag = StopFlag().install(stop_signals) if stop_signals else None
    flags = [*stop_flags, *([signal_flag] if signal_flag else [])]  # the user's stop wins over a requeue
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.parallel.zero_stage > 0
    tracker = None
    try:
        if distributed:
            topology = init_distributed("auto", tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                                        timeout_s=cfg.parallel.timeout_s, device=resolve_device(cfg.train.device))
        else:
            topology = Topology()
        callbacks: list[Callback] = [CheckpointCallback()]
        trainer = Trainer(cfg, run_dir, topology, callbacks)
        last = [make_stop_callback(flags)] if flags else []  # last: the step's metrics are logged first
        if not topology.is_rank0:
            callbacks.extend([*extra_callbacks, *last])
            return trainer.fit()
        log.info("layout: %s", topology.describe())
        log.info("model: %s parameters (%s non-embedding), %s FLOPs/token; device %s, %s",
                 f"{trainer.n_params:,}", f"{trainer.n_params_nonembedding:,}",
                 f"{trainer.flops_per_token:.3g}", trainer.device, trainer.dtype)
        if trainer.peak_flops:
            log.info("device peak: %.0f TFLOP/s (%s)", trainer.peak_flops / 1e12, trainer.dtype)
        callbacks.insert(0, ProgressCallback())
        callbacks.append(MetricsFileCallback(run_dir / "metrics.jsonl"))
        if cfg.tracking.enabled:
            tracker = MlflowTracker(
                cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location, run_dir, run_name,
                params=flatten(cfg), tags=run_tags(cfg, trainer.device.type),
                flush_interval=cfg.tracking.flush_interval_s,
            )
        callbacks.append(SamplesCallback(cfg.tracking.log_samples, tracker, every=cfg.tracking.samples_every))
        if tracker is not None:
            callbacks.append(TrackingCallback(tracker))
        callbacks.extend([*extra_callbacks, *last])
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines go above the progress bar instead of through it
            return trainer.fit()
    except BaseException as e:
        if tracker is not None:  # fit's TrackingCallback has normally ended the run already: then a no-op
            tracker.finish(end_status(e))
        raise
    finally:
        if signal_flag is not None:
            signal_flag.uninstall()
        if distributed:
            destroy()
