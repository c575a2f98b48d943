"""Compare runs from MLflow: a table, PNG plots and a markdown report.

    python -m pretrain.compare --experiment lm1b                           # every run of the experiment
    python -m pretrain.compare --experiment lm1b --tag time_sampler=bell --tag time_sampler=uniform
    python -m pretrain.compare --runs RUN_ID RUN_ID --baseline RUN_ID --out reports/bell_vs_uniform
    python -m pretrain.compare --experiment repro_bell --headline time_sampler=uniform:bell   # per-seed ratio
    python -m pretrain.compare --experiment seed001_char --headline --unigram-config configs/repro/char_bell.yaml

The headline column is "tokens to reach the baseline's final validation NLL" and its ratio to the
baseline's own tokens (seed 001 claims bell-shaped time sampling gets there ~4x sooner than
uniform). Validation NLL is the unbiased uniform-t bound for every masked-diffusion run, so runs
with different time samplers compare fairly. Runs are labelled by the config values that differ
between them.

`--headline KEY=BASE:TREAT` answers seed 001's question across seeds: runs are paired by `seed`;
for each pair, the tokens TREAT needs to reach BASE's final validation NLL, and two ratios (> 1:
TREAT is faster): BASE's tokens to first reach that NLL / TREAT's (conservative when BASE's curve
has flattened out), and BASE's whole budget / TREAT's (the paper's "same NLL, N x fewer steps");
then the mean and spread over seeds. A TREAT run that never gets there gives upper bounds.

`--headline` alone answers it for every arm of a sweep (bench/seed001_sweep.py): an arm is the
config `name` a run was launched with, at one train.lr; each arm is paired by seed with the
`--baseline-arm` (uniform) at the same lr. Per arm: tokens to reach the baseline's final NLL, the
speedup's geometric mean with a t-interval over seeds, the final-NLL difference with its
t-interval, the learning-rate sensitivity, and a plot of the mean curves with the unigram
(`--unigram-config`) and AR references.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.build import ensure_shards
from data_pipeline.shards import open_split
from pretrain.config import load_config

log = logging.getLogger(__name__)
ARMS = "arms"  # `--headline` given without a value

# Config keys that never explain a difference between runs (where and how a run was launched).
_IGNORED_PARAM_PREFIXES = ("launch.", "tracking.", "name", "data.shard_dir")


@dataclass
class RunRecord:
    run_id: str
    name: str
    params: dict[str, str]
    tags: dict[str, str]
    status: str
    val_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_elapsed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokens_per_s: float = math.nan
    label: str = ""

    @property
    def final_nll(self) -> float:
        return float(self.val_nll[-1]) if len(self.val_nll) else math.nan

    @property
    def best_nll(self) -> float:
        return float(self.val_nll.min()) if len(self.val_nll) else math.nan

    @property
    def wall_s(self) -> float:
        return float(self.val_elapsed[-1]) if len(self.val_elapsed) else math.nan

    @property
    def tokens(self) -> float:
        return float(self.val_tokens[-1]) if len(self.val_tokens) else math.nan


def tokens_to_reach(tokens: np.ndarray, nll: np.ndarray, target: float) -> float:
    """Tokens at which the validation curve first reaches `target`, linearly interpolated between
    evaluations; NaN if it never does."""
    for i, value in enumerate(nll):
        if value <= target:
            if i == 0:
                return float(tokens[0])
            x0, x1, y0, y1 = tokens[i - 1], tokens[i], nll[i - 1], nll[i]
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1)) if y0 != y1 else float(x1)
    return math.nan


def _history(client, run_id: str, key: str) -> list:
    """One value per step, the latest logged: `pretrain.evaluate` logs the same names as the trainer
    (val/nll at the checkpoint's step), and its later, fuller evaluation replaces the trainer's point."""
    by_step = {m.step: m for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))}
    return [by_step[s] for s in sorted(by_step)]


def load_runs(uri: str, experiment: str | None, run_ids: list[str], tags: list[str]) -> list[RunRecord]:
    """Runs selected by id, or by experiment and tag filters (KEY=VALUE; the same key twice = either)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        if not experiment:
            raise ValueError("give --experiment or --runs")
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments())
            raise ValueError(f"no experiment {experiment!r} at {uri}; experiments there: {names or 'none'}")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
        wanted: dict[str, set[str]] = {}
        for item in tags:
            key, _, value = item.partition("=")
            wanted.setdefault(key, set()).add(value)
        runs = [r for r in runs if all(r.data.tags.get(k) in vs for k, vs in wanted.items())]
    records = []
    for r in runs:
        rec = RunRecord(r.info.run_id, r.info.run_name or r.info.run_id[:8], dict(r.data.params),
                        dict(r.data.tags), r.info.status)
        val = _history(client, r.info.run_id, "val/nll")
        by_step_tokens = {m.step: m.value for m in _history(client, r.info.run_id, "val/tokens_seen")}
        by_step_elapsed = {m.step: m.value for m in _history(client, r.info.run_id, "val/elapsed_s")}
        rec.val_nll = np.array([m.value for m in val])
        rec.val_tokens = np.array([by_step_tokens.get(m.step, math.nan) for m in val])
        rec.val_elapsed = np.array([by_step_elapsed.get(m.step, math.nan) for m in val])
        loss = _history(client, r.info.run_id, "train/loss")
        rec.train_steps = np.array([m.step for m in loss])
        rec.train_loss = np.array([m.value for m in loss])
        tps = [m.value for m in _history(client, r.info.run_id, "train/tokens_per_s")]
        rec.tokens_per_s = float(np.median(tps)) if tps else math.nan
        records.append(rec)
    label_runs(records)
    return records


