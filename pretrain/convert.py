"""Checkpoint conversion: any layout's checkpoint -> one consolidated state dict, or a portable checkpoint.

    python -m pretrain.convert runs/lm1b/RUN/checkpoints/step_0100000 --out model.pt [--ema]
        the plain model's full state dict in one file (evaluation, sampling, the density annotator);
        --ema: the moving average of the weights (train.ema) instead
    python -m pretrain.convert runs/lm1b/RUN/checkpoints/step_0100000 --portable runs/lm1b/RUN-dp8
        a checkpoint any layout resumes from: launch the same recipe with
        `--set launch.run_name=RUN-dp8 parallel.tp=... launch.nproc=...`

Consolidation reads each engine's own files: a single process's `model.pt`; DeepSpeed ZeRO 0-2
model states, one file per tensor-parallel rank, merged by `parallel.tensor_parallel`; the pipeline
engine's per-layer files, renamed to the plain model's keys by `parallel.pipeline`; ZeRO-3's
partitioned fp32 weights through DeepSpeed's `zero_to_fp32`. A portable checkpoint carries the
weights, the step and token counters, the LR schedule and the (layout-independent) data-loader
position; the optimizer's moments start afresh in the new layout (the trainer warns), because
ZeRO keeps them as flat partitions tied to the layout that wrote them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from pretrain.checkpoint import CheckpointError, load_trainer_state

PORTABLE = "portable"


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
        from parallel.pipeline import consolidate_layer_files

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
    from parallel.tensor_parallel import merge_state_dicts

    vocab = state.get("vocab_size")
    if vocab is None:
        raise CheckpointError(f"{path}: the trainer state does not record vocab_size, needed to merge TP shards")
    return merge_state_dicts(shards, int(vocab))


def consolidated_ema(path: Path, state: dict, layout: dict) -> dict[str, torch.Tensor]:
    """The weight average from the rank files: of every pipeline stage and tensor-parallel rank, the
    data-parallel rank 0's (ranks are ordered tp fastest, then dp, then pp, as megatron-core and
    DeepSpeed order them), renamed to the plain model's keys and merged over tensor ranks."""
    from pretrain.checkpoint import rank_state_file

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
        from parallel.pipeline import plain_key

        n_layers = max(int(k.split(".", 1)[0]) for k in per_tp[0]) - 1
        per_tp = [{plain_key(int(k.split(".", 1)[0]), k.split(".", 1)[1], n_layers): v for k, v in d.items()}
                  for d in per_tp]
    if tp == 1:
        return per_tp[0]
    from parallel.tensor_parallel import merge_state_dicts

    return merge_state_dicts(per_tp, int(state["vocab_size"]))


def write_portable(src: str | Path, run_dir: str | Path) -> Path:
    """Write checkpoint `src` as a portable checkpoint of run directory `run_dir`; returns its path."""
    from pretrain.checkpoint import _write_latest, checkpoint_root, seal

    src = Path(src)
    state = load_trainer_state(src)
    weights = consolidated_state_dict(src)
    root = checkpoint_root(run_dir)
    dst = root / src.name
    tmp = root / f".tmp-{src.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(weights, tmp / "model.pt")
    state["layout"] = {"engine": PORTABLE, "converted_from": state.get("layout", {})}
    torch.save(state, tmp / "trainer_state.pt")
    if (src / "config.yaml").is_file():
        shutil.copy2(src / "config.yaml", tmp / "config.yaml")
    seal(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    _write_latest(root, dst.name)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory (…/checkpoints/step_*) or a run directory (its latest)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="write the consolidated plain state dict to this .pt file")
    out.add_argument("--portable", metavar="RUN_DIR", help="write a portable checkpoint into this run directory")
    p.add_argument("--ema", action="store_true", help="with --out: the moving average of the weights (train.ema)")
    args = p.parse_args(argv)
    src = Path(args.checkpoint)
    try:
        if not (src / "trainer_state.pt").is_file():
            from pretrain.checkpoint import latest_checkpoint

            latest = latest_checkpoint(src)
            if latest is None:
                raise CheckpointError(f"{src} is neither a checkpoint nor a run directory with one")
            src = latest
        if args.out:
            sd = consolidated_state_dict(src, ema=args.ema)
            torch.save(sd, args.out)
            print(f"wrote {args.out}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values")
        else:
            dst = write_portable(src, args.portable)
            print(f"wrote portable checkpoint {dst}; resume it with --set launch.run_name={Path(args.portable).name}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
