"""Seed 001 on one machine (issue 22): every arm x seed of the char-level experiment, resumable.

Each run is the product's own command (`python -m pretrain.launch --config configs/repro/char_*.yaml
--set ...`), all into one MLflow experiment (`seed001_char`, a sqlite store under --out); the
shards are built first (`python -m data_pipeline.build`) and the comparison made last
(`python -m pretrain.compare --headline`). A run whose metrics hold its final evaluation is
skipped, so the script can be interrupted (Ctrl-C, a reboot) and started again, across days: an
unfinished run resumes from its last checkpoint (train.checkpoint_every) through the launcher.
A larger --tokens extends finished runs (the budget is not part of a run's name).

Arms (all MDLM's baseline recipe: stratified t, SUBS, EMA; configs/repro/char_bell.yaml):
  uniform          t ~ U[eps, 1] (char_uniform.yaml), at the recipe's lr and at --alt-lr
  bell             logit-normal(0, 1), `reweighted` weighting (the recipe's), at both lrs
  bell_s0.5/1.5    logit-normal sigma 0.5 / 1.5 (bracket the paper's unknown density)
  beta22           Beta(2, 2), reweighted
  beta_rw, beta_elbo  Beta(2, 1.5) under `reweighted` and under `elbo` (the one bell where elbo's
                   importance weights have a finite, small variance; the config refuses elbo with a
                   logit-normal bell), so reweighted vs elbo is compared on the same density
  adaptive         diffusion.time_sampler=adaptive under `elbo` (the learned density stays unbiased)
  ar               the AR reference (char_ar.yaml), --ar-seeds seeds
An arm whose configuration the product refuses (e.g. `adaptive` before that sampler exists) is
reported and skipped, not run.

    python bench/seed001_sweep.py --dry-run                     # the plan: commands, done / to do
    python bench/seed001_sweep.py                               # everything (days on 2 cores)
    python bench/seed001_sweep.py --arms uniform bell --seeds 0 1 2 3 4 --tokens 20e6
    python bench/seed001_sweep.py --jobs 2                      # two runs at once, one thread each
                                                                # (1.02x on 2 cores: bench/bench_jobs.py)
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "seed001_char"
ALT_LR = 1.0e-3  # the second learning rate of the two main arms (the recipes' is 2e-3)


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    lr_sweep: bool = False  # also run at --alt-lr (the main arms)


ARMS = (
    Arm("uniform", "char_uniform", lr_sweep=True),
    Arm("bell", "char_bell", lr_sweep=True),
    Arm("bell_s0.5", "char_bell", ("diffusion.bell.sigma=0.5",)),
    Arm("bell_s1.5", "char_bell", ("diffusion.bell.sigma=1.5",)),
    Arm("beta22", "char_bell", ("diffusion.bell.family=beta", "diffusion.bell.a=2", "diffusion.bell.b=2")),
    Arm("beta_rw", "char_bell", ("diffusion.bell.family=beta", "diffusion.bell.a=2", "diffusion.bell.b=1.5")),
    Arm("beta_elbo", "char_bell", ("diffusion.bell.family=beta", "diffusion.bell.a=2", "diffusion.bell.b=1.5",
                                   "diffusion.weighting=elbo")),
    Arm("adaptive", "char_uniform", ("diffusion.time_sampler=adaptive", "diffusion.weighting=elbo")),
    Arm("ar", "char_ar"),
)
ARM_NAMES = tuple(a.name for a in ARMS)


@dataclass
class Run:
    arm: str
    seed: int
    lr: float
    run_name: str
    command: list[str]
    steps: int
    run_dir: Path
    problem: str = ""  # the config's refusal, if any

    @property
    def finished(self) -> bool:
        return final_eval_logged(self.run_dir, self.steps)


def final_eval_logged(run_dir: Path, steps: int) -> bool:
    """True when the run's metrics.jsonl holds the evaluation at its last step (the trainer evaluates
    at the end of every completed run): nothing left to train."""
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the run is not finished
            continue
        if rec.get("kind") == "eval" and rec.get("step") == steps and "val/nll" in rec:
            return True
    return False


def plan(arms: list[str], seeds: list[int], ar_seeds: list[int], tokens: float | None, alt_lr: float,
         out: Path, python: str = sys.executable) -> list[Run]:
    """The runs in the order they are trained: seed-major, so every arm has seed 0 before any has seed 1."""
    from pretrain.config import ConfigError, load_config

    out = out.resolve()
    common = [f"launch.output_dir={out}", f"tracking.uri=sqlite:///{out}/mlruns.db",
              f"tracking.artifact_location={out}/mlruns", f"tracking.experiment={EXPERIMENT}"]
    runs = []
    for seed in sorted(set(seeds) | set(ar_seeds)):
        for arm in (a for a in ARMS if a.name in arms):
            if seed not in (ar_seeds if arm.name == "ar" else seeds):
                continue
            recipe = ROOT / "configs" / "repro" / f"{arm.recipe}.yaml"
            base = load_config(recipe)
            lrs = [base.train.lr] + ([alt_lr] if arm.lr_sweep and alt_lr != base.train.lr else [])
            for lr in lrs:
                sets = [f"seed={seed}", f"name={arm.name}", *arm.overrides, f"train.lr={lr:g}"]
                steps = base.train.steps
                if tokens:  # the budget in tokens; ~37 evaluations and ~7 checkpoints whatever its size
                    steps = math.ceil(tokens / (base.train.batch_size * base.data.seq_len))
                    every = max(1, steps // 37)
                    sets += [f"train.steps={steps}", f"train.eval_every={every}",
                             f"train.checkpoint_every={max(every, steps // 7)}"]
                run_name = f"{arm.name}-lr{lr:g}-s{seed}"
                sets += [f"launch.run_name={run_name}", *common]
                problem = ""
                try:
                    cfg = load_config(recipe, sets)
                    steps = cfg.train.steps
                except ConfigError as e:
                    problem = str(e).replace("\n", " ")
                cmd = [python, "-m", "pretrain.launch", "--config", str(recipe.relative_to(ROOT)), "--set", *sets]
                runs.append(Run(arm.name, seed, lr, run_name, cmd, steps, out / EXPERIMENT / run_name, problem))
    return runs


def train_all(todo: list[Run], jobs: int, out: Path) -> int:
    """Train the runs in order, `jobs` at a time. With several jobs each run gets cores // jobs
    torch threads and writes its output to OUT/logs/RUN.log; the MLflow store takes concurrent
    writers (the tracker spools and retries a write that finds the sqlite file locked). Whether it
    pays is the machine's: bench/bench_jobs.py measures it (2 runs x 1 thread gave 1.02x the
    tokens/s of 1 run x 2 threads for char_uniform on the 2-core VM)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    logs = out / "logs"

    def one(i: int, r: Run) -> int:
        t0 = time.monotonic()
        print(f"[{time.strftime('%H:%M:%S')}] run {i}/{len(todo)}: {r.run_name}", flush=True)
        if jobs == 1:
            rc = subprocess.run(r.command, cwd=ROOT).returncode
        else:
            logs.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads), "TQDM_DISABLE": "1"}
            with open(logs / f"{r.run_name}.log", "a") as log:
                rc = subprocess.run(r.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            where = f" (its output: {logs / r.run_name}.log)" if jobs > 1 else ""
            print(f"run {r.run_name} failed (exit {rc}){where}; start the script again to resume it", file=sys.stderr)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {r.run_name} took {time.monotonic() - t0:.0f} s", flush=True)
        return rc

    if jobs == 1:
        for i, r in enumerate(todo, 1):
            if rc := one(i, r):
                return rc
        return 0
    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(one, range(1, len(todo) + 1), todo))
    return next((c for c in codes if c), 0)