def label_runs(records: list[RunRecord]) -> None:
    """Label each run by the config values that differ between the runs (its name if none do)."""
    # keys every run has: a key only newer code logs is not a difference between the experiments
    keys = sorted(set.intersection(*(set(r.params) for r in records))) if records else []
    differing = [
        k for k in keys
        if not k.startswith(_IGNORED_PARAM_PREFIXES) and len({r.params.get(k) for r in records}) > 1
    ]
    for r in records:
        # an AR run's diffusion settings are unused: naming them would suggest a bell or uniform AR run
        keys = [k for k in differing if not (r.params.get("model.variant") == "ar" and k.startswith("diffusion."))]
        parts = [f"{k.split('.')[-1]}={r.params.get(k)}" for k in keys[:4]]
        r.label = ", ".join(parts) if parts else r.name
    if len({r.label for r in records}) < len(records):  # e.g. seeds differ only in ignored keys
        for r in records:
            r.label = f"{r.label} ({r.name})" if r.label != r.name else r.name


@dataclass
class Comparison:
    runs: list[RunRecord]
    baseline: RunRecord
    target_nll: float
    rows: list[dict]


def compare(records: list[RunRecord], baseline: str | None = None, target_nll: float | None = None) -> Comparison:
    """The table: per run, final/best NLL, tokens to reach the target and the speedup over the baseline.

    The baseline is the run named/identified by `baseline`, or the first run with a tag/config value
    given as KEY=VALUE (default: the first run); the target is
    the baseline's final validation NLL unless given."""
    if not records:
        raise ValueError("no runs matched")
    base = records[0]
    if baseline:
        if "=" in baseline:  # KEY=VALUE: the first run with that tag or config value (names carry a hash)
            key, _, value = baseline.partition("=")
            matches = [r for r in records if _value(r, key) == value]
        else:
            matches = [r for r in records if baseline in (r.run_id, r.name) or r.run_id.startswith(baseline)]
        if not matches:
            raise ValueError(f"baseline {baseline!r} is not among the selected runs: {[r.name for r in records]}")
        base = matches[0]
    target = base.final_nll if target_nll is None else target_nll
    base_tokens = tokens_to_reach(base.val_tokens, base.val_nll, target)
    rows = []
    for r in records:
        reach = tokens_to_reach(r.val_tokens, r.val_nll, target)
        rows.append({
            "run": r.name, "run_id": r.run_id, "label": r.label, "status": r.status,
            "final_val_nll": r.final_nll, "best_val_nll": r.best_nll,
            "tokens": r.tokens, "tokens_to_target": reach,
            "speedup_vs_baseline": base_tokens / reach if reach and not math.isnan(reach) else math.nan,
            "tokens_per_s": r.tokens_per_s, "wall_s": r.wall_s, "baseline": r is base,
        })
    return Comparison(records, base, target, rows)


