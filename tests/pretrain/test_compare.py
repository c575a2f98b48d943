"""`python -m pretrain.compare` over two real runs logged to a real local MLflow store."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.compare import compare, label_runs, load_runs, main, tokens_to_reach

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TINY = ["data.task.num_train=256", "data.task.num_val=32", "train.batch_size=16", "train.eval_batches=2",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "train.steps=30", "train.eval_every=10",
        "train.log_every=5", "diffusion.weighting=reweighted"]


def test_tokens_to_reach_interpolates_between_evaluations():
    tokens = np.array([0.0, 100.0, 200.0])
    nll = np.array([3.0, 2.0, 1.0])
    assert tokens_to_reach(tokens, nll, 2.0) == 100.0
    assert tokens_to_reach(tokens, nll, 1.5) == pytest.approx(150.0)
    assert tokens_to_reach(tokens, nll, 3.5) == 0.0
    assert math.isnan(tokens_to_reach(tokens, nll, 0.5))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("compare")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for sampler in ("uniform", "bell"):
        proc = subprocess.run(
            [sys.executable, "-m", "pretrain.launch", "--config", str(QUICKSTART), "--set", *TINY,
             f"diffusion.time_sampler={sampler}", "diffusion.weighting=reweighted"],  # elbo + bell is refused
            cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {}
    for d in (cwd / "runs" / "quickstart").iterdir():
        sampler = "bell" if "time_sampler: bell" in (d / "config.yaml").read_text() else "uniform"
        summaries[sampler] = json.loads((d / "summary.json").read_text())
    return cwd, summaries


def test_compare_table_matches_what_the_runs_logged(two_runs):
    cwd, summaries = two_runs
    records = load_runs(f"sqlite:///{cwd / 'mlruns.db'}", "quickstart", [], [])
    assert sorted(r.label for r in records) == ["time_sampler=bell", "time_sampler=uniform"]
    c = compare(records, baseline=next(r.name for r in records if r.label == "time_sampler=uniform"))
    rows = {row["label"].split("=")[1]: row for row in c.rows}
    for sampler, summary in summaries.items():
        assert rows[sampler]["final_val_nll"] == pytest.approx(summary["final_val_nll"])
        assert rows[sampler]["best_val_nll"] == pytest.approx(summary["best_val_nll"])
        assert rows[sampler]["tokens"] == summary["tokens"]
    assert c.target_nll == pytest.approx(summaries["uniform"]["final_val_nll"])
    assert rows["uniform"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert rows["uniform"]["tokens_to_target"] <= summaries["uniform"]["tokens"]


def test_compare_cli_writes_valid_pngs_and_report(two_runs, capsys):
    import matplotlib.image

    cwd, summaries = two_runs
    out = cwd / "report"
    uri = f"sqlite:///{cwd / 'mlruns.db'}"
    assert main(["--uri", uri, "--experiment", "quickstart", "--tag", "time_sampler=uniform",
                 "--tag", "time_sampler=bell", "--out", str(out), "--attach"]) == 0
    printed = capsys.readouterr().out
    assert f"{summaries['uniform']['final_val_nll']:.4f}" in printed
    for name in ("val_nll_vs_tokens.png", "val_nll_vs_wall.png", "train_loss.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a real picture, not blank
    report = (out / "report.md").read_text()
    assert "| run |" in report and "val_nll_vs_tokens.png" in report
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for run in client.search_runs([client.get_experiment_by_name("quickstart").experiment_id]):
        attached = {a.path for a in client.list_artifacts(run.info.run_id, "compare")}
        assert {"compare/val_nll_vs_tokens.png", "compare/report.md"} <= attached


def test_tag_filter_and_unknown_experiment(two_runs, capsys):
    cwd, _ = two_runs
    uri = f"sqlite:///{cwd / 'mlruns.db'}"
    assert [r.tags["time_sampler"] for r in load_runs(uri, "quickstart", [], ["time_sampler=bell"])] == ["bell"]
    assert main(["--uri", uri, "--experiment", "nope", "--out", str(cwd / "x")]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_labels_fall_back_to_names_when_nothing_differs():
    from pretrain.compare import RunRecord

    runs = [RunRecord("a1", "run-a", {"x": "1"}, {}, "FINISHED"), RunRecord("b2", "run-b", {"x": "1"}, {}, "FINISHED")]
    label_runs(runs)
    assert [r.label for r in runs] == ["run-a", "run-b"]


def _record(run_id, sampler, seed, tokens, nll, variant="mdm"):
    from pretrain.compare import RunRecord

    r = RunRecord(run_id, run_id, {"seed": str(seed), "model.variant": variant,
                                   "diffusion.time_sampler": sampler}, {"time_sampler": sampler}, "FINISHED")
    r.val_tokens, r.val_nll = np.array(tokens, dtype=float), np.array(nll, dtype=float)
    return r


def test_headline_pairs_by_seed_and_interpolates():
    from pretrain.compare import format_headline, headline

    steps = [0, 100, 200, 300, 400]
    runs = [
        _record("u0", "uniform", 0, steps, [5.0, 4.0, 3.5, 3.2, 3.0]),
        # reaches 3.0 halfway between 200 (3.2) and 300 (2.8): 250 tokens -> 400 / 250 = 1.6x
        _record("b0", "bell", 0, steps, [5.0, 3.8, 3.2, 2.8, 2.6]),
        _record("u1", "uniform", 1, steps, [5.0, 4.0, 3.5, 3.0, 3.1]),  # final 3.1, first reached at 280
        _record("b1", "bell", 1, steps, [5.0, 3.5, 3.1, 3.0, 2.9]),     # reaches 3.1 at 200
        _record("b2", "bell", 2, steps, [5.0, 3.5, 3.1, 3.0, 2.9]),     # no uniform partner: left out
        _record("ar0", "bell", 0, steps, [4.0, 3.0, 2.5, 2.2, 2.0], variant="ar"),  # AR reference: left out
    ]
    h = headline(runs, "time_sampler", "uniform", "bell")
    assert [(p["seed"], p["base_run"], p["treat_run"]) for p in h.pairs] == [("0", "u0", "b0"), ("1", "u1", "b1")]
    p0, p1 = h.pairs
    assert p0["target_nll"] == 3.0 and p0["treat_tokens"] == pytest.approx(250.0) and p0["ratio"] == pytest.approx(1.6)
    # the baseline's own tokens are where it first reached its final NLL (interpolated: 3.5 -> 3.0 at 200 -> 300)
    assert p1["base_tokens"] == pytest.approx(280.0) and p1["treat_tokens"] == pytest.approx(200.0)
    assert h.ratios() == pytest.approx([1.6, 1.4])
    assert [p["budget_ratio"] for p in h.pairs] == pytest.approx([1.6, 2.0])  # 400 / 250, 400 / 200
    text = format_headline(h)
    assert "mean 1.50x" in text and "over 2 seeds" in text and "mean 1.80x" in text
    assert "final NLL, bell - uniform: mean -0.3000 nats" in text  # (2.6 - 3.0 + 2.9 - 3.1) / 2
    # the config key works as well as the tag
    assert headline(runs, "diffusion.time_sampler", "uniform", "bell").ratios() == pytest.approx([1.6, 1.4])


def test_headline_when_treatment_never_reaches_the_target():
    from pretrain.compare import format_headline, headline

    runs = [_record("u0", "uniform", 0, [0, 100, 200], [5.0, 3.0, 2.0]),
            _record("b0", "bell", 0, [0, 100, 200], [5.0, 3.5, 2.5])]
    h = headline(runs, "time_sampler", "uniform", "bell")
    (p,) = h.pairs
    assert not p["reached"] and p["ratio"] == pytest.approx(1.0)  # an upper bound: 200 / all 200 of bell's
    assert len(h.ratios()) == 0
    assert "never reached" in format_headline(h) and "upper bound" in format_headline(h)
    with pytest.raises(ValueError, match="no seed has both"):
        headline(runs, "time_sampler", "uniform", "antithetic")


def test_ar_labels_leave_out_unused_diffusion_settings():
    from pretrain.compare import RunRecord

    runs = [RunRecord(n, n, {"model.variant": v, "diffusion.time_sampler": ts}, {}, "FINISHED")
            for n, v, ts in (("b", "mdm", "bell"), ("u", "mdm", "uniform"), ("a", "ar", "bell"))]
    label_runs(runs)
    assert [r.label for r in runs] == ["time_sampler=bell, variant=mdm", "time_sampler=uniform, variant=mdm", "variant=ar"]


def _arm(name, seed, lr, tokens, nll, variant="mdm"):
    from pretrain.compare import RunRecord

    r = RunRecord(f"{name}-{lr}-{seed}", f"{name}-{lr}-s{seed}",
                  {"name": name, "seed": str(seed), "train.lr": lr, "model.variant": variant}, {}, "FINISHED")
    r.val_tokens, r.val_nll = np.array(tokens, dtype=float), np.array(nll, dtype=float)
    return r


def _crossing(target, at, grid):
    """A falling linear curve on `grid` that passes `target` at tokens `at`, slope -1 per 100 tokens."""
    return [target + (at - x) / 100.0 for x in grid]


def test_arm_headline_interpolates_and_gives_t_intervals():
    from pretrain.compare import arm_headline, format_arm_headline

    grid = [0, 100, 200, 300, 400]
    runs = []
    # uniform's final NLL (the per-seed target) is 3.0, first reached at its last evaluation, 400
    # tokens; bell reaches it at 200, 400, 100 tokens: ratios 2, 1, 4 (log: log 2 x [1, 0, 2])
    for seed, at in enumerate((200.0, 400.0, 100.0)):
        runs.append(_arm("uniform", seed, "0.002", grid, _crossing(3.0, 400.0, grid)))
        runs.append(_arm("bell", seed, "0.002", grid, _crossing(3.0, at, grid)))
    runs.append(_arm("uniform", 0, "0.001", grid, _crossing(3.5, 400.0, grid)))  # the second lr: one seed
    runs.append(_arm("bell", 0, "0.001", grid, [5.0, 4.5, 4.0, 3.9, 3.8]))       # never reaches 3.5
    runs.append(_arm("ar", 0, "0.002", grid, [4.0, 3.0, 2.5, 2.2, 2.0], variant="ar"))  # a reference, not an arm
    rows = {(r["arm"], r["lr"]): r for r in arm_headline(runs)}
    assert set(rows) == {("uniform", "0.002"), ("bell", "0.002"), ("uniform", "0.001"), ("bell", "0.001")}
    bell = rows["bell", "0.002"]
    assert bell["ratios"] == pytest.approx([2.0, 1.0, 4.0])
    assert bell["tokens_to_target"] == pytest.approx((200 + 400 + 100) / 3)
    # geometric mean 2; t-interval on log(ratio): s = log 2, t(0.975, df 2) = 4.302652729911275
    half = 4.302652729911275 * math.log(2.0) / math.sqrt(3)
    assert bell["ratio"] == pytest.approx(2.0)
    assert bell["ratio_lo"] == pytest.approx(2.0 * math.exp(-half)) and bell["ratio_hi"] == pytest.approx(2.0 * math.exp(half))
    # final NLL differences, bell - uniform: bell ends at 3 + (at - 400) / 100 -> -2, 0, -3
    diffs = np.array([-2.0, 0.0, -3.0])
    d_half = 4.302652729911275 * diffs.std(ddof=1) / math.sqrt(3)
    assert bell["diff"] == pytest.approx(diffs.mean())
    assert (bell["diff_lo"], bell["diff_hi"]) == pytest.approx((diffs.mean() - d_half, diffs.mean() + d_half))
    assert rows["uniform", "0.002"]["ratio"] == pytest.approx(1.0) and rows["uniform", "0.002"]["baseline"]
    slow = rows["bell", "0.001"]
    assert slow["never_reached"] == 1 and math.isnan(slow["ratio"]) and slow["diff"] == pytest.approx(0.3)
    text = format_arm_headline(list(rows.values()), references={"unigram": 3.3})
    assert "Learning-rate sensitivity" in text and "1 never reached" in text and "unigram 3.3000" in text
    with pytest.raises(ValueError, match="name=uniform"):
        arm_headline([r for r in runs if r.params["name"] != "uniform"])


def test_unigram_nll_is_the_cross_entropy_of_val_under_train_frequencies(tmp_path):
    from data_pipeline.build import ensure_shards
    from data_pipeline.shards import open_split
    from pretrain.compare import unigram_nll
    from pretrain.config import load_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join("abab aab" if i % 3 else "ccd ab" for i in range(300)) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  source: {corpus}\n  tokenizer: char\n  txt_documents: line\n  val_fraction: 0.2\n"
                      f"  seq_len: 16\n  packing: wrap\n  shard_dir: {tmp_path / 'shards'}\n")
    info = ensure_shards(load_config(recipe).data, progress=False)
    counts = {s: np.zeros(info.vocab_size) for s in ("train", "val")}
    for split, c in counts.items():
        for doc in open_split(info.shard_dir / split).iter_documents():
            for tok in doc:
                c[int(tok)] += 1
    p = (counts["train"] + 1) / (counts["train"] + 1).sum()
    expected = -(counts["val"] * np.log(p)).sum() / counts["val"].sum()
    assert unigram_nll(recipe) == pytest.approx(expected)
    assert 0.5 < expected < math.log(info.vocab_size)  # below the uniform distribution's log V


def test_headline_cli_over_a_sweep_in_mlflow(tmp_path, capsys):
    """`--headline` without a value over runs logged as the sweep logs them (name, seed, train.lr)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweep", artifact_location=str(tmp_path / "art"))
    grid = [0, 100, 200, 300, 400]
    curves = {("uniform", 0): _crossing(3.0, 400.0, grid), ("uniform", 1): _crossing(3.2, 400.0, grid),
              ("bell", 0): _crossing(3.0, 200.0, grid), ("bell", 1): _crossing(3.2, 100.0, grid),
              ("ar", 0): [4.0, 2.6, 2.4, 2.3, 2.2]}
    for (arm, seed), nll in curves.items():
        run = client.create_run(exp, run_name=f"{arm}-s{seed}").info.run_id
        for k, v in {"name": arm, "seed": seed, "train.lr": 0.002, "model.variant": "ar" if arm == "ar" else "mdm"}.items():
            client.log_param(run, k, v)
        for step, (tok, y) in enumerate(zip(grid, nll, strict=True)):
            client.log_metric(run, "val/nll", y, step=step)
            client.log_metric(run, "val/tokens_seen", tok, step=step)
        client.set_terminated(run)
    # a seed still training: its first evaluation alone, status RUNNING (left out, and named)
    for arm in ("uniform", "bell"):
        run = client.create_run(exp, run_name=f"{arm}-s2").info.run_id
        for k, v in {"name": arm, "seed": 2, "train.lr": 0.002, "model.variant": "mdm"}.items():
            client.log_param(run, k, v)
        client.log_metric(run, "val/nll", 5.0, step=0)
        client.log_metric(run, "val/tokens_seen", 0, step=0)
    out = tmp_path / "cmp"
    assert main(["--uri", uri, "--experiment", "sweep", "--headline", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not finished, left out of the headline: uniform-s2 (RUNNING), bell-s2 (RUNNING)" in printed
    assert "| bell | 0.002 | 2 |" in printed  # ratios 2 and 4: geometric mean 2.83
    assert "2.83x" in printed and "AR (mean final) 2.2000" in printed
    assert (out / "headline_arms.png").stat().st_size > 1000
    assert "## Headline: every arm vs uniform" in (out / "report.md").read_text()


def test_arm_headline_leaves_out_runs_that_have_not_finished():
    """Mid-sweep, a seed's runs have only their first evaluations: their 'final' NLL is no target (it
    was the initial one: a division by zero on the real sweep) and their curves must not cut the arm's
    plot short. Only FINISHED runs count; the others are named."""
    from pretrain.compare import arm_headline, unfinished

    grid = [0, 100, 200, 300, 400]
    done = [_arm("uniform", 0, "0.002", grid, _crossing(3.0, 400.0, grid)),
            _arm("bell", 0, "0.002", grid, _crossing(3.0, 200.0, grid))]
    running = [_arm("uniform", 1, "0.002", [0], [5.0]), _arm("bell", 1, "0.002", [0, 100], [5.0, 4.0])]
    for r in running:
        r.status = "RUNNING"
    rows = {(r["arm"], r["lr"]): r for r in arm_headline(done + running)}
    assert rows["bell", "0.002"]["seeds"] == 1 and rows["bell", "0.002"]["ratios"] == pytest.approx([2.0])
    assert [r.name for r in unfinished(done + running)] == ["uniform-0.002-s1", "bell-0.002-s1"]
