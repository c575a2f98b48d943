"""Checkpoints are atomic: a writer killed at any moment leaves the previous checkpoint loadable."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def save(run_dir: Path, step: int, value: float, write=None, keep: int = 2) -> Path:
    def write_engine(d: Path) -> None:
        torch.save({"w": torch.full((3,), value)}, d / "model.pt")

    return ckpt.save_checkpoint(run_dir, step, write or write_engine, {"train_state": {"step": step}},
                                {"torch_rng": torch.get_rng_state()}, "config: 1\n", keep=keep)


def test_save_points_latest_and_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step, float(step))
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_0000030"
    assert ckpt.load_trainer_state(latest)["train_state"]["step"] == 30
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000020", "step_0000030"]
    assert ckpt.load_rank_state(latest, 0) is not None and ckpt.load_rank_state(latest, 1) is None


def test_writer_failing_mid_write_leaves_previous_checkpoint(tmp_path):
    save(tmp_path, 10, 1.0)

    def dies_half_way(d: Path) -> None:
        torch.save({"w": torch.zeros(3)}, d / "model.pt")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save(tmp_path, 20, 2.0, write=dies_half_way)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_0000010"
    assert torch.load(latest / "model.pt", weights_only=True)["w"][0] == 1.0
    save(tmp_path, 20, 2.0)  # the next save clears the leftover temporary directory
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint(tmp_path):
    """A real process writing checkpoint 20 is SIGKILLed after half its files are on disk."""
    save(tmp_path, 10, 1.0)
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        from pretrain import checkpoint as ckpt
        def slow(d):
            torch.save({{"w": torch.zeros(3)}}, d / "model.pt")
            print("half", flush=True)
            time.sleep(60)
        ckpt.save_checkpoint({str(tmp_path)!r}, 20, slow, {{"train_state": {{}}}}, {{}}, "", keep=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "half"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "checkpoints" / ".tmp-step_0000020" / "model.pt").is_file()  # the half-written one
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_0000010"
    assert torch.load(latest / "model.pt", weights_only=True)["w"][0] == 1.0
    assert ckpt.load_trainer_state(latest)["train_state"]["step"] == 10


def test_truncated_trainer_state_is_a_clear_error(tmp_path):
    path = save(tmp_path, 10, 1.0)
    (path / "trainer_state.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_trainer_state(path)


# every kind of file a checkpoint holds: the trainer's, the plain engine's, DeepSpeed's ZeRO files
# (a directory of several files, names as DeepSpeed writes them), and the manifest itself
FILE_KINDS = ["trainer_state.pt", "rank_00000.pt", "rank_00001.pt", "config.yaml", "model.pt", "optimizer.pt",
              "deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
              ckpt.MANIFEST]


def save_all_kinds(run_dir: Path, step: int) -> Path:
    def write_engine(d: Path) -> None:
        torch.save({"w": torch.full((64,), float(step))}, d / "model.pt")
        torch.save({"m": torch.zeros(64)}, d / "optimizer.pt")
        (d / "deepspeed").mkdir(exist_ok=True)
        torch.save({"module": torch.ones(64)}, d / "deepspeed" / "mp_rank_00_model_states.pt")
        torch.save({"optim": torch.ones(64)}, d / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")

    path = ckpt.save_checkpoint(run_dir, step, write_engine, {"train_state": {"step": step}},
                                {"torch_rng": torch.get_rng_state()}, "config: 1\n", keep=3)
    torch.save({"torch_rng": torch.get_rng_state()}, path / "rank_00001.pt")  # a second rank's file
    ckpt.seal(path)
    return path


@pytest.mark.parametrize("name", FILE_KINDS)
def test_truncated_file_in_latest_checkpoint_is_named_and_skipped(name, tmp_path, caplog):
    save_all_kinds(tmp_path, 10)
    newest = save_all_kinds(tmp_path, 20)
    f = newest / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="pretrain.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step_0000010"
        assert ckpt.latest_checkpoint(tmp_path, checksums=False).name == "step_0000010"  # sizes catch it
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and "step_0000020" in damaged[0]  # named once, not at every call
    if name != ckpt.MANIFEST:
        assert name in damaged[0] and "truncated" in damaged[0]
    assert any("using" in r.getMessage() and "step_0000010" in r.getMessage() for r in caplog.records)


def test_corrupted_bytes_are_caught_by_checksum_and_a_missing_file_by_name(tmp_path):
    save_all_kinds(tmp_path, 10)
    newest = save_all_kinds(tmp_path, 20)
    f = newest / "deepspeed" / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    f.write_bytes(bytes(data))
    assert ckpt.latest_checkpoint(tmp_path, checksums=False).name == "step_0000020"  # sizes cannot see it
    assert "sha256" in ckpt.damage(newest)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000010"
    (tmp_path / "checkpoints" / "step_0000010" / "optimizer.pt").unlink()
    assert ckpt.damage(tmp_path / "checkpoints" / "step_0000010") == "optimizer.pt is missing"
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint") as e:
        ckpt.latest_checkpoint(tmp_path)
    assert "step_0000020: deepspeed/mp_rank_00_model_states.pt" in str(e.value)


def test_latest_pointer_naming_a_missing_checkpoint_falls_back(tmp_path):
    save(tmp_path, 10, 1.0)
    save(tmp_path, 20, 2.0)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000099\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000020"
    (tmp_path / "checkpoints" / "latest").write_text("step_0000010\n")  # pointed back by hand: respected
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000010"
    (tmp_path / "checkpoints" / "latest").write_text("step_0000005\n")
    with pytest.raises(ckpt.CheckpointError, match="no earlier checkpoint"):
        ckpt.latest_checkpoint(tmp_path)


def test_saving_after_resuming_past_a_damaged_checkpoint_keeps_the_new_one(tmp_path):
    """keep=1: a run that resumed from step 10 (step 20 damaged) saves step 15; the damaged newer
    step 20 must not crowd the new checkpoint out of the pruning."""
    save(tmp_path, 10, 1.0, keep=1)
    damaged = save(tmp_path, 20, 2.0, keep=2)
    (damaged / "model.pt").write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000010"
    save(tmp_path, 15, 1.5, keep=1)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000015"
    assert not (tmp_path / "checkpoints" / "step_0000010").exists()


def test_a_run_resumes_past_a_damaged_latest_checkpoint(tmp_path):
    """A real run: its newest checkpoint's weights are truncated; relaunching names the damaged one and
    resumes from the one before instead of stopping with "does not fit this model"."""
    cmd = [sys.executable, "-m", "pretrain.launch", "--config", str(REPO / "configs" / "quickstart.yaml"), "--set",
           "data.task.num_train=64", "data.task.num_val=16", "train.batch_size=4", "train.eval_batches=1",
           "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "tracking.enabled=false",
           "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.eval_every=100", "launch.run_name=r"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*cmd, "train.steps=4"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart" / "r"
    weights = run_dir / "checkpoints" / "step_0000004" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = subprocess.run([*cmd, "train.steps=6"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumes from runs/quickstart/r/checkpoints/step_0000002" in again.stdout  # the plan says it too
    damaged = [line for line in again.stderr.splitlines() if "damaged, skipped" in line]
    assert len(damaged) == 1 and "step_0000004" in damaged[0] and "model.pt has 1000 bytes" in damaged[0]
    assert "resumed from runs/quickstart/r/checkpoints/step_0000002 at step 2" in again.stderr
    assert ckpt.latest_checkpoint(run_dir).name == "step_0000006"


@pytest.mark.slow
def test_every_file_of_a_real_deepspeed_checkpoint_is_guarded(tmp_path):
    """A real 2-rank ZeRO-1 run (DeepSpeed's checkpoint: a directory of model and per-rank optimizer
    partitions, plus its helper scripts): truncating any one file of the newest checkpoint makes
    resume pick the one before, naming that file."""
    cmd = [sys.executable, "-m", "pretrain.launch", "--config", str(REPO / "configs" / "quickstart.yaml"), "--set",
           "data.task.num_train=64", "data.task.num_val=16", "train.batch_size=4", "train.eval_batches=1",
           "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "tracking.enabled=false",
           "train.checkpoint_every=2", "train.steps=4", "train.eval_every=100", "launch.run_name=r",
           "launch.nproc=2", "parallel.zero_stage=1", "tracking.log_samples=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart" / "r"
    newest = run_dir / "checkpoints" / "step_0000004"
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    names = {p.relative_to(newest).as_posix() for p in files}
    assert {"deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rank_00001.pt", ckpt.MANIFEST} <= names
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        why = ckpt.damage(newest, checksums=False)
        assert why is not None and (f.name == ckpt.MANIFEST or f.relative_to(newest).as_posix() in why)
        assert ckpt.latest_checkpoint(run_dir).name == "step_0000002"
        f.write_bytes(data)
    assert ckpt.latest_checkpoint(run_dir).name == "step_0000004"


def test_inference_paths_resolve_to_one_checkpoint_or_say_what_is_wrong(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20):
        save(run, step, float(step))
    newest = run / "checkpoints" / "step_0000020"
    older = run / "checkpoints" / "step_0000010"
    assert ckpt.resolve_checkpoint(run) == newest  # a run directory: its latest
    assert ckpt.resolve_checkpoint(older) == older  # a checkpoint directory: itself
    assert ckpt.resolve_checkpoint(older / "model.pt") == older  # a file in one: its directory
    assert ckpt.run_dir_of(older) == run
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint nor a run directory.*train the run first"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    (older / "model.pt").write_bytes(b"flipped")
    with pytest.raises(ckpt.CheckpointError, match="step_0000010 is damaged"):
        ckpt.resolve_checkpoint(older)
