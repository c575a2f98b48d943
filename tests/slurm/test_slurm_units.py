"""The Slurm backend's pieces that need no cluster: config checks, scontrol parsing, header names,
the preemption callback's decisions and the requeue limit."""

from types import SimpleNamespace

import pytest

from pretrain.config import ConfigError, load_config
from slurm.cluster import parse_scontrol
from slurm.executor import executor_parameters, sbatch_parameters
from slurm.job import Preempted, StopFlag, TrainJob, make_preemption_callback


def test_slurm_keys_are_validated():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["launch.nodes=2", "launch.slurm.signal_delay_s=3600", "launch.slurm.time_min=30",
                           "launch.backend=slurmm"])
    msg = str(e.value)
    assert "launch.slurm.signal_delay_s" in msg and "launch.backend" in msg
    with pytest.raises(ConfigError, match="more than 1 node needs launch.backend=slurm"):
        load_config(None, ["launch.nodes=2"])
    cfg = load_config(None, ["launch.backend=slurm", "launch.nodes=2", "launch.nproc=2", "train.batch_size=8"])
    assert cfg.launch.nodes == 2


def test_scontrol_lines_become_submitit_job_ids():
    text = ("JobId=7 ArrayJobId=7 ArrayTaskId=1 JobName=build JobState=COMPLETED Reason=None ExitCode=0:0\n"
            "JobId=8 ArrayJobId=7 ArrayTaskId=0 JobName=build JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0\n"
            "JobId=9 JobName=merge JobState=PENDING Reason=Dependency Restarts=0\n")
    info = parse_scontrol(text)
    assert info["7_1"]["JobState"] == "COMPLETED" and info["7_0"]["JobState"] == "FAILED"
    assert info["9"]["Reason"] == "Dependency"


def test_a_pending_array_record_names_each_of_its_tasks():
    # a pending array is one record whose ArrayTaskId is a range ("0-1%2": tasks 0 and 1, at most 2 at once);
    # its tasks must read PENDING, not UNKNOWN (which `--wait` took for a terminal state: a false failure)
    text = ("JobId=12 ArrayJobId=12 ArrayTaskId=0-1%2 JobName=build JobState=PENDING Reason=None\n"
            "JobId=20 ArrayJobId=20 ArrayTaskId=3,5-6 JobName=build JobState=PENDING Reason=Priority\n"
            "JobId=21 ArrayJobId=20 ArrayTaskId=4 JobName=build JobState=RUNNING Reason=None\n")
    info = parse_scontrol(text)
    assert info["12_0"]["JobState"] == info["12_1"]["JobState"] == "PENDING"
    assert "12_2" not in info
    assert {k for k in info if k.startswith("20_")} == {"20_3", "20_4", "20_5", "20_6"}
    assert info["20_4"]["JobState"] == "RUNNING" and info["20_5"]["Reason"] == "Priority"


def test_executor_parameters_map_to_sbatch_names():
    cfg = load_config(None, ["launch.slurm.partition=gpu", "launch.slurm.mem_gb=64", "launch.slurm.exclusive=true"])
    p = executor_parameters(cfg.launch.slurm, nodes=2, tasks_per_node=4, gpus_per_node=4, name="x", setup=["a"])
    s = sbatch_parameters(p)
    assert s["job_name"] == "x" and s["ntasks_per_node"] == 4 and s["time"] == 60 and s["mem"] == "64GB"
    assert s["partition"] == "gpu" and s["exclusive"] is True and s["setup"] == ["a"] and s["gpus_per_node"] == 4
    assert "account" not in s and "qos" not in s  # empty settings are left to the cluster


class FakeTrainer:
    def __init__(self):
        self.saved = []

    def save_checkpoint(self):
        self.saved.append(True)


def test_preemption_callback_stops_after_the_step_as_the_loop_reports_it():
    """The callback acts in post_step, after the step's evaluation and checkpoint, with what the loop says
    it did: it does not recompute the evaluation or checkpoint schedule (issue 21 item 4)."""
    from pretrain.callbacks import StepInfo

    stop = StopFlag()
    cb, trainer = make_preemption_callback(stop), FakeTrainer()
    cb.post_step(trainer, StepInfo(4, evaluated=False, checkpointed=False, final=False))  # no signal: nothing
    assert trainer.saved == []
    stop.signalled = True
    with pytest.raises(Preempted) as e:  # evaluated, no checkpoint of this step yet: one is written
        cb.post_step(trainer, StepInfo(15, evaluated=True, checkpointed=False, final=False))
    assert trainer.saved == [True] and e.value.step == 15

    trainer = FakeTrainer()  # the loop has just written step 10: not written twice
    with pytest.raises(Preempted):
        cb.post_step(trainer, StepInfo(10, evaluated=False, checkpointed=True, final=False))
    assert trainer.saved == []
    cb.post_step(trainer, StepInfo(30, evaluated=True, checkpointed=False, final=True))  # the run ends anyway
    assert trainer.saved == []


