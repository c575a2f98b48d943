"""`python -m pretrain.evaluate` end to end on tiny language runs trained by this framework: metrics
printed as a table, logged into the run's own MLflow record (read back through the MLflow client from
a real local sqlite store), generative perplexity under a reference AR run, and clear refusals of a
reference that is not an AR model or speaks another vocabulary."""

import json
import math
import random

import pytest

from pretrain.evaluate import main as evaluate

NOUNS = "cat dog bird fish horse cow sheep goat mouse fox wolf bear lion tiger deer frog duck owl bee ant".split()
VERBS = "sees likes chases finds eats watches follows hears meets helps".split()
ADJS = "small big red old young quick lazy happy sad tall".split()


def tiny_recipe(root) -> str:
    r = random.Random(0)
    lines = [f"the {r.choice(ADJS)} {r.choice(NOUNS)} {r.choice(VERBS)} a {r.choice(ADJS)} {r.choice(NOUNS)} ."
             for _ in range(600)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    (root / "tiny.yaml").write_text(f"""
data: {{source: corpus.txt, tokenizer: sentencepiece, vocab_size: 64, seq_len: 32, packing: wrap, val_fraction: 0.05}}
model: {{n_layers: 1, d_model: 32, n_heads: 2, block_size: 8}}
train: {{steps: 4, batch_size: 8, lr: 3.0e-3, warmup_steps: 1, eval_every: 4, eval_batches: 1, log_every: 2,
         device: cpu}}
tracking: {{experiment: evaltest, uri: "sqlite:///{root / 'mlruns.db'}", artifact_location: "{root / 'mlruns'}",
            log_samples: 0}}
""")
    return str(root / "tiny.yaml")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tracked 4-step runs in one store: `block` (evaluated), `ar` (the reference) and `ar48`
    (an AR run on another sentencepiece vocabulary). Trained in-process through the launcher."""
    from pretrain.launch import main as launch

    root = tmp_path_factory.mktemp("evaluate")
    recipe = tiny_recipe(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # data and run paths of a recipe are relative to where it is launched
        for name, overrides in (("block", ["model.variant=block"]), ("ar", ["model.variant=ar"]),
                                ("ar48", ["model.variant=ar", "data.vocab_size=48"])):
            assert launch(["--config", recipe, "--log-level", "WARNING", "--set", f"launch.run_name={name}",
                           *overrides]) == 0
        yield root, {name: root / "runs" / "evaltest" / name for name in ("block", "ar", "ar48")}


def test_evaluate_logs_into_the_runs_mlflow_record(runs, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, run = runs
    monkeypatch.chdir(root)
    rc = evaluate(["--run", str(run["block"]), "--reference-ar", str(run["ar"]), "--num-samples", "4",
                   "--batch-size", "4", "--eval-batches", "1", "--json", str(root / "eval.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    record = json.loads((root / "eval.json").read_text())
    metrics = record["metrics"]
    # the printed table holds every metric
    assert out.splitlines()[1].split() == ["metric", "value"]
    for key in ("val/nll", "gen/ppl", "gen/nll", "gen/unigram_entropy"):
        assert any(line.split()[:1] == [key] for line in out.splitlines()), key
    # generative perplexity of the block model's samples under the AR reference
    assert math.isfinite(metrics["gen/ppl"]) and metrics["gen/ppl"] > 1.0
    assert metrics["gen/nll"] == pytest.approx(math.log(metrics["gen/ppl"]))

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    run_id = (run["block"] / "mlflow_run_id").read_text().strip()
    logged = client.get_run(run_id)
    for key in ("val/nll", "val/ppl", "gen/ppl", "gen/unigram_entropy"):
        assert logged.data.metrics[key] == pytest.approx(metrics[key])  # the latest value: this evaluation's
    history = client.get_metric_history(run_id, "gen/ppl")
    assert [m.step for m in history] == [4]  # at the evaluated checkpoint's step
    assert logged.data.tags["eval.sampler"] == "block" and logged.data.tags["eval.device"] == "cpu"
    assert "train/loss" in logged.data.metrics  # the same record the trainer wrote
    assert not any(k.startswith("eval/") for k in logged.data.metrics)  # one name per quantity
    # only the evaluated run got the evaluation's metrics
    ref_id = (run["ar"] / "mlflow_run_id").read_text().strip()
    assert "gen/ppl" not in client.get_run(ref_id).data.metrics


def test_reference_must_be_an_ar_model_on_the_same_vocabulary(runs, capsys, monkeypatch):
    root, run = runs
    monkeypatch.chdir(root)
    common = ["--num-samples", "2", "--batch-size", "2", "--eval-batches", "-1", "--no-mlflow"]
    assert evaluate(["--run", str(run["ar"]), "--reference-ar", str(run["block"]), *common]) == 2
    err = capsys.readouterr().err
    assert "is a 'block' model" in err and "model.variant=ar" in err
    assert evaluate(["--run", str(run["block"]), "--reference-ar", str(run["ar48"]), *common]) == 2
    err = capsys.readouterr().err
    assert "another vocabulary" in err
    assert evaluate(["--run", str(run["block"]), "--reference-ar", str(root / "no-such-run"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
