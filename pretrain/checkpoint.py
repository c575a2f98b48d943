"""Atomic, resumable checkpoints in the run directory.

Layout: `<run_dir>/checkpoints/step_0000300/` holds `trainer_state.pt` (step, counters, scheduler, loader
position, layout), `rank_XXXXX.pt` (each rank's RNG state), `config.yaml`, and the engine's files:
`model.pt` + `optimizer.pt` (single process) or `deepspeed/` (DeepSpeed's ZeRO partitions);
`<run_dir>/checkpoints/latest` is a one-line file naming the newest complete checkpoint.

A checkpoint is written into a temporary sibling directory, every file fsynced, then sealed with
`manifest.json` (every file's size and sha256, written last and fsynced), then renamed into place;
only then is `latest` replaced (itself via temp file + rename). A process killed at any moment
therefore leaves either the previous checkpoint or the new one, never a half-written one that looks
whole. What happens to the files afterwards (a disk filling up under a copy, an interrupted rsync, bit
rot) is caught on resume: `latest_checkpoint` checks each checkpoint against its manifest, newest
first, names every damaged one in the log with what is wrong, and returns the newest intact one.
Loading uses `torch.load(weights_only=True)`: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data_pipeline.build import resolve_shard_dir
from data_pipeline.stream import trains_on_response
from parallel.pipeline import consolidate_layer_files, plain_key
from parallel.tensor_parallel import merge_state_dicts
from pretrain.config import load_config
from pretrain.model import build_model

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and what to do."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted({p.parent for p in path.rglob("*")} | {path}):
        _fsync_dir(d)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def seal(directory: Path) -> None:
    """fsync every file of a finished checkpoint directory, then write its manifest (every file's
    size and sha256) last, fsynced: a directory with a manifest that matches its files is whole."""
    _fsync_tree(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    _fsync_dir(directory)


def damage(path: str | Path, checksums: bool = True) -> str | None:
    """What is wrong with checkpoint `path` against its manifest (None when it is intact).

    `checksums=False` checks presence and sizes only (catches truncation without reading the files);
    resuming checks the sha256 of every file too. A checkpoint written before manifests existed has
    none: it is accepted when its trainer_state.pt is there (unverified)."""
    path = Path(path)
    if not path.is_dir():
        return "the directory is missing"
    manifest = path / MANIFEST
    if not manifest.is_file():
        if (path / "trainer_state.pt").is_file():
            return None  # written before manifests: nothing to check against
        return f"{MANIFEST} and trainer_state.pt are missing (incomplete)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} cannot be read ({type(e).__name__})"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{name} has {size} bytes, the manifest says {meta['size']} (truncated or overwritten)"
    if checksums:
        for name, meta in files.items():
            if _sha256(path / name) != meta["sha256"]:
                return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def rank_state_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    write_engine_state: Callable[[Path], None],
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    config_yaml: str,
    keep: int,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write checkpoint `step` atomically (every rank calls), point `latest` at it, keep the newest `keep`.

    All ranks write into one temporary directory (the engine's files: plain weights and optimizer,
    or DeepSpeed's ZeRO partitions; and each rank's RNG state); rank 0 then fsyncs it, renames it
    into place and only then moves `latest`."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}"  # the same name on every rank
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a writer that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    write_engine_state(tmp)
    torch.save(rank_state, tmp / rank_state_file(rank))
    if rank == 0:
        torch.save({"format_version": FORMAT_VERSION, **trainer_state}, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    barrier()
    if rank == 0:
        seal(tmp)
        if final.exists():  # re-saving the same step (e.g. a resumed run that ends where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_latest(root, final.name)
        _prune(root, keep, final)
        log.info("checkpoint saved: %s", final)
    barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Keep the `keep` newest checkpoints up to `newest` (the one just written). Newer ones than that
    (left by a run that resumed from an earlier checkpoint, e.g. past a damaged one) are not counted,
    so they never crowd out the checkpoint just written; saving their step again replaces them."""
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name <= newest.name)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a writer that was killed (ours was renamed already)
        shutil.rmtree(stale, ignore_errors=True)


_reported: set[tuple[str, str]] = set()