def _value(r: RunRecord, key: str) -> str | None:
    """A tag (`time_sampler`) or a logged config value (`diffusion.time_sampler`) of a run."""
    return r.tags.get(key, r.params.get(key))


@dataclass
class Headline:
    key: str
    base: str
    treat: str
    pairs: list[dict]  # one per seed with both a BASE and a TREAT run

    def ratios(self) -> np.ndarray:
        """The seeds' speedups where TREAT reached the target (upper bounds left out)."""
        return np.array([p["ratio"] for p in self.pairs if p["reached"]])


def headline(records: list[RunRecord], key: str, base: str, treat: str) -> Headline:
    """Per seed: tokens TREAT needs to reach BASE's final NLL, and BASE's tokens to get there / TREAT's."""
    # pairs share the seed and the model variant (an AR reference logged beside them pairs with nothing)
    by_seed: dict[tuple[str, str], dict[str, RunRecord]] = {}
    for r in records:
        if not is_final(r):
            continue
        value = _value(r, key)
        if value in (base, treat):
            group = (r.params.get("seed", "?"), r.params.get("model.variant", ""))
            by_seed.setdefault(group, {}).setdefault(value, r)
    pairs = []
    for group in sorted(by_seed, key=lambda g: (g[1], len(g[0]), g[0])):
        seed, runs = group[0], by_seed[group]
        if base not in runs or treat not in runs:
            continue
        b, t = runs[base], runs[treat]
        target = b.final_nll
        b_tokens = tokens_to_reach(b.val_tokens, b.val_nll, target)
        t_tokens = tokens_to_reach(t.val_tokens, t.val_nll, target)
        reached = not math.isnan(t_tokens)
        pairs.append({
            "seed": seed, "base_run": b.name, "treat_run": t.name, "target_nll": target,
            "base_final_nll": b.final_nll, "treat_final_nll": t.final_nll,
            "base_tokens": b_tokens, "base_budget": b.tokens, "treat_tokens": t_tokens, "reached": reached,
            # never reached: TREAT would need more than all its tokens, so the ratios are below these
            "ratio": b_tokens / (t_tokens if reached else t.tokens),
            # the paper's reading: BASE's whole budget over TREAT's tokens to the same NLL (>= ratio)
            "budget_ratio": b.tokens / (t_tokens if reached else t.tokens),
        })
    if not pairs:
        raise ValueError(f"--headline {key}={base}:{treat}: no seed has both a {base!r} and a {treat!r} run")
    return Headline(key, base, treat, pairs)