def test_requeue_limit_stops_with_the_checkpoint_on_disk(tmp_path):
    from submitit.core.utils import UncompletedJobError

    job = TrainJob(load_config(None), str(tmp_path), "run", max_requeues=2)
    called = []
    stop = StopFlag()
    stop.submitit_handler = lambda *a: called.append(a)
    with pytest.raises(UncompletedJobError, match="after 2 requeues"):
        job._requeue(SimpleNamespace(global_rank=0), stop, step=12, restarts=2)
    assert job._requeue(SimpleNamespace(global_rank=1), stop, step=12, restarts=0) == {"preempted_at": 12}
    job._requeue(SimpleNamespace(global_rank=0), stop, step=12, restarts=1)
    assert len(called) == 1  # submitit's handler: checkpoint(), scontrol requeue, exit


def test_the_task_srun_saw_fail_first_is_reported_not_the_one_it_took_down(tmp_path):
    """Two nodes: task 1 is killed on dlmnode2, task 0 then dies of the closed connection with a traceback in its
    log. srun's lines in the batch log (task 0's err file) say which task ended first, and where."""
    from slurm.submit import first_failure, srun_failures

    batch = tmp_path / "7_0_log.err"
    batch.write_text("Traceback (most recent call last):\nRuntimeError: Connection closed by peer\n"
                     "srun: error: dlmnode2: task 1: Killed\nsrun: launch/slurm: _step_signal: Terminating\n"
                     "srun: error: dlmnode1: tasks 0,2-3: Exited with exit code 1\n")
    other = tmp_path / "7_1_log.err"
    other.write_text("[rank 1] Slurm job 7, task 1 of 2 on dlmnode2\n")
    assert srun_failures(batch) == [(1, "dlmnode2", "Killed"), (0, "dlmnode1", "Exited with exit code 1"),
                                    (2, "dlmnode1", "Exited with exit code 1"),
                                    (3, "dlmnode1", "Exited with exit code 1")]
    k, text = first_failure([batch, other])
    assert k == 1 and "on dlmnode2" in text and "Killed" in text and "also failed: tasks 0, 2, 3" in text, text
    # a task that raised, with srun's line: its own error is shown
    batch.write_text("Traceback (most recent call last):\nUnicodeDecodeError: not UTF-8\n"
                     "srun: error: vm: task 0: Exited with exit code 1\n")
    k, text = first_failure([batch, other])
    assert k == 0 and "UnicodeDecodeError" in text and "Exited with exit code 1" in text, text
    assert first_failure([other]) is None
    # under load srun may report the task that lost its peer first: its own error (a reset connection) says it
    # is a consequence, and the task killed by a signal is named instead
    batch.write_text("Traceback (most recent call last):\nRuntimeError: Read error: Connection reset by peer\n"
                     "srun: error: dlmnode1: task 0: Exited with exit code 1\n"
                     "srun: error: dlmnode2: task 1: Killed\n")
    k, text = first_failure([batch, other])
    assert k == 1 and "on dlmnode2" in text and "Killed" in text and "also failed: task 0" in text, text
    # srun's line lands after a progress bar that ended without a newline (tqdm's carriage returns)
    batch.write_text("train:   1%|          | 3/400 [00:03<06:24, loss=2.7030]\r"
                     "train:   1%|          | 3/400 [00:03<06:24, loss=2.7030]srun: error: dlmnode2: task 1: Killed\n"
                     "srun: error: dlmnode1: task 0: Exited with exit code 1\n"
                     "[rank0]: RuntimeError: [pair.cc:553] Connection closed by peer [10.0.0.3]:42648\n")
    assert srun_failures(batch) == [(1, "dlmnode2", "Killed"), (0, "dlmnode1", "Exited with exit code 1")]
    k, text = first_failure([batch, other])
    assert k == 1 and "on dlmnode2: Killed" in text, text


def test_preflight_refuses_what_the_job_would_fail_on_before_submitting(tmp_path):
    # checked on the login node, before sbatch: a source that is not there, a sentencepiece model that is not there
    from slurm.cluster import SlurmError
    from slurm.submit import preflight

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one line\n")
    ok = load_config(None, [f"data.source={corpus}", "data.tokenizer=sentencepiece", f"data.shard_dir={tmp_path / 's'}"])
    preflight(ok)  # nothing wrong: no error
    for sets, named in ((["data.tokenizer=sentencepiece:/nonexistent/sp.model"], "sp.model"),
                        ([f"data.source={tmp_path / 'gone.txt'}"], "gone.txt")):
        cfg = load_config(None, [f"data.source={corpus}", "data.tokenizer=sentencepiece",
                                 f"data.shard_dir={tmp_path / 's'}", *sets])
        with pytest.raises(SlurmError, match=f"not submitted.*{named}"):
            preflight(cfg)


def test_a_refused_submission_is_a_slurm_error_naming_the_job_and_script(tmp_path):
    from submitit.core.utils import FailedSubmissionError

    from slurm.cluster import SlurmError
    from slurm.executor import submit, submit_array

    class Refusing:  # what submitit raises when sbatch refuses (here without a Slurm controller)
        folder = tmp_path

        def submit(self, *a):
            raise FailedSubmissionError("sbatch: error: invalid partition specified: nope")

        map_array = submit

    for fn, what in ((submit, "job"), (submit_array, "job array")):
        with pytest.raises(SlurmError, match=f"Slurm refused the {what}: .*invalid partition"):
            fn(Refusing(), print, [1])
