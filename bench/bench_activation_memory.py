"""Activation memory with and without activation checkpointing (issue 18 item 13), measured on CPU.

What is measured: the bytes of activations held between the forward and the backward pass of one
training micro-batch (model forward + the masked-token cross-entropy), i.e. what a checkpointing
mode saves. Counted as the unique storages (deduplicated by storage pointer, whole storage size) of

  - every tensor autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`), and
  - the inputs a checkpointed block keeps for its recompute (x, the time condition, the mask),
    which the non-reentrant checkpoint holds itself rather than through autograd's saved tensors,

minus the storages of parameters and buffers (weights are not activations). Inside a checkpointed
block nothing else is held: the checkpoint's own hooks replace ours there. The count is exact for
what autograd holds; it excludes the allocator's fragmentation and temporaries that die inside the
forward (peak-within-forward), which a GPU's `max_memory_allocated` would also see.

    python bench/bench_activation_memory.py           # quickstart and MDLM-small shapes
    python bench/bench_activation_memory.py --batch 2 # per-row numbers are the same; smaller is faster

Modes: none, all, every_k with k=2 (`train.activation_checkpointing`). Writes
bench/results/bench_activation_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parallel.activation_checkpointing import apply_activation_checkpointing, is_checkpointed  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.model import build_model  # noqa: E402

# name: (config, vocab, sequences per micro-batch by default)
SHAPES = {
    "quickstart": (ROOT / "configs" / "quickstart.yaml", 16, 32),  # Sudoku: 12 symbols + 4 specials
    "mdlm-small": (ROOT / "configs" / "lm1b_bell.yaml", 30522, 8),  # bert-base-uncased's vocabulary
}
MODES = [("none", 2), ("all", 2), ("every_k", 2)]


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def held_activation_bytes(model: torch.nn.Module, ids: torch.Tensor, real: torch.Tensor) -> tuple[int, int]:
    """(activation bytes held at the end of the forward, number of distinct storages)."""
    weights = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}
    held: dict[int, int] = {}

    def note(t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            k = storage_key(t)
            if k not in weights:
                held[k] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    def keep_inputs(module: torch.nn.Module, args: tuple) -> None:
        for a in args:
            note(a)

    handles = [b.register_forward_pre_hook(keep_inputs) for b in model.blocks if is_checkpointed(b)]
    g = torch.Generator().manual_seed(0)
    t = torch.rand(ids.shape[0], generator=g)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            logits = model(ids, t, key_padding_mask=real)
            loss = F.cross_entropy(logits[real], ids[real])
    finally:
        for h in handles:
            h.remove()
    loss.backward()  # the measured graph is a real one: it must run backward
    return sum(held.values()), len(held)


def measure(shape: str, batch: int | None) -> list[dict]:
    path, vocab, default_batch = SHAPES[shape]
    cfg = load_config(path)
    m, L = cfg.model, cfg.data.seq_len
    B = batch or default_batch
    rows = []
    for mode, k in MODES:
        torch.manual_seed(0)
        model = build_model(m, vocab, L)
        chosen = apply_activation_checkpointing(model, mode, k)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (B, L), generator=g)
        real = torch.ones(B, L, dtype=torch.bool)
        real[:, int(0.8 * L):] = False  # padded rows, as packing=pad gives
        nbytes, n = held_activation_bytes(model, ids, real)
        rows.append({"shape": shape, "mode": mode if mode != "every_k" else f"every_{k}",
                     "checkpointed_blocks": len(chosen), "n_layers": m.n_layers, "d_model": m.d_model,
                     "seq_len": L, "batch": B, "vocab": vocab, "held_bytes": nbytes, "held_storages": n,
                     "bytes_per_sequence": nbytes / B})
    base = rows[0]["held_bytes"]
    for r in rows:
        r["vs_none"] = r["held_bytes"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--batch", type=int, default=0, help="sequences per micro-batch (0 = each shape's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_activation_memory.json"))
    args = p.parse_args(argv)
    rows = [r for s in args.shapes for r in measure(s, args.batch or None)]
    head = ["shape", "mode", "ckpt blocks", "L x batch", "held MiB", "MiB/seq", "vs none"]
    lines = [[r["shape"], r["mode"], f"{r['checkpointed_blocks']}/{r['n_layers']}", f"{r['seq_len']}x{r['batch']}",
              f"{r['held_bytes'] / 2**20:.1f}", f"{r['bytes_per_sequence'] / 2**20:.2f}", f"{r['vs_none']:.2f}x"]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    print("activation bytes held between forward and backward (fp32, CPU)")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "dtype": "fp32", "device": "cpu"}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