def commands_around(out: Path, python: str = sys.executable) -> tuple[list[str], list[str]]:
    """The shard build before the runs and the comparison after them."""
    out = out.resolve()
    build = [python, "-m", "data_pipeline.build", "--config", "configs/repro/char_bell.yaml", "--no-progress"]
    compare = [python, "-m", "pretrain.compare", "--uri", f"sqlite:///{out}/mlruns.db", "--experiment", EXPERIMENT,
               "--headline", "--unigram-config", "configs/repro/char_bell.yaml", "--out", str(out / "compare")]
    return build, compare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/seed001_sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--arms", nargs="+", default=list(ARM_NAMES), choices=ARM_NAMES, metavar="ARM",
                   help=f"arms to run (default: all of {', '.join(ARM_NAMES)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of every MDM arm (default 0-4)")
    p.add_argument("--ar-seeds", nargs="*", type=int, default=[0, 1], help="seeds of the AR reference (default 0 1)")
    p.add_argument("--tokens", type=float, help="training tokens per run (default: the recipe's, 30.3M)")
    p.add_argument("--alt-lr", type=float, default=ALT_LR, help=f"second lr of uniform and bell (default {ALT_LR:g})")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "seed001",
                   help="run folders, the MLflow store and the comparison (default runs/seed001, gitignored)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument("--no-compare", action="store_true", help="do not run pretrain.compare at the end")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each with cores/jobs torch threads and its output in "
                        "OUT/logs/RUN.log (default 1: one run on every core, output here)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    runs = plan(args.arms, args.seeds, args.ar_seeds, args.tokens, args.alt_lr, args.out)
    build, compare = commands_around(args.out)
    done = [r for r in runs if r.finished]
    refused = [r for r in runs if r.problem]
    todo = [r for r in runs if not r.finished and not r.problem]
    print(f"{len(runs)} runs: {len(done)} finished, {len(todo)} to train, {len(refused)} refused by the config; "
          f"MLflow experiment {EXPERIMENT} at sqlite:///{args.out.resolve()}/mlruns.db")
    for arm in sorted({r.arm for r in refused}):
        print(f"  arm {arm} skipped: {next(r.problem for r in refused if r.arm == arm)}")
    if args.dry_run:
        print("$ " + shlex.join(build))
        for r in runs:
            state = "done" if r.finished else ("refused" if r.problem else "todo")
            print(f"[{state}] $ " + shlex.join(r.command))
        if not args.no_compare:
            print("$ " + shlex.join(compare))
        return 0
    subprocess.run(build, cwd=ROOT, check=True)
    rc = train_all(todo, max(1, args.jobs), args.out.resolve())
    if rc != 0:
        return rc
    if not args.no_compare:
        return subprocess.run(compare, cwd=ROOT).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
