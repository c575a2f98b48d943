"""Runs at once vs threads per run for a sweep of small models (issue 22: bench/seed001_sweep.py --jobs).

Trains the same recipe for a few steps (a) as one process with every core's torch threads and (b) as
`--jobs` processes at once with cores // jobs threads each, through `python -m pretrain.launch` (no
evaluation, no tracking), and compares aggregate training tokens per second from the trainer's own
logged step times (the median over the logged steps after the first `--skip`, so start-up and the
first steps' allocations are left out). Prints a table and writes JSON.

    python bench/bench_jobs.py                                   # char_uniform.yaml, 2 jobs
    python bench/bench_jobs.py --recipe configs/repro/char_ar.yaml --steps 80
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(recipe: str, name: str, out: Path, steps: int, threads: int) -> subprocess.Popen:
    sets = [f"train.steps={steps}", f"train.eval_every={10 * steps}", "train.log_every=5", "tracking.enabled=false",
            "train.checkpoint_every=0", f"launch.output_dir={out}", f"launch.run_name={name}", "launch.resume=false",
            "train.ema=0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pretrain.launch", "--config", recipe, "--log-level", "WARNING",
                             "--set", *sets], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def tokens_per_s(run_dir: Path, skip: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["train/tokens_per_s"] for r in rows if r.get("kind") == "train" and r["step"] > skip]
    if not rates:
        raise RuntimeError(f"{run_dir}: no logged training step after step {skip}; raise --steps")
    return statistics.median(rates)


def trial(recipe: str, out: Path, jobs: int, steps: int, skip: int, cores: int, tag: str) -> dict:
    threads = max(1, cores // jobs)
    t0 = time.perf_counter()
    procs = {f"{tag}-j{jobs}-{i}": launch(recipe, f"{tag}-j{jobs}-{i}", out, steps, threads) for i in range(jobs)}
    for name, p in procs.items():
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"run {name} failed (exit {p.returncode}):\n{err[-2000:]}")
    rates = [tokens_per_s(next(d for d in out.rglob(name) if d.is_dir()), skip) for name in procs]
    return {"jobs": jobs, "threads_per_run": threads, "tokens_per_s_each": rates,
            "tokens_per_s_total": sum(rates), "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="configs/repro/char_uniform.yaml")
    p.add_argument("--jobs", type=int, default=2, help="runs at once in the parallel arm (default 2)")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--skip", type=int, default=10, help="logged steps up to this one are left out (default 10)")
    p.add_argument("--repeats", type=int, default=2, help="alternations of the two arms (default 2)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_jobs.json"))
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_jobs-") as tmp:
        for rep in range(args.repeats):  # interleaved: machine load drifts between the arms equally
            for jobs in (1, args.jobs):
                r = trial(args.recipe, Path(tmp), jobs, args.steps, args.skip, cores, f"r{rep}")
                r["repeat"] = rep
                rows.append(r)
                print(f"  repeat {rep}: {jobs} run(s) x {r['threads_per_run']} thread(s): "
                      f"{r['tokens_per_s_total']:,.0f} tokens/s in all", flush=True)
    one = statistics.median(r["tokens_per_s_total"] for r in rows if r["jobs"] == 1)
    many = statistics.median(r["tokens_per_s_total"] for r in rows if r["jobs"] == args.jobs)
    print(f"\n{args.recipe}, {cores} cores, {args.steps} steps per run (median over logged steps > {args.skip})")
    print(f"{'arm':28s} {'tokens/s in all':>16s} {'ratio':>7s}")
    print(f"{'1 run x ' + str(cores) + ' threads':28s} {one:16,.0f} {1.0:7.2f}")
    print(f"{str(args.jobs) + ' runs x ' + str(max(1, cores // args.jobs)) + ' thread(s)':28s} {many:16,.0f} {many / one:7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"recipe": args.recipe, "cores": cores, "steps": args.steps, "rows": rows,
                                          "ratio": many / one}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