def latest_checkpoint(run_dir: str | Path, checksums: bool = True) -> Path | None:
    """The newest intact checkpoint of the run, or None when it has none.

    Candidates are the step_* directories up to the one `latest` names (a hand-edited `latest` picks
    an earlier one), newest first; each damaged one is named in the log with what is wrong (once per
    process) and skipped. Checkpoints that exist but are all damaged are an error, not a fresh start.
    `checksums=False`: sizes only (for reports; resuming reads every byte once)."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    named = pointer.read_text().strip()
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name <= named), reverse=True)
    damaged = []
    for path in candidates:
        why = damage(path, checksums)
        if why is None:
            if path.name != named and (str(path), "picked") not in _reported:
                _reported.add((str(path), "picked"))
                log.warning("using %s, the newest intact checkpoint (%s names %s)", path, pointer, named)
            return path
        damaged.append(f"{path.name}: {why}")
        if (str(path), why) not in _reported:
            _reported.add((str(path), why))
            log.warning("checkpoint %s is damaged, skipped: %s", path, why)
    if not candidates:
        raise CheckpointError(
            f"{pointer} names {named}, which is missing, and no earlier checkpoint exists; "
            f"delete {pointer} to start over, or point it at an existing step_* directory"
        )
    raise CheckpointError(
        f"no intact checkpoint in {root} ({'; '.join(damaged)}); restore one from a copy, or move {root} "
        f"away to start the run over"
    )


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The rank-independent trainer state of a checkpoint (step, counters, scheduler, loader, layout)."""
    path = Path(path)
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: trainer_state.pt is missing") from None
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); use an earlier one") from None
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, this code reads {FORMAT_VERSION}")
    return state


def load_rank_state(path: str | Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state, or None when the checkpoint was written by fewer ranks."""
    f = Path(path) / rank_state_file(rank)
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def _trains_on_response(data_cfg) -> bool:
    """Whether the run trained on responses (prompt clean and visible): data_pipeline.stream's rule."""
    return trains_on_response(data_cfg)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: a checkpoint directory (.../checkpoints/step_*), a
    file inside one (its model.pt), or a run directory (its latest intact checkpoint). Refused, with
    what to do, when there is none or it is damaged."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        path = path.parent
    if (path / "trainer_state.pt").is_file() or (path / MANIFEST).is_file():
        if (why := damage(path)) is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {why}; use an earlier one")
        return path
    if not checkpoint_root(path).is_dir():
        raise CheckpointError(f"{path} is neither a checkpoint nor a run directory with one (no checkpoints/ "
                              f"in it): train the run first, or name a checkpoint directory")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no checkpoint (checkpoints/latest); train it first")
    return latest


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory a checkpoint directory belongs to (None for one copied elsewhere)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


# ---------------------------------------------------------------------------------------------
# Consolidation: the plain model's state dict from any layout (inference, convert, portable)
# ---------------------------------------------------------------------------------------------

PORTABLE = "portable"  # the engine of a checkpoint `pretrain.convert --portable` wrote: model.pt only


def consolidated_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full, plain (single-process) model state dict of checkpoint directory `path`; with `ema`,
    the moving average of the weights (train.ema) instead of the weights."""
    path = Path(path)
    state = load_trainer_state(path)
    layout = state.get("layout", {"engine": "plain"})
    if ema:
        return consolidated_ema(path, state, layout)
    if layout["engine"] in ("plain", PORTABLE):
        return torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    ds_dir = path / "deepspeed"
    if not ds_dir.is_dir():
        raise CheckpointError(f"{path}: layout {layout} but no deepspeed/ directory; the checkpoint is incomplete")
    tp = int(layout.get("tp", 1))
    if layout["engine"] == "pipeline":  # one file per pipeline layer (and tensor-parallel rank)
        try:
            shards = [consolidate_layer_files(ds_dir, r) for r in range(tp)]
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: {e}") from None
    elif int(layout.get("zero_stage", 0)) == 3:
        if tp > 1:
            raise CheckpointError(f"{path}: consolidating ZeRO-3 with tensor parallelism is not supported")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed"))
    else:
        shards = []
        for r in range(tp):
            f = ds_dir / f"mp_rank_{r:02d}_model_states.pt"
            if not f.is_file():
                raise CheckpointError(f"{path}: {f.name} is missing (tensor-parallel rank {r} of {tp})")
            shards.append(torch.load(f, map_location="cpu", weights_only=True)["module"])
    if tp == 1:
        return {k: v for k, v in shards[0].items() if isinstance(v, torch.Tensor)}
    vocab = state.get("vocab_size")
    if vocab is None:
        raise CheckpointError(f"{path}: the trainer state does not record vocab_size, needed to merge TP shards")
    return merge_state_dicts(shards, int(vocab))


def consolidated_ema(path: Path, state: dict, layout: dict) -> dict[str, torch.Tensor]:
    """The weight average from the rank files: of every pipeline stage and tensor-parallel rank, the
    data-parallel rank 0's (ranks are ordered tp fastest, then dp, then pp, as megatron-core and
    DeepSpeed order them), renamed to the plain model's keys and merged over tensor ranks."""
    if layout["engine"] == PORTABLE:
        raise CheckpointError(f"{path}: a portable checkpoint carries the weights only, not their average (train.ema)")
    tp, pp, dp = (int(layout.get(k, 1)) for k in ("tp", "pp", "dp"))
    per_tp = []
    for r in range(tp):
        merged: dict[str, torch.Tensor] = {}
        for stage in range(pp):
            f = path / rank_state_file(stage * dp * tp + r)
            average = torch.load(f, map_location="cpu", weights_only=True).get("ema") if f.is_file() else None
            if average is None:
                raise CheckpointError(f"{path}: {f.name} holds no weight average; was the run trained with train.ema > 0?")
            merged.update(average)
        per_tp.append(merged)
    if pp > 1:
        n_layers = max(int(k.split(".", 1)[0]) for k in per_tp[0]) - 1
        per_tp = [{plain_key(int(k.split(".", 1)[0]), k.split(".", 1)[1], n_layers): v for k, v in d.items()}
                  for d in per_tp]
    if tp == 1:
        return per_tp[0]
    return merge_state_dicts(per_tp, int(state["vocab_size"]))


