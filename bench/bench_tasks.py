"""Seed 000's comparison: AR, MDM, block diffusion, Jigsaw and Scatter on the controlled tasks.

For each (task x variant x seed) it trains configs/tasks/<task>_<variant>.yaml with a fixed token
budget through `python -m pretrain.launch`, evaluates the final checkpoint with
`python -m pretrain.evaluate` (the variant's own sampler, greedy), and prints per task and variant:
the headline metric's mean +- std over seeds (linreg: mse, lower is better; pathfinding: valid path
rate; sudoku: solved rate), a second metric, and the variance across seeds of the training loss
(mean over the last quarter of training): seed 000's stability measure. JSON: bench/results/bench_tasks.json.

    python bench/bench_tasks.py --quick                      # tiny budget, linreg + pathfinding
    python bench/bench_tasks.py --tasks sudoku --variants mdm jigsaw --tokens 2e6 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS = ("linreg", "pathfinding", "sudoku")
VARIANTS = ("ar", "mdm", "block", "jigsaw", "scatter")
SECOND = {"linreg": "mse_vs_lstsq", "pathfinding": "optimal", "sudoku": "cell_acc"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def one(task: str, variant: str, seed: int, tokens: float, out: Path, args) -> dict:
    import yaml

    cfg_file = ROOT / "configs" / "tasks" / f"{task}_{variant}.yaml"
    base = yaml.safe_load((ROOT / "configs" / "tasks" / f"{task}_base.yaml").read_text())
    seq_len, batch = base["data"]["seq_len"], args.batch_size or base["train"]["batch_size"]
    steps = max(1, int(tokens // (seq_len * batch)))
    name = f"{task}_{variant}_s{seed}"
    sets = [f"seed={seed}", f"train.steps={steps}", f"train.batch_size={batch}", f"launch.output_dir={out}",
            f"launch.run_name={name}", "tracking.enabled=false", f"train.eval_every={max(steps, 1)}",
            f"train.log_every={max(1, steps // 40)}", "train.warmup_steps=" + str(min(20, steps // 10)),
            "launch.resume=false"]
    t0 = time.perf_counter()
    run([sys.executable, "-m", "pretrain.launch", "--config", str(cfg_file), "--log-level", "WARNING", "--set", *sets])
    train_s = time.perf_counter() - t0
    run_dir = out / "tasks" / name
    metrics_json = run_dir / "eval.json"
    run([sys.executable, "-m", "pretrain.evaluate", "--run", str(run_dir), "--num-samples", str(args.num_samples),
         "--eval-batches", "4", "--json", str(metrics_json), "--show", "0", "--no-mlflow"])
    from pretrain.callbacks import read_metrics

    losses = [m["train/loss"] for _, m in sorted(read_metrics(run_dir).items())]
    tail = losses[-max(1, len(losses) // 4):]
    ev = json.loads(metrics_json.read_text())["metrics"]
    return {"task": task, "variant": variant, "seed": seed, "steps": steps, "tokens": steps * seq_len * batch,
            "train_s": train_s, "final_loss": statistics.fmean(tail), "metrics": ev}


def table(results: list[dict]) -> str:
    from data_pipeline.tasks import get_task

    lines = [f"{'task':<12} {'variant':<8} {'headline':<14} {'mean +- std':<20} {'second':<14} {'mean':<8} "
             f"{'val nll':<8} {'loss var (seeds)':<16} seeds"]
    for task in TASKS:
        for variant in VARIANTS:
            rs = [r for r in results if r["task"] == task and r["variant"] == variant]
            if not rs:
                continue
            h = get_task(task).headline
            vals = [r["metrics"][f"task/{h}"] for r in rs]
            sec = [r["metrics"].get(f"task/{SECOND[task]}", float("nan")) for r in rs]
            nll = [r["metrics"].get("val/nll", float("nan")) for r in rs]
            losses = [r["final_loss"] for r in rs]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            var = statistics.variance(losses) if len(losses) > 1 else 0.0
            lines.append(f"{task:<12} {variant:<8} {h:<14} {statistics.fmean(vals):.4f} +- {std:<10.4f} "
                         f"{SECOND[task]:<14} {statistics.fmean(sec):<8.4f} {statistics.fmean(nll):<8.4f} "
                         f"{var:<16.3g} {len(rs)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tokens", type=float, default=None, help="training tokens per run (steps = tokens / (seq_len x batch)); default 1.5e6")
    p.add_argument("--batch-size", type=int, default=0, help="0 = the recipe's")
    p.add_argument("--num-samples", type=int, default=None, help="validation prompts decoded per run")
    p.add_argument("--quick", action="store_true", help="linreg + pathfinding, 1.5e5 tokens, 64 prompts")
    p.add_argument("--out", default="", help="run directories (default: a temporary directory)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs recorded in --json")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "bench_tasks.json"))
    args = p.parse_args(argv)
    if args.quick:
        if args.tasks == list(TASKS):
            args.tasks = ["linreg", "pathfinding"]
        args.tokens = args.tokens or 1.5e5
        args.num_samples = args.num_samples or 64
    args.tokens, args.num_samples = args.tokens or 1.5e6, args.num_samples or 128
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-tasks-"))
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # A long sweep keeps what it has: results are written after every run, and --resume reuses the
    # runs of an earlier, interrupted sweep with the same token budget.
    done = {}
    if args.resume and json_path.exists():
        for r in json.loads(json_path.read_text())["results"]:
            if r.get("budget_tokens") == args.tokens:
                done[(r["task"], r["variant"], r["seed"])] = r
    results = []
    # Seed-major order: a sweep cut short (a time limit) still has every variant of the first seeds.
    for seed in args.seeds:
        for task in args.tasks:
            for variant in args.variants:
                if (task, variant, seed) in done:
                    results.append(done[(task, variant, seed)])
                    continue
                r = one(task, variant, seed, args.tokens, out, args)
                r["budget_tokens"] = args.tokens
                results.append(r)
                json_path.write_text(json.dumps({"args": vars(args), "results": results, "table": table(results)},
                                                indent=1))
                print(f"{task} {variant} seed {seed}: {r['steps']} steps in {r['train_s']:.0f} s, "
                      f"loss {r['final_loss']:.4f}, {json.dumps({k: round(v, 4) for k, v in r['metrics'].items()})}",
                      flush=True)
    print(table(results))
    json_path.write_text(json.dumps({"args": vars(args), "results": results, "table": table(results)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