def format_headline(h: Headline) -> str:
    """Markdown: one row per seed, then the ratio's mean and spread."""
    lines = [
        f"| seed | {h.base} final NLL (target) | {h.treat} final NLL | {h.base} tokens to target (first reached) | "
        f"{h.base} tokens (budget) | {h.treat} tokens to target | speedup vs first reached | speedup vs budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in h.pairs:
        reach = f"{p['treat_tokens']:,.0f}" if p["reached"] else "never reached"
        bound = "" if p["reached"] else "< "
        lines.append(f"| {p['seed']} | {p['target_nll']:.4f} | {p['treat_final_nll']:.4f} | "
                     f"{p['base_tokens']:,.0f} | {p['base_budget']:,.0f} | {reach} | "
                     f"{bound}{p['ratio']:.2f}x | {bound}{p['budget_ratio']:.2f}x |")
    r = h.ratios()
    rb = np.array([p["budget_ratio"] for p in h.pairs if p["reached"]])
    if len(r) == len(h.pairs) and len(r) > 1:
        summary = (f"speedup of {h.treat} over {h.base} (vs first reached): mean {r.mean():.2f}x, std "
                   f"{r.std(ddof=1):.2f}, range {r.min():.2f}x-{r.max():.2f}x over {len(r)} seeds; vs {h.base}'s "
                   f"budget: mean {rb.mean():.2f}x, range {rb.min():.2f}x-{rb.max():.2f}x")
    elif len(r) == len(h.pairs):
        summary = (f"speedup of {h.treat} over {h.base}: {r[0]:.2f}x vs first reached, {rb[0]:.2f}x vs "
                   f"{h.base}'s budget (1 seed)")
    else:
        summary = (f"{h.treat} did not reach {h.base}'s final NLL in {len(h.pairs) - len(r)} of "
                   f"{len(h.pairs)} seeds (the ratio is then an upper bound)"
                   + (f"; where it did: {', '.join(f'{x:.2f}x' for x in r)} vs first reached" if len(r) else ""))
    # the same question without thresholds: is TREAT's final NLL lower, beyond the seeds' spread?
    diff = np.array([p["treat_final_nll"] - p["base_final_nll"] for p in h.pairs])
    summary += (f"\nfinal NLL, {h.treat} - {h.base}: mean {diff.mean():+.4f} nats"
                + (f", std {diff.std(ddof=1):.4f}, range {diff.min():+.4f} to {diff.max():+.4f} over {len(diff)} seeds"
                   if len(diff) > 1 else " (1 seed)"))
    return "\n".join(lines + ["", summary])


# --------------------------------------------------------------------------------------------
# `--headline` without a value: every arm of a sweep (bench/seed001_sweep.py) against the baseline
# arm, over seeds, with confidence intervals. An arm is the `name` a run was launched with
# (`--set name=bell`) at one learning rate (train.lr); runs pair with the baseline arm's run of the
# same seed and learning rate.
# --------------------------------------------------------------------------------------------


def t_interval(x: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t confidence interval of the mean of `x` (NaN bounds for one value)."""
    from scipy import stats

    x = np.asarray(x, dtype=float)
    mean = float(x.mean()) if len(x) else math.nan
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def is_final(r: RunRecord) -> bool:
    """Whether a run counts in the headlines: FINISHED. A run still training (RUNNING), stopped mid-way
    (KILLED) or FAILED has no final evaluation: as a target its last NLL would be any value on the way
    down (the initial one, for a run just started), and its short curve would cut its arm's mean short."""
    return r.status == "FINISHED"


def unfinished(records: list[RunRecord]) -> list[RunRecord]:
    """The runs the headlines leave out (see `is_final`)."""
    return [r for r in records if not is_final(r)]


def arm_of(r: RunRecord) -> tuple[str, str]:
    """(arm, learning rate) of a run: the name it was launched with and its train.lr."""
    return r.params.get("name", r.name), r.params.get("train.lr", "?")


def arm_headline(records: list[RunRecord], baseline: str = "uniform", confidence: float = 0.95) -> list[dict]:
    """One row per (arm, lr) of the masked-diffusion runs, the baseline arm's included.

    Per seed: target = the baseline run's final validation NLL (same seed and lr); tokens = where
    the arm's validation curve first reaches it (linear interpolation between evaluations; the
    baseline's own row gives where the baseline first got there); ratio = the baseline's tokens /
    the arm's (> 1: the arm is faster). Across seeds: the ratio's geometric mean with a t-interval
    on log(ratio) (seeds whose arm never reached the target are counted, and left out of the
    interval: their ratio is only an upper bound), and the final-NLL difference (arm - baseline)
    with its t-interval."""
    groups: dict[tuple[str, str], dict[str, RunRecord]] = {}
    for r in records:
        if r.params.get("model.variant") == "ar" or not len(r.val_nll) or not is_final(r):
            continue
        groups.setdefault(arm_of(r), {}).setdefault(r.params.get("seed", "?"), r)
    rows = []
    for (arm, lr), runs in sorted(groups.items(), key=lambda kv: (kv[0][0] != baseline, kv[0][0], kv[0][1])):
        base = groups.get((baseline, lr))
        if base is None:
            continue
        seeds = sorted(set(runs) & set(base), key=lambda s: (len(s), s))
        if not seeds:
            continue
        ratios, diffs, tokens, never = [], [], [], 0
        for seed in seeds:
            b, a = base[seed], runs[seed]
            target = b.final_nll
            b_tokens = tokens_to_reach(b.val_tokens, b.val_nll, target)
            a_tokens = tokens_to_reach(a.val_tokens, a.val_nll, target)
            diffs.append(a.final_nll - b.final_nll)
            if math.isnan(a_tokens):
                never += 1
                continue
            tokens.append(a_tokens)
            ratios.append(b_tokens / a_tokens)
        log_mean, log_lo, log_hi = t_interval(np.log(ratios), confidence) if ratios else (math.nan,) * 3
        d_mean, d_lo, d_hi = t_interval(np.array(diffs), confidence)
        rows.append({
            "arm": arm, "lr": lr, "seeds": len(seeds), "never_reached": never,
            "tokens_to_target": float(np.mean(tokens)) if tokens else math.nan,
            "ratio": math.exp(log_mean), "ratio_lo": math.exp(log_lo), "ratio_hi": math.exp(log_hi),
            "ratios": ratios, "final_nll": float(np.mean([runs[s].final_nll for s in seeds])),
            "diff": d_mean, "diff_lo": d_lo, "diff_hi": d_hi, "baseline": arm == baseline,
        })
    if not rows:
        raise ValueError(f"--headline: no masked-diffusion run shares a seed and train.lr with a run named {baseline!r} "
                         f"(runs are grouped by their config `name`, e.g. --set name={baseline})")
    return rows


def format_arm_headline(rows: list[dict], baseline: str = "uniform", confidence: float = 0.95,
                        references: dict[str, float] | None = None) -> str:
    """Markdown: the arms table, then the learning-rate sensitivity of the arms run at several lrs."""
    pct = f"{confidence:.0%}"

    def f(x: float, spec: str) -> str:
        return "-" if x is None or math.isnan(x) else format(x, spec)

    def line(r: dict) -> str:
        never = f" ({r['never_reached']} never reached)" if r["never_reached"] else ""
        return (f"| {r['arm']} | {r['lr']} | {r['seeds']}{never} | {f(r['final_nll'], '.4f')} | "
                f"{f(r['tokens_to_target'], ',.0f')} | {f(r['ratio'], '.2f')}x | "
                f"[{f(r['ratio_lo'], '.2f')}, {f(r['ratio_hi'], '.2f')}] | {f(r['diff'], '+.4f')} | "
                f"[{f(r['diff_lo'], '+.4f')}, {f(r['diff_hi'], '+.4f')}] |")

    head = (f"| arm | lr | seeds | final NLL (mean) | tokens to {baseline}'s final NLL | speedup vs {baseline} "
            f"(geo. mean) | {pct} CI | final NLL - {baseline} | {pct} CI |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [line(r) for r in rows]
    by_arm: dict[str, list[dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    multi = [r for arm_rows in by_arm.values() if len(arm_rows) > 1 for r in arm_rows]
    if multi:
        lines += ["", f"Learning-rate sensitivity (each lr against {baseline} at the same lr):", "", head]
        lines += [line(r) for r in sorted(multi, key=lambda r: (r["arm"], float(r["lr"]) if r["lr"] != "?" else 0))]
    if references:
        lines += ["", "References: " + ", ".join(f"{k} {v:.4f}" for k, v in references.items())]
    return "\n".join(lines)


def unigram_nll(config: str | Path) -> float:
    """Cross-entropy (nats/token) of the held-out split under the training split's token frequencies
    (add-one smoothed): what a model that ignores context can reach. Counts every token of the
    shards' documents (the separators the packed rows add are not counted: an approximation)."""
    info = ensure_shards(load_config(config).data, progress=False)
    counts = np.ones(info.vocab_size)
    for doc in open_split(info.shard_dir / "train").iter_documents():
        counts += np.bincount(doc, minlength=info.vocab_size)
    logp = np.log(counts / counts.sum())
    val = np.zeros(info.vocab_size)
    for doc in open_split(info.shard_dir / "val").iter_documents():
        val += np.bincount(doc, minlength=info.vocab_size)
    return float(-(val * logp).sum() / val.sum())


def plot_arms(records: list[RunRecord], rows: list[dict], out_dir: Path,
              references: dict[str, float] | None = None) -> Path:
    """Validation NLL vs tokens: each arm's mean over seeds (band: min-max), AR runs dashed, and the
    references (unigram, AR final) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    palette = plt.get_cmap("tab10").colors
    wanted = {(r["arm"], r["lr"]) for r in rows}
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        key = arm_of(r)
        if key in wanted or r.params.get("model.variant") == "ar":
            groups.setdefault(key, []).append(r)
    for i, ((arm, lr), runs) in enumerate(sorted(groups.items())):
        n = min(len(r.val_nll) for r in runs)
        if n == 0:
            continue
        x = runs[0].val_tokens[:n]
        y = np.stack([r.val_nll[:n] for r in runs])
        ar = runs[0].params.get("model.variant") == "ar"
        colour = "black" if ar else palette[i % len(palette)]
        ax.plot(x, y.mean(0), color=colour, linestyle="--" if ar else "-", linewidth=1.6,
                label=f"{arm} lr {lr} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(x, y.min(0), y.max(0), color=colour, alpha=0.15)
    for j, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, color="grey", linestyle=":" if j else "-.", linewidth=1, label=f"{name} {value:.3f}")
    lows = [float(np.nanmin(r.val_nll)) for rs in groups.values() for r in rs if len(r.val_nll)]
    highs = [float(r.val_nll[1]) for rs in groups.values() for r in rs if len(r.val_nll) > 1]
    if lows and highs:
        lo, hi = min(lows + list((references or {}).values())), max(highs + list((references or {}).values()))
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation NLL (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("validation NLL vs tokens: mean over seeds (band: min-max)")
    fig.tight_layout()
    path = out_dir / "headline_arms.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(c: Comparison, markdown: bool = False) -> str:
    head = ["run", "label", "final NLL", "best NLL", "tokens", f"tokens to NLL {c.target_nll:.4f}",
            "speedup", "tokens/s", "wall s"]

    def fmt(x: float, spec: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    body = [[
        row["run"] + (" (baseline)" if row["baseline"] else ""), row["label"],
        fmt(row["final_val_nll"], ".4f"), fmt(row["best_val_nll"], ".4f"), fmt(row["tokens"], ",.0f"),
        fmt(row["tokens_to_target"], ",.0f"), fmt(row["speedup_vs_baseline"], ".2f") + "x",
        fmt(row["tokens_per_s"], ",.0f"), fmt(row["wall_s"], ".1f"),
    ] for row in c.rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def _group(label: str) -> str:
    """A run's label without its seed: the configuration it belongs to."""
    return re.sub(r"(, )?seed=\d+", "", label).strip(", ") or label


def plot(c: Comparison, out_dir: Path) -> list[Path]:
    """PNG plots: validation NLL vs tokens and vs wall-clock, training loss vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    # one colour per configuration, so several seeds of it read as one family of curves
    palette = plt.get_cmap("tab10").colors
    groups = list(dict.fromkeys(_group(r.label) for r in c.runs))
    colours = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    specs = [
        ("val_nll_vs_tokens.png", "tokens seen", "validation NLL (nats/token)", lambda r: (r.val_tokens, r.val_nll)),
        ("val_nll_vs_wall.png", "wall-clock (s)", "validation NLL (nats/token)", lambda r: (r.val_elapsed, r.val_nll)),
        ("train_loss.png", "step", "training loss", lambda r: (r.train_steps, r.train_loss)),
    ]
    paths = []
    for filename, xlabel, ylabel, series in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for r in c.runs:
            x, y = series(r)
            if len(x):
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=r.label,
                        linewidth=2.2 if r is c.baseline else 1.6, color=colours[_group(r.label)])
        if filename.startswith("val_nll") and not math.isnan(c.target_nll):
            ax.axhline(c.target_nll, color="grey", linestyle="--", linewidth=1, label="baseline's final NLL")
        if filename.startswith("val_nll"):
            # the step-0 evaluation (~log V) and transient spikes would squash the range where the runs
            # differ: the axes span the lowest value up to the highest first evaluation after step 0
            firsts = [float(r.val_nll[1]) for r in c.runs if len(r.val_nll) > 1 and np.isfinite(r.val_nll[1])]
            lows = [float(np.nanmin(r.val_nll)) for r in c.runs if len(r.val_nll)]
            if firsts and lows:
                lo, hi = min(lows), max(firsts)
                pad = 0.05 * (hi - lo) or 0.1
                ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(ylabel + " vs " + xlabel)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(c: Comparison, plots: list[Path], out_dir: Path, head: Headline | None = None) -> Path:
    lines = [
        "# Run comparison", "",
        f"Baseline: `{c.baseline.name}` ({c.baseline.label}); target NLL = the baseline's final validation NLL "
        f"{c.target_nll:.4f}. Speedup = the baseline's tokens to reach the target / the run's.", "",
        format_table(c, markdown=True), "",
    ]
    if head is not None:
        lines += [f"## Headline: {head.treat} vs {head.base} ({head.key}), paired by seed", "",
                  format_headline(head), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.compare",
                                description="Compare training runs logged to MLflow: table, plots, markdown report.")
    p.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: the local store)")
    p.add_argument("--experiment", help="experiment name to select runs from")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs with this tag (e.g. time_sampler=bell); the same key twice means either value")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN_ID", help="explicit run ids instead of a search")
    p.add_argument("--baseline", help="run name or id the others are compared to, or KEY=VALUE: the first run with "
                                      "that tag or config value, e.g. time_sampler=uniform (default: the first run)")
    p.add_argument("--target-nll", type=float, help="NLL target (default: the baseline's final validation NLL)")
    p.add_argument("--headline", metavar="KEY=BASE:TREAT", nargs="?", const=ARMS,
                   help="per seed, the tokens TREAT needs to reach BASE's final NLL and the speedup, with its "
                        "mean and spread over seeds, e.g. time_sampler=uniform:bell (KEY: a tag or config key). "
                        "Without a value: every arm (config `name` x train.lr) against --baseline-arm, with "
                        "confidence intervals over seeds and the learning-rate sensitivity (bench/seed001_sweep.py)")
    p.add_argument("--baseline-arm", default="uniform", help="the arm --headline compares to (default uniform)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the --headline intervals (default 0.95)")
    p.add_argument("--unigram-config", metavar="RECIPE",
                   help="add the unigram reference NLL of this recipe's shards to the --headline table and plot")
    p.add_argument("--out", default="reports/compare", help="folder for the PNG plots and report.md")
    p.add_argument("--attach", action="store_true",
                   help="also attach the plots and report to every compared run in MLflow (artifact folder compare/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        records = load_runs(args.uri, args.experiment, args.runs, args.tag)
        c = compare(records, args.baseline, args.target_nll)
        head = None
        arm_rows: list[dict] | None = None
        references: dict[str, float] = {}
        pending = unfinished(records) if args.headline else []
        finished = [r for r in records if is_final(r)]
        if args.headline == ARMS:
            arm_rows = arm_headline(finished, args.baseline_arm, args.confidence)
            if args.unigram_config:
                references["unigram"] = unigram_nll(args.unigram_config)
            ar = [r.final_nll for r in finished if r.params.get("model.variant") == "ar" and len(r.val_nll)]
            if ar:
                references["AR (mean final)"] = float(np.mean(ar))
        elif args.headline:
            key, _, pair = args.headline.partition("=")
            base, _, treat = pair.partition(":")
            if not (key and base and treat):
                raise ValueError(f"--headline {args.headline!r}: expected KEY=BASE:TREAT, e.g. time_sampler=uniform:bell")
            head = headline(records, key, base, treat)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    plots = plot(c, out)
    if arm_rows is not None:
        plots.insert(0, plot_arms(finished, arm_rows, out, references))
    report = write_report(c, plots, out, head)
    left_out = ("not finished, left out of the headline: " + ", ".join(f"{r.name} ({r.status})" for r in pending)
                if pending else "")
    if arm_rows is not None:
        arms_text = format_arm_headline(arm_rows, args.baseline_arm, args.confidence, references)
        arms_text += f"\n\n{left_out}" if left_out else ""
        report.write_text(report.read_text().replace(
            "# Run comparison\n", f"# Run comparison\n\n## Headline: every arm vs {args.baseline_arm}\n\n{arms_text}\n", 1))
    if args.attach:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=args.uri)
        for r in c.runs:
            for path in (*plots, report):
                client.log_artifact(r.run_id, str(path), artifact_path="compare")
    print(format_table(c))
    if head is not None:
        print("\n" + format_headline(head))
    if arm_rows is not None:
        print("\n" + format_arm_headline(arm_rows, args.baseline_arm, args.confidence, references))
    if left_out:
        print("\n" + left_out)
    print(f"\nplots: {', '.join(str(p) for p in plots)}\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
