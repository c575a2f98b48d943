"""What runs inside a Slurm job: rendezvous from Slurm's environment, then the local launcher's
training function, with preemption and time limits turned into a checkpoint and a requeue.

Preemption flow (every task of the job runs `TrainJob.__call__`):
1. Slurm sends SIGUSR2 (`--signal=USR2@signal_delay_s` before the time limit; on preemption where the
   cluster sets `preempt_send_user_signal`; by hand: `scancel --signal=USR2 JOBID`). submitit's own
   handler would checkpoint and requeue at once, in task 0 only, from inside the signal handler, while
   the other ranks keep training. So each task replaces it with `StopFlag`, which only records the signal.
2. `pretrain.stop`'s callback (last of the trainer's callbacks, so the step's metrics are already
   logged; the path Ctrl-C and SIGTERM take on a local run too) all-reduces the flag (MAX) after every
   step: all ranks learn the decision at the same step even when only one task got the signal.
3. All ranks write the checkpoint together (`Trainer.save_checkpoint` is collective; after the
   step's evaluation when one is due) and leave the training loop with `Preempted`; MLflow marks the
   run KILLED (the requeued job sets it RUNNING again: the run id lives in the run dir).
4. Task 0 then calls submitit's handler that it displaced: it calls `TrainJob.checkpoint` (a fresh
   copy of this job: the state is the run dir's checkpoint), counts a time-out, runs `scontrol requeue`
   and exits. The requeued job (same job id, `SLURM_RESTART_COUNT` + 1) resumes from the checkpoint.
   After `launch.slurm.max_requeues` requeues it stops instead, with the checkpoint on disk.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import submitit

import pretrain
from data_pipeline.build import ensure_shards, is_complete, resolve_shard_dir
from pretrain.launch import setup_logging
from pretrain.stop import StopFlag as BaseStopFlag
from pretrain.stop import Stopped, make_stop_callback
from pretrain.train import train

log = logging.getLogger("slurm.job")


class Preempted(Stopped):
    """Raised on every rank, after the collective checkpoint, to leave the training loop (then requeue)."""

    def __init__(self, step: int) -> None:
        super().__init__(step, "preemption (SIGUSR2)")


# ---------------------------------------------------------------------------------------- rendezvous
def master_port(job_id: str, restart: int = 0) -> int:
    """A port derived from the job id (every task computes the same one without talking), moved on each
    restart so a requeued job never meets its predecessor's socket in TIME_WAIT."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + (int(digits) * 7 + restart * 101) % 20000


def rendezvous_env(env: submitit.JobEnvironment | None = None) -> dict[str, str]:
    """torch.distributed's environment from Slurm's: first host of the nodelist, a port from the job id,
    global and local rank, world size."""
    env = env or submitit.JobEnvironment()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    local_world = env.num_tasks // max(env.num_nodes, 1)
    return {
        "MASTER_ADDR": env.hostnames[0],
        "MASTER_PORT": str(master_port(os.environ.get("SLURM_JOB_ID", env.job_id), restart)),
        "RANK": str(env.global_rank),
        "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_WORLD_SIZE": str(local_world),
    }


# ---------------------------------------------------------------------------------------- stop flag
class StopFlag(BaseStopFlag):
    """Records SIGUSR2 instead of acting on it inside the signal handler (pretrain.stop's flag, whose
    callback checkpoints at the step boundary); keeps submitit's handler to requeue with once the
    checkpoint is on disk."""

    def __init__(self) -> None:
        super().__init__()
        self.submitit_handler: Any = None

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR2,)) -> StopFlag:
        self.submitit_handler = signal.getsignal(signal.SIGUSR2)
        super().install(signals)
        return self

    def request(self, reason: str) -> None:
        if not self.signalled:
            log.warning("got %s: checkpointing at the end of this step, then requeueing", reason)
        self.signalled = True
        self.reason = reason

    def exception(self, step: int) -> BaseException:
        return Preempted(step)


def make_preemption_callback(stop: StopFlag):
    """The trainer's stop callback for this flag alone (the job passes the flag to `train` instead, which
    puts it beside the Ctrl-C/SIGTERM flag in one callback)."""
    return make_stop_callback([stop])


# ---------------------------------------------------------------------------------------- the job
class TrainJob(submitit.helpers.Checkpointable):
    """The training job submitted by `pretrain.launch` with the slurm backend (one call per task)."""

    def __init__(self, cfg, run_dir: str, run_name: str, max_requeues: int, log_level: str = "INFO") -> None:
        self.cfg = cfg
        self.run_dir = str(run_dir)
        self.run_name = run_name
        self.max_requeues = max_requeues
        self.log_level = log_level

    def __call__(self) -> dict[str, Any] | None:
        env = submitit.JobEnvironment()
        os.environ.update(rendezvous_env(env))
        stop = StopFlag().install()
        setup_logging(self.log_level, env.global_rank)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        where = (f"Slurm job {env.job_id}, task {env.global_rank} of {env.num_tasks} on {env.hostname}; restart "
                 f"{restarts}; code {Path(pretrain.__file__).parent.parent}; master {os.environ['MASTER_ADDR']}:"
                 f"{os.environ['MASTER_PORT']}")
        if env.global_rank == 0:
            log.info(where)
        else:  # the other ranks log warnings only, but each task's own log must say where it ran (several nodes)
            print(f"[rank {env.global_rank}] {where}", file=sys.stderr, flush=True)
        self._shards(env.global_rank)
        try:
            # SIGTERM stays submitit's (it ignores the one Slurm sends around a requeue)
            return train(self.cfg, Path(self.run_dir), self.run_name, stop_flags=(stop,), stop_signals=())
        except Preempted as e:
            return self._requeue(env, stop, e.step, restarts)

    def _shards(self, rank: int) -> None:
        """Task 0 builds the shards if needed; the others wait for them instead of building them again."""
        if rank == 0:
            ensure_shards(self.cfg.data, progress=False)
            return
        shard_dir = resolve_shard_dir(self.cfg.data)
        deadline = time.monotonic() + self.cfg.parallel.timeout_s
        while not is_complete(shard_dir) and time.monotonic() < deadline:
            time.sleep(1)

    def _requeue(self, env, stop: StopFlag, step: int, restarts: int) -> dict[str, Any]:
        if env.global_rank != 0:
            return {"preempted_at": step}  # task 0 requeues the whole job
        if restarts >= self.max_requeues:
            raise submitit.core.utils.UncompletedJobError(
                f"preempted at step {step} after {restarts} requeues (launch.slurm.max_requeues = "
                f"{self.max_requeues}): not requeued. The checkpoint is in {self.run_dir}; submit the same "
                f"command again to continue.")
        log.warning("checkpoint at step %d written by all ranks: requeueing (restart %d of at most %d)", step,
                    restarts + 1, self.max_requeues)
        handler = stop.submitit_handler
        if callable(handler):
            handler(signal.SIGUSR2, None)  # submitit: checkpoint() -> pickle, scontrol requeue, exit
        return {"preempted_at": step}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The state to resume from is the run dir's checkpoint, so the requeued job is this same job."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.run_dir, self.run_name,
                                                           self.max_requeues, self.log_level))
