"""Seed 003's measurement: how parallel decoding (k tokens per step) departs from the joint on Sudoku.

For each run (trained here from the recipes, or given with --run) it decodes the validation puzzles
with k tokens per step for every k of --k and every semi-AR block size of --block-size
(pretrain/parallel_decoding.py) and prints, per run, the solve rate, the constraint violations per
puzzle (row + column + box duplicates), the givens changed, and the gap between the committed tokens'
summed log-marginals and their chain-rule log-likelihood (per step and per token; 0 at k = 1).

The default compares seed 003's proposal (configs/tasks/sudoku_seed003.yaml: blockwise reverse-order
training, our reading) with uniform masking (configs/tasks/sudoku_mdm.yaml), each trained once for
--steps steps (a CPU-minutes budget: the models are far from solving Sudoku; the gap and the
violations still show how parallel decoding degrades). JSON: bench/results/bench_parallel_decoding.json.

    python bench/bench_parallel_decoding.py --steps 300
    python bench/bench_parallel_decoding.py --run runs/tasks/sudoku_mdm --k 1,4,16,all --block-size 0,8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = ("configs/tasks/sudoku_mdm.yaml", "configs/tasks/sudoku_seed003.yaml")


def train(recipe: str, steps: int, out: Path, sets: list[str]) -> tuple[Path, float]:
    from pretrain.launch import main as launch

    name = Path(recipe).stem
    t0 = time.perf_counter()
    rc = launch(["--config", str(ROOT / recipe), "--log-level", "WARNING", "--set", f"train.steps={steps}",
                 f"launch.output_dir={out}", f"launch.run_name={name}", "tracking.enabled=false",
                 f"train.eval_every={steps}", "launch.resume=false", *sets])
    if rc != 0:
        raise RuntimeError(f"training {recipe} failed (exit {rc})")
    return next(out.glob(f"*/{name}")), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], help="measure this run dir (repeatable; no training)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipes to train when no --run is given")
    p.add_argument("--steps", type=int, default=300, help="training steps per recipe")
    p.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for training (e.g. model.d_model=128)")
    p.add_argument("--k", default="1,2,4,8,16,all", help="tokens per step ('all' = one step)")
    p.add_argument("--block-size", default="0,8", help="semi-AR block sizes (0 = the whole answer)")
    p.add_argument("--order", default="confidence")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="", help="run directories (default: a temporary directory)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "bench_parallel_decoding.json"))
    args = p.parse_args(argv)

    import torch

    from pretrain.evaluate import load_model
    from pretrain.parallel_decoding import format_rows, parallel_decoding_metrics, parse_ks

    ks = parse_ks(args.k)
    block_sizes = [int(b) for b in args.block_size.split(",")]
    runs: list[tuple[Path, float | None]] = [(Path(r), None) for r in args.run]
    if not runs:
        out = Path(args.out or tempfile.mkdtemp(prefix="bench-pd-"))
        runs = [train(r, args.steps, out, list(args.set)) for r in args.recipes]
    device = torch.device(args.device)
    results, tables = [], []
    for run_dir, train_s in runs:
        model, cfg, info, meta = load_model(run_dir, device)
        path = meta["checkpoint"]
        t0 = time.perf_counter()
        rows = parallel_decoding_metrics(model, cfg, info, ks, block_sizes, args.order, args.num_samples,
                                         args.batch_size, device)
        head = (f"# {cfg.name}: variant={cfg.model.variant} masking={cfg.diffusion.masking} "
                f"model.block_size={cfg.model.block_size} steps={cfg.train.steps} "
                f"params={sum(q.numel() for q in model.parameters())} givens={cfg.data.task.sudoku.givens} "
                f"order={args.order} greedy device={device.type} ({time.perf_counter() - t0:.0f} s to measure)")
        tables.append(head + "\n" + format_rows(rows))
        print(tables[-1], flush=True)
        results.append({"run": str(run_dir), "checkpoint": str(path), "recipe": cfg.name, "variant": cfg.model.variant,
                        "masking": cfg.diffusion.masking, "train_steps": cfg.train.steps, "train_s": train_s,
                        "device": device.type, "torch": torch.__version__, "rows": rows})
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"args": vars(args), "results": results, "tables": tables}, indent=1) + "\n")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
