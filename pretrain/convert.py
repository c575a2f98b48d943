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

from pretrain.checkpoint import (
    PORTABLE,
    CheckpointError,
    _write_latest,
    checkpoint_root,
    consolidated_state_dict,
    load_model_for_inference,
    load_trainer_state,
    resolve_checkpoint,
    seal,
)
from pretrain.generate import load_tokenizer_for


def write_portable(src: str | Path, run_dir: str | Path) -> Path:
    """Write checkpoint `src` as a portable checkpoint of run directory `run_dir`; returns its path."""
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
