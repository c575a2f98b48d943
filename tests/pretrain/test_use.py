"""Using a trained model the way the ecosystem does (issue 20): generate from a prompt, export to
Hugging Face, zero-shot NLL on another corpus, lm-eval, extending a finished run; the README's user
journey on the quickstart's model. Tiny runs are trained once per module through the launcher."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79="
QUICK = ["train.steps=3", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.batch_size=8",
         "train.eval_every=3", "train.eval_batches=1", "data.task.num_train=64", "data.task.num_val=8",
         "train.ema=0.9", "tracking.log_samples=0"]
WORDS = "the a cat dog bird fish sees likes chases finds small big red old quick lazy .".split()


def _launch(args):
    from pretrain.launch import main as launch

    assert launch(["--log-level", "WARNING", *args]) == 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quickstart recipe shrunk to seconds (with a weight average), tracked in a local MLflow store
    in its own directory: its run directory."""
    root = tmp_path_factory.mktemp("quick")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _launch(["--config", str(REPO / "configs/quickstart.yaml"), "--set", "launch.run_name=q", *QUICK,
                 f"tracking.uri=sqlite:///{root / 'mlruns.db'}", f"tracking.artifact_location={root / 'mlruns'}"])
    return root / "runs" / "quickstart" / "q"


def text_recipe(root: Path) -> str:
    r = random.Random(0)
    lines = [" ".join(r.choice(WORDS) for _ in range(8)) for _ in range(400)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    (root / "text.yaml").write_text(f"""
data: {{source: {root / 'corpus.txt'}, tokenizer: sentencepiece, vocab_size: 48, seq_len: 32, packing: wrap,
        val_fraction: 0.05, shard_dir: {root / 'shards'}}}
model: {{n_layers: 1, d_model: 32, n_heads: 2}}
train: {{steps: 3, batch_size: 8, lr: 3.0e-3, warmup_steps: 1, eval_every: 3, eval_batches: 1, log_every: 1,
         device: cpu}}
launch: {{output_dir: {root / 'runs'}}}
tracking: {{enabled: false, experiment: text}}
""")
    return str(root / "text.yaml")


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """Tiny language runs on a word corpus (sentencepiece): {variant: run_dir} for mdm and ar."""
    root = tmp_path_factory.mktemp("text")
    recipe = text_recipe(root)
    runs = {}
    for variant in ("mdm", "ar"):
        _launch(["--config", recipe, "--set", f"launch.run_name={variant}", f"model.variant={variant}"])
        runs[variant] = root / "runs" / "text" / variant
    return root, runs


# ----------------------------------------------------------------------------------------------
# 1. generate
# ----------------------------------------------------------------------------------------------


def test_generate_fills_the_answer_after_the_prompt(quick, capsys):
    from pretrain.generate import main as generate

    args = ["--run", str(quick), "--prompt", PUZZLE, "--max-new-tokens", "81", "--num-samples", "2", "--seed", "3"]
    assert generate(args) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(PUZZLE)
        answer = line[len(PUZZLE):]
        assert 0 < len(answer) <= 81 and set(answer) <= set("0123456789.=")
    assert "EMA weights" in cap.err and "step 3" in cap.err and "sampler confidence" in cap.err
    assert generate(args) == 0
    assert capsys.readouterr().out.splitlines() == lines  # the same seed gives the same text
    assert generate([*args, "--no-ema"]) == 0
    assert "raw weights" in capsys.readouterr().err


def test_generate_refuses_what_does_not_fit_with_the_reason(quick, capsys):
    from pretrain.generate import main as generate

    assert generate(["--run", str(quick), "--prompt", PUZZLE, "--max-new-tokens", "100"]) == 2
    assert "data.seq_len = 168" in capsys.readouterr().err
    assert generate(["--run", str(quick), "--prompt", "hello"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
    assert generate(["--run", str(quick), "--sampler", "ar"]) == 2
    assert "sampler" in capsys.readouterr().err


def test_sample_module_has_a_command_line():
    out = subprocess.run([sys.executable, "-m", "pretrain.sample", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--prompt" in out.stdout and "--max-new-tokens" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pretrain.sample"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode != 0 and "--run" in out.stderr  # not silent: it says what is missing


# ----------------------------------------------------------------------------------------------
# 2. Hugging Face export
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["quick", "ar"])
def test_hf_export_loads_in_transformers_with_the_checkpoints_logits(which, quick, text_runs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")  # the `hf` extra (in `dev`, so CI runs this)
    import torch

    from pretrain.checkpoint import load_model_for_inference
    from pretrain.convert import main as convert

    run = quick if which == "quick" else text_runs[1]["ar"]
    out = tmp_path / "hf"
    assert convert([str(run), "--hf", str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "modeling_dlm.py", "dlm_transformer.py", "dlm_tokenizer"):
        assert (out / name).exists(), name
    auto = transformers.AutoModelForCausalLM if which == "ar" else transformers.AutoModelForMaskedLM
    hf = auto.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(hf).__name__ == ("DLMForCausalLM" if which == "ar" else "DLMForMaskedLM")
    ref, info = load_model_for_inference(run)  # EMA by default, as the export
    assert info["ema"] == (which == "quick")
    torch.manual_seed(0)
    V = info["vocab_size"]
    x = torch.randint(4, V, (2, 24))
    x[:, 5:9] = hf.config.mask_token_id
    with torch.no_grad():
        got, want = hf(x).logits, ref(x)
    assert got.shape == (2, 24, V)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the raw weights differ from their average: the export really carried the average
    if which == "quick":
        raw, _ = load_model_for_inference(run, ema=False)
        with torch.no_grad():
            assert (raw(x) - want).abs().max() > 1e-4
    # the saved tokenizer is the run's
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "dlm_tokenizer")
    assert tok.vocab_size == V and tok.mask_id == hf.config.mask_token_id


# ----------------------------------------------------------------------------------------------
# 8. --dry-run and recipe errors
# ----------------------------------------------------------------------------------------------


def test_dry_run_shows_size_flops_tokens_and_hub_need(capsys, monkeypatch, tmp_path):
    from pretrain.launch import main as launch

    monkeypatch.chdir(REPO)
    assert launch(["--config", "configs/quickstart.yaml", "--dry-run", "--set", f"data.shard_dir={tmp_path / 's'}"]) == 0
    out = capsys.readouterr().out
    size = next(line for line in out.splitlines() if line.startswith("size"))
    params = float(size.split()[1].removesuffix("M")) * 1e6
    from pretrain.config import load_config
    from pretrain.model import build_model

    real = build_model(load_config("configs/quickstart.yaml").model, 16, 168)
    assert params == pytest.approx(sum(p.numel() for p in real.parameters()), abs=600)  # printed to 3 decimals
    flops = float(size.split("parameters")[1].split(",")[1].split()[0]) * 1e6
    assert 6 * params < flops < 6 * params + 12 * 4 * 128 * 168 + 1e3  # 6N + attention
    assert "MFLOPs per training token" in size and "vocabulary 16" in size
    assert "250 steps x 32 sequences x 168 = 1.34M tokens" in out
    assert "data hub    no (task source)" in out
    assert launch(["--config", "configs/lm1b_bell.yaml", "--dry-run", "--set", f"data.shard_dir={tmp_path / 'h'}"]) == 0
    assert "data hub    yes, to build the shards" in capsys.readouterr().out


def test_dry_run_fails_on_a_missing_data_source(capsys, monkeypatch, tmp_path):
    from pretrain.launch import main as launch

    monkeypatch.chdir(REPO)
    missing = tmp_path / "nowhere.txt"
    assert launch(["--config", "configs/quickstart.yaml", "--dry-run", "--set", f"data.source={missing}",
                   "data.tokenizer=sentencepiece", f"data.shard_dir={tmp_path / 's'}"]) == 2
    err = capsys.readouterr().err
    assert "data.source" in err and str(missing) in err
    assert launch(["--config", "configs/quickstart.yaml", "--dry-run", "--set", "data.source=task:sudokuu",
                   f"data.shard_dir={tmp_path / 's'}"]) == 2
    assert "unknown task 'sudokuu'" in capsys.readouterr().err


def test_missing_recipe_lists_recipes_and_missing_inherit_names_its_file(capsys, monkeypatch, tmp_path):
    from pretrain.launch import main as launch

    monkeypatch.chdir(REPO)
    assert launch(["--config", "configs/quickstar.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "did you mean configs/quickstart.yaml" in err and "configs/tasks/sudoku_mdm.yaml" in err
    child = tmp_path / "child.yaml"
    child.write_text("inherit: base_gone.yaml\ntrain: {steps: 5}\n")
    assert launch(["--config", str(child), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "base_gone.yaml") in err and f"in {child}" in err


# ----------------------------------------------------------------------------------------------
# 4. lm-evaluation-harness
# ----------------------------------------------------------------------------------------------

TOY_TASK = """task: dlm_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def _toy_task(root: Path) -> Path:
    rows = [{"context": "the cat sees", "choices": ["a dog", "red red red"], "label": 0},
            {"context": "a small bird", "choices": ["likes the fish", ". . ."], "label": 0},
            {"context": "the lazy dog", "choices": ["chases a cat", "old old"], "label": 0}]
    task_dir = root / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "dlm_toy.yaml").write_text(TOY_TASK.format(data=task_dir / "toy.jsonl"))
    return task_dir


@pytest.mark.parametrize("variant", [pytest.param("ar", marks=pytest.mark.slow), "mdm"])  # ar: also the CLI
def test_lm_eval_scores_a_local_task_through_the_dlm_model(variant, text_runs, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra (in `dev`, so CI runs this)
    from lm_eval.tasks import TaskManager

    import pretrain.lm_eval_harness  # noqa: F401  (registers `dlm`)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task_dir = _toy_task(tmp_path)
    run = text_runs[1][variant]
    res = lm_eval.simple_evaluate(model="dlm", model_args=f"run={run},mc_samples=16", tasks=["dlm_toy"],
                                  task_manager=TaskManager(include_path=str(task_dir)), limit=3)
    acc = res["results"]["dlm_toy"]["acc,none"]
    # the harness's accuracy is the adapter's own choice, document by document (seeded bound: repeatable)
    from lm_eval.api.instance import Instance

    from pretrain.lm_eval_harness import DLMEvalHarness

    lm = DLMEvalHarness(run=str(run), mc_samples=16)
    rows = [json.loads(line) for line in (task_dir / "toy.jsonl").read_text().splitlines()]
    right = 0
    for r in rows:
        lls = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, (r["context"], " " + c), 0)
                                                 for c in r["choices"]])]  # lm-eval's target_delimiter
        right += int(max(range(len(lls)), key=lls.__getitem__) == r["label"])
    assert acc == pytest.approx(right / len(rows))
    if variant == "ar":  # the command line: lm-eval's own, with `dlm` registered
        from pretrain.lm_eval_harness import main

        monkeypatch.chdir(tmp_path)
        main(["--model", "dlm", "--model_args", f"run={run}", "--tasks", "dlm_toy", "--include_path",
              str(task_dir), "--limit", "3", "--output_path", str(tmp_path / "out")])
        written = list((tmp_path / "out").rglob("results*.json"))
        assert written and json.loads(written[0].read_text())["results"]["dlm_toy"]["acc,none"] == pytest.approx(acc)


def test_lm_eval_loglikelihood_is_exact_for_ar_and_the_elbo_for_diffusion(text_runs):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from pretrain.lm_eval_harness import DLMEvalHarness

    def req(ctx, cont):
        return Instance("loglikelihood", {}, (ctx, cont), 0)

    ar = DLMEvalHarness(run=str(text_runs[1]["ar"]))
    tok = ar.tok
    ctx, cont = ar._encode_pair("the cat sees", " a red dog")
    assert ctx + cont == tok.encode("the cat sees a red dog")
    (ll, _), = ar.loglikelihood([req("the cat sees", " a red dog")])
    x = torch.tensor([[tok.bos_id, *ctx, *cont]])
    with torch.no_grad():
        logp = torch.log_softmax(ar.model(x).double(), -1)[0]
    want = sum(float(logp[len(ctx) + i, c]) for i, c in enumerate(cont))
    assert ll == pytest.approx(want, abs=1e-6)
    # diffusion: for a one-token continuation the bound is that token's log-probability with it
    # masked (every draw that masks it sees the same input), up to the Monte Carlo error
    mdm = DLMEvalHarness(run=str(text_runs[1]["mdm"]), mc_samples=4096)
    ctx, one = mdm._encode_pair("the cat sees", " dog")
    if len(one) != 1:  # the tiny vocabulary may spell " dog" in several pieces: score the first alone
        one = one[:1]
    x = torch.tensor([[tok.bos_id, *ctx, tok.mask_id]])
    with torch.no_grad():
        logits = mdm.model(x)[0, -1].double()
    logits[tok.mask_id] = float("-inf")  # SUBS: [MASK] is never predicted
    want = float(torch.log_softmax(logits, -1)[one[0]])
    ll, _ = mdm._score([tok.bos_id, *ctx, *one], 1 + len(ctx))
    assert ll == pytest.approx(want, rel=0.15)
    assert mdm._score([tok.bos_id, *ctx, *one], 1 + len(ctx))[0] == ll  # seeded
    assert mdm.loglikelihood([req("the cat sees", " dog")])[0][0] < 0


# ----------------------------------------------------------------------------------------------
# 7. extending a finished run
# ----------------------------------------------------------------------------------------------


def test_more_steps_extend_the_same_run_and_another_model_is_refused(tmp_path, capsys):
    from pretrain.checkpoint import latest_checkpoint, load_trainer_state
    from pretrain.launch import main as launch

    recipe = text_recipe(tmp_path)
    assert launch(["--config", recipe, "--log-level", "WARNING"]) == 0
    runs = list((tmp_path / "runs" / "text").iterdir())
    assert len(runs) == 1
    capsys.readouterr()
    assert launch(["--config", recipe, "--log-level", "WARNING", "--set", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert list((tmp_path / "runs" / "text").iterdir()) == runs  # the same run, not a new one
    assert "this run extends step_0000003: train.steps 3 -> 5" in out
    assert load_trainer_state(latest_checkpoint(runs[0]))["train_state"]["step"] == 5
    # the same run directory with another model: refused up front, naming the keys
    rc = launch(["--config", recipe, "--log-level", "WARNING", "--set", f"launch.run_name={runs[0].name}",
                 "model.d_model=64", "model.n_layers=2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.d_model 32 -> 64" in err and "model.n_layers 1 -> 2" in err and "launch.resume=false" in err
    assert "Traceback" not in err and "size mismatch" not in err
    assert load_trainer_state(latest_checkpoint(runs[0]))["train_state"]["step"] == 5  # untouched


# ----------------------------------------------------------------------------------------------
# 3. zero-shot NLL on another corpus
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["ar", "mdm"])
def test_evaluate_data_scores_another_corpus_with_the_runs_tokenizer(variant, text_runs, tmp_path, monkeypatch, capsys):
    from pretrain.evaluate import main as evaluate

    root, runs = text_runs
    run = runs[variant]
    monkeypatch.chdir(tmp_path)  # the corpus's shards land under ./data/shards
    r = random.Random(1)
    other = tmp_path / "other_corpus.txt"  # new sentences of the same words: close to the run's own val/nll
    other.write_text("\n".join(" ".join(r.choice(WORDS) for _ in range(8)) for _ in range(200)) + "\n")
    args = ["--run", str(run), "--data", str(other), "--json", str(tmp_path / "z.json"), "--no-mlflow"]
    assert evaluate(args) == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "z.json").read_text())["metrics"]
    nll, ppl, tokens = m["zeroshot/other_corpus/nll"], m["zeroshot/other_corpus/ppl"], m["zeroshot/other_corpus/tokens"]
    assert ppl == pytest.approx(math.exp(nll)) and tokens > 200 * 8
    val = json.loads((run / "summary.json").read_text())["final_val_nll"]
    assert nll == pytest.approx(val, abs=0.25)  # the same bound, same tokenizer, same distribution
    built = sorted(p.stat().st_mtime_ns for p in (tmp_path / "data" / "shards").rglob("*") if p.is_file())
    assert evaluate(args) == 0
    assert json.loads((tmp_path / "z.json").read_text())["metrics"] == m  # reused shards, deterministic bound
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "data" / "shards").rglob("*") if p.is_file()) == built
    capsys.readouterr()
    assert evaluate(["--run", str(run), "--data", str(tmp_path / "missing.txt"), "--no-mlflow"]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_evaluate_data_refuses_a_task_tokenizer(quick, tmp_path, capsys):
    from pretrain.evaluate import main as evaluate

    (tmp_path / "c.txt").write_text("some text\n")
    assert evaluate(["--run", str(quick), "--data", str(tmp_path / "c.txt"), "--no-mlflow"]) == 2
    assert "task's own" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The README's user journey on the quickstart's model: train (the fixture), evaluate, generate,
# export, compare
# ----------------------------------------------------------------------------------------------


def test_readme_user_journey(quick, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from pretrain.compare import main as compare
    from pretrain.convert import main as convert
    from pretrain.evaluate import main as evaluate
    from pretrain.generate import main as generate

    readme = (REPO / "README.md").read_text()
    for command in ("python -m pretrain.evaluate --run RUN", "python -m pretrain.generate --run RUN",
                    "python -m pretrain.convert RUN --hf", "python -m pretrain.compare --experiment quickstart"):
        assert command in readme, command
    root = quick.parents[2]
    monkeypatch.chdir(root)
    uri = f"sqlite:///{root / 'mlruns.db'}"
    assert evaluate(["--run", str(quick), "--eval-batches", "1", "--num-samples", "2", "--batch-size", "2"]) == 0
    assert "logged to the MLflow run" in capsys.readouterr().out
    run_id = (quick / "mlflow_run_id").read_text().strip()
    logged = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    assert "val/nll" in logged and "task/solved" in logged  # one name per quantity, no eval/ copy
    assert not any(k.startswith(("eval/", "sample/")) for k in logged)
    assert generate(["--run", str(quick), "--prompt", PUZZLE, "--max-new-tokens", "81", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(PUZZLE)
    assert convert([str(quick), "--hf", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dlm_source"]["step"] == 3
    assert compare(["--uri", uri, "--experiment", "quickstart", "--out", str(tmp_path / "report")]) == 0
    assert "q" in (tmp_path / "report" / "report.md").read_text()
