"""Checkpoint conversion: any layout's checkpoint -> one consolidated state dict, or a portable checkpoint.

    python -m pretrain.convert runs/lm1b/RUN/checkpoints/step_0100000 --out model.pt [--ema]
        the plain model's full state dict in one file (evaluation, sampling, the density annotator);
        --ema: the moving average of the weights (train.ema) instead
    python -m pretrain.convert runs/lm1b/RUN --hf hf/RUN [--no-ema]
        a Hugging Face model directory (safetensors, config.json, modeling code, the tokenizer):
        AutoModelForMaskedLM (AutoModelForCausalLM for variant ar).from_pretrained(OUT,
        trust_remote_code=True); the moving average of the weights when the run kept one (--no-ema: not).
        Needs the `hf` extra (pip install 'dlm-pretrain[hf]'); loading needs transformers.
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


# the model's own files, copied into a Hugging Face export with their imports made relative
HF_MODEL_FILES = {"transformer.py": "dlm_transformer.py", "attention_masks.py": "attention_masks.py",
                  "attention_kernel.py": "attention_kernel.py", "kv_cache.py": "kv_cache.py"}
# (transformer.py imports the config for annotations only, under `if TYPE_CHECKING:`)
HF_IMPORTS = {"    from pretrain.config import ModelConfig\n": "    pass  # pretrain.config's ModelConfig\n",
              "from pretrain.model.attention_masks import": "from .attention_masks import",
              "from pretrain.model.attention_kernel import": "from .attention_kernel import",
              "from pretrain.model.kv_cache import": "from .kv_cache import"}


def export_hf(src: str | Path, out: str | Path, ema: bool | None = None) -> Path:
    """Write checkpoint (or run directory) `src` as a Hugging Face model directory `out`; returns `out`.

    The weights go to model.safetensors under the keys of `pretrain/hf/modeling_dlm.py`'s wrapper
    (`model.` + the plain model's keys); the architecture is this framework's own transformer, copied
    beside it, so the exported logits are the checkpoint's."""
    import dataclasses
    import json

    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("the Hugging Face export needs safetensors: pip install 'dlm-pretrain[hf]'") from None
    from pretrain.checkpoint import load_model_for_inference
    from pretrain.generate import load_tokenizer_for

    out = Path(out)
    model, info = load_model_for_inference(src, ema=ema)
    ckpt, cfg = info["checkpoint"], info["config"]
    tok = load_tokenizer_for(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (tied embeddings)
    save_file({f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    model_dir = Path(__file__).parent / "model"
    for name, target in HF_MODEL_FILES.items():
        text = (model_dir / name).read_text()
        for old, new in HF_IMPORTS.items():
            text = text.replace(old, new)
        if "from pretrain" in text or "import pretrain" in text:
            raise CheckpointError(f"pretrain/model/{name} imports more of pretrain than the export carries; "
                                  "extend HF_IMPORTS in pretrain/convert.py")
        (out / target).write_text(text)
    shutil.copy2(Path(__file__).parent / "hf" / "modeling_dlm.py", out / "modeling_dlm.py")
    causal = cfg.model.variant == "ar"
    arch = "DLMForCausalLM" if causal else "DLMForMaskedLM"
    config = {
        "architectures": [arch], "model_type": "dlm",
        "auto_map": {"AutoConfig": "modeling_dlm.DLMConfig",
                     ("AutoModelForCausalLM" if causal else "AutoModelForMaskedLM"): f"modeling_dlm.{arch}"},
        "dlm_model": dataclasses.asdict(cfg.model), "vocab_size": info["vocab_size"], "max_seq_len": cfg.data.seq_len,
        "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        "mask_token_id": tok.mask_id, "schedule": cfg.diffusion.schedule, "torch_dtype": "float32",
        "dlm_source": {"checkpoint": str(ckpt), "step": info["step"], "ema": info["ema"], "data": cfg.data.source,
                       "tokenizer": cfg.data.tokenizer},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(out / "dlm_tokenizer")
    (out / "README.md").write_text(
        f"# {cfg.name} ({cfg.model.variant}), step {info['step']}{' (EMA weights)' if info['ema'] else ''}\n\n"
        f"Exported by dlm-pretrain from {ckpt}.\n\n```python\nfrom transformers import "
        f"{'AutoModelForCausalLM' if causal else 'AutoModelForMaskedLM'}\n"
        f"model = {'AutoModelForCausalLM' if causal else 'AutoModelForMaskedLM'}.from_pretrained(PATH, "
        f"trust_remote_code=True)\nfrom data_pipeline.tokenizer import load_tokenizer  # dlm-pretrain\n"
        f"tok = load_tokenizer(PATH + '/dlm_tokenizer')\n```\n\nMasked positions hold mask_token_id "
        f"{tok.mask_id}; decode with `python -m pretrain.generate`.\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory (…/checkpoints/step_*) or a run directory (its latest)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="write the consolidated plain state dict to this .pt file")
    out.add_argument("--portable", metavar="RUN_DIR", help="write a portable checkpoint into this run directory")
    out.add_argument("--hf", metavar="OUT", help="write a Hugging Face model directory (needs the hf extra)")
    p.add_argument("--ema", action="store_true", help="with --out: the moving average of the weights (train.ema)")
    p.add_argument("--no-ema", action="store_true", help="with --hf: the raw weights, not their moving average")
    args = p.parse_args(argv)
    try:
        from pretrain.checkpoint import resolve_checkpoint

        src = resolve_checkpoint(args.checkpoint)
        if args.hf:
            dst = export_hf(src, args.hf, ema=False if args.no_ema else None)
            print(f"wrote Hugging Face model {dst}; load it with from_pretrained({str(dst)!r}, trust_remote_code=True)")
        elif args.out:
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
