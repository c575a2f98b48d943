"""Stopping a run cleanly at a step boundary: Ctrl-C, SIGTERM, a dying launcher, Slurm's preemption.

A signal handler only records the request (`StopFlag`); acting inside the handler would interrupt a
collective or a half-written checkpoint. `StopCallback`, the trainer's last callback, then after every
step (in post_step, after the step's evaluation and checkpoint): agrees on the request across ranks
(one tiny all-reduce, so every rank stops at the same step even when only one got the signal), writes
the checkpoint together (unless the loop has just written this step's) and raises the flag's
exception on every rank. The exception's `status` ("KILLED") is what the trainer reports to MLflow; `pretrain.launch` turns `Stopped` into one line saying how to
resume, and exit status 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).

Slurm's preemption (`slurm/job.py`) uses the same callback with its own flag (SIGUSR2 -> requeue).
A second Ctrl-C stops at once, without a checkpoint (KeyboardInterrupt; MLflow still says KILLED).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from parallel import comm
from pretrain.callbacks import Callback, StepInfo

log = logging.getLogger(__name__)


class Stopped(Exception):
    """Raised on every rank, after the collective checkpoint, to leave the training loop."""

    status = "KILLED"  # how the trainer (and MLflow) records a run stopped on request

    def __init__(self, step: int, reason: str = "a stop request") -> None:
        super().__init__(f"stopped by {reason} at step {step}, checkpoint written")
        self.step = step
        self.reason = reason

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended (1 when unknown)."""
        try:
            return 128 + int(signal.Signals[self.reason])
        except KeyError:
            return 1


class StopFlag:
    """Records stop signals instead of acting on them inside the handler.

    `install(signals)` takes over the given signals (main thread only; elsewhere it installs nothing)
    until `uninstall()`. `exception(step)` is what the run raises when it stops for this
    flag; subclasses (Slurm's preemption flag) raise their own."""

    def __init__(self) -> None:
        self.signalled = False
        self.reason = ""
        self._previous: dict[int, Any] = {}
        self._interrupted = False
        self._pid = os.getpid()

    def install(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> StopFlag:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def request(self, reason: str) -> None:
        if not self.signalled:
            log.warning("got %s: stopping after this step with a checkpoint (Ctrl-C again stops at once, without "
                        "one)", reason)
        self.signalled = True
        self.reason = self.reason or reason

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker inherited the handler: the rank decides
            return
        if self._interrupted:  # already unwinding from a second Ctrl-C: let it finish (MLflow's status)
            return
        if signum == signal.SIGINT and self.signalled:
            self._interrupted = True
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def exception(self, step: int) -> BaseException:
        return Stopped(step, self.reason or "a stop request")


def _agree(code: int, trainer) -> int:
    """The largest `code` over all ranks (one tiny all-reduce per step; no-op on one process)."""
    return int(comm.all_reduce_max(code))


class StopCallback(Callback):
    """Every rank, after each step (its evaluation and checkpoint included, as the loop reports them in
    post_step): agree on the stop request, then checkpoint together (unless the loop just did) and stop.
    With several flags, a later one wins when ranks disagree (the user's stop over Slurm's requeue)."""

    def __init__(self, flags: list[StopFlag]) -> None:
        self.flags = flags

    def post_step(self, trainer, info: StepInfo) -> None:
        if info.final:  # the run ends here anyway, with its final checkpoint
            return
        code = max((i + 1 for i, f in enumerate(self.flags) if f.signalled), default=0)
        code = _agree(code, trainer)
        if code == 0:
            return
        if not info.checkpointed:
            trainer.save_checkpoint()
        raise self.flags[code - 1].exception(info.step)


def make_stop_callback(flags: list[StopFlag]) -> StopCallback:
    """The trainer's last callback, on every rank."""
    return StopCallback(flags)
