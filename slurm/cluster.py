"""Talking to the Slurm controller: is it there, what state is a job in, why did it fail.

Job states: submitit reads them with `sacct`, which needs the accounting daemon (slurmdbd). On a
cluster without it (the test cluster here; some small clusters) sacct fails and submitit reports
every job as UNKNOWN. `ScontrolWatcher` keeps sacct when it works and otherwise asks the controller
itself (`scontrol show job`, which knows a job until MinJobAge, 300 s by default, after it ended);
`use_scontrol_states()` installs it for submitit's Slurm jobs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


class SlurmError(RuntimeError):
    """Slurm refused or failed a job; the message carries Slurm's own words and where the logs are."""


def slurm_answers(timeout_s: float = 10.0) -> tuple[bool, str]:
    """(True, "") when `sbatch` is on the PATH and a controller answers `sinfo`, else (False, why).

    submitit's AutoExecutor picks Slurm whenever `srun` exists, even with no controller behind it,
    so the launcher asks the controller before choosing Slurm."""
    if shutil.which("sbatch") is None:
        return False, "sbatch is not on the PATH"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"sinfo did not answer: {e}"
    if r.returncode != 0:
        return False, f"sinfo failed: {(r.stderr or r.stdout).strip()}"
    return True, ""


def array_task_ids(spec: str) -> list[int]:
    """The task ids of an `ArrayTaskId` field: "4", or a pending array's "0-1%2", "3,5-6" (the "%N"
    after a range is the array's parallelism limit, not a task)."""
    ids: list[int] = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def parse_scontrol(text: str) -> dict[str, dict[str, str]]:
    """`scontrol show job -o` output -> submitit job id ("123" or "123_4" for array tasks) -> fields.

    Slurm shows an array's tasks that have not started as one record with a range of task ids: each of
    them gets that record (so a pending task reads PENDING, not unknown)."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if "JobId" not in fields:
            continue
        if fields.get("ArrayJobId"):
            for task in array_task_ids(fields.get("ArrayTaskId", "")):
                out[f"{fields['ArrayJobId']}_{task}"] = fields
        out.setdefault(fields["JobId"], fields)
    return out


def job_info(job_id: str) -> dict[str, str]:
    """The controller's fields for one job (JobState, Reason, ExitCode, StdErr, ...); {} once forgotten."""
    main_id = str(job_id).split("_")[0]
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", main_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if r.returncode != 0:
        return {}
    return parse_scontrol(r.stdout).get(str(job_id), {})


def job_state(job_id: str) -> str:
    """PENDING, RUNNING, COMPLETED, FAILED, ... ; UNKNOWN when the controller no longer knows the job."""
    return job_info(job_id).get("JobState", "UNKNOWN")


def use_scontrol_states() -> None:
    """Make submitit's Slurm jobs read their state from sacct when accounting works, else from scontrol."""
    from submitit.slurm import slurm as sl

    if isinstance(sl.SlurmJob.watcher, ScontrolWatcher):
        return

    class _Watcher(sl.SlurmInfoWatcher, ScontrolWatcher):
        pass

    sl.SlurmJob.watcher = _Watcher(delay_s=60)


class ScontrolWatcher:
    """Mixin for submitit's SlurmInfoWatcher: when the sacct call fails, ask scontrol instead."""

    def update(self) -> None:  # same contract as submitit's InfoWatcher.update
        import time

        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        try:
            output = subprocess.run(command, capture_output=True, timeout=60)
            ok = output.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            self._info_dict.update(self.read_info(output.stdout))
        else:
            ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
            for jid in ids:
                r = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True,
                                   timeout=60)
                if r.returncode == 0:
                    info = parse_scontrol(r.stdout)
                    self._info_dict.update({k: {"JobID": k, "State": v["JobState"], "NodeList": v.get("NodeList", "")}
                                            for k, v in info.items()})
        self._last_status_check = time.time()


def explain_failure(job_id: str, log_path: Path | str | None) -> str:
    """Slurm's reason for a job that ended badly, its exit code, and the end of its log."""
    info = job_info(job_id)
    parts = [f"Slurm job {job_id} {info.get('JobState', 'ended')}"]
    if info.get("Reason") and info["Reason"] != "None":
        parts.append(f"reason {info['Reason']}")
    if info.get("ExitCode"):
        parts.append(f"exit code {info['ExitCode']}")
    msg = ", ".join(parts)
    if log_path is not None:
        msg += f"\nlog: {log_path}"
        tail = _tail(Path(log_path))
        if tail:
            msg += "\n--- last lines of the log ---\n" + tail
    return msg


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


# Pending reasons that never clear by waiting: the request exceeds what the partition/association allows.
HOPELESS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
            "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxNodePerJobLimit",
            "QOSMaxWallDurationPerJobLimit", "AssocMaxCpuPerJobLimit", "AssocMaxNodesPerJob",
            "AssocMaxWallDurationPerJobLimit", "DependencyNeverSatisfied"}


def refuse_if_hopeless(job_id: str, script: Path | str | None, wait_s: float = 3.0) -> None:
    """Right after submission: a job Slurm accepted but can never start (e.g. more CPUs than any node of a
    partition without EnforcePartLimits) is cancelled and reported as a SlurmError with Slurm's reason
    and what `sbatch --test-only` says about the same script."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        info = job_info(job_id)
        state, reason = info.get("JobState", "UNKNOWN"), info.get("Reason", "")
        if state != "PENDING" or reason in HOPELESS or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if state != "PENDING" or reason not in HOPELESS:
        return
    subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
    detail = ""
    if script is not None:
        r = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=30)
        detail = (r.stderr or r.stdout).strip().splitlines()[-1:] and (r.stderr or r.stdout).strip().splitlines()[-1]
    raise SlurmError(f"Slurm can never start job {job_id} (pending, reason {reason}); cancelled it."
                     + (f"\nsbatch --test-only: {detail}" if detail else "")
                     + (f"\nsbatch script: {script}" if script else ""))