def load_model_for_inference(path: str | Path, device: str | torch.device = "cpu", ema: bool | None = None):
    """(model in eval mode on `device`, info) from a checkpoint directory (.../checkpoints/step_*), a
    file inside one, or a run directory (its latest checkpoint), any layout (weights consolidated by
    pretrain.convert): the one loader of every inference tool (evaluate, generate, convert --hf,
    parallel_decoding, the lm-eval adapter, the density `model` annotator).

    info: checkpoint (its directory), config (the run's Config), variant, vocab_size, seq_len,
    block_size, step, ema (whether the weights are the moving average), trains_on_response
    (data.train_on resolved: the model expects a clean prompt_mask), and tokenizer_fingerprint
    when the run's shard directory is still there (None otherwise). `ema` None: the moving average
    when the run kept one (train.ema > 0), as MDLM evaluates. The public entry point through which
    `data_pipeline` (the density `model` annotator) may load a trained model."""
    path = resolve_checkpoint(path)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path}: config.yaml is missing, so the model cannot be rebuilt")
    cfg = load_config(path / "config.yaml")
    state = load_trainer_state(path)
    if ema is None:
        ema = cfg.train.ema > 0 and state.get("layout", {}).get("engine") != "portable"
    weights = consolidated_state_dict(path, ema=ema)
    vocab = state.get("vocab_size") or cfg.model.vocab_size
    if not vocab:
        emb = [v for k, v in weights.items() if k.endswith("weight") and v.dim() == 2]
        vocab = int(emb[0].shape[0]) if emb else 0
    model = build_model(cfg.model, int(vocab), cfg.data.seq_len)
    model.load_state_dict(weights)
    model.to(device).eval()
    fingerprint = None
    try:
        import json

        tok_file = resolve_shard_dir(cfg.data) / "tokenizer.json"
        if tok_file.is_file():
            fingerprint = json.loads(tok_file.read_text()).get("fingerprint")
    except Exception:  # the shard directory is gone or elsewhere: the vocabulary size still guards
        fingerprint = None
    step = int(state.get("train_state", {}).get("step", state.get("step", 0)))
    info = {"checkpoint": path, "config": cfg, "variant": cfg.model.variant, "vocab_size": int(vocab),
            "seq_len": cfg.data.seq_len, "block_size": cfg.model.block_size, "step": step, "ema": bool(ema),
            "tokenizer_fingerprint": fingerprint,
            "trains_on_response": _trains_on_response(cfg.data)}
    return model, info
