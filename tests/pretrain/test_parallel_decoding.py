"""Seed 003's measurement: k-per-step decoding gives generate()'s tokens; the marginal-joint gap is 0
for k = 1, equals a slow chain-rule reference for k > 1 and the known value on a hand-made joint;
Sudoku violations counted on a hand-made grid; the CLI end to end on a tiny Sudoku run."""

import json
import math

import pytest
import torch

from data_pipeline.tasks import sudoku
from pretrain.config import ModelConfig
from pretrain.model import build_model
from pretrain.parallel_decoding import ALL, decode_parallel, parse_ks
from pretrain.sample import SamplerConfig, generate

MASK, V, L = 3, 12, 16


def tiny(variant="mdm", block_size=4, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=2, block_size=block_size), V, L)
    with torch.no_grad():  # sharper than at init: the conditionals depend on the context
        for p in model.parameters():
            p.mul_(2)
    return model.eval()


def problem(B=3):
    g = torch.Generator().manual_seed(4)
    x = torch.randint(4, V, (B, L), generator=g)
    gen = torch.zeros(B, L, dtype=torch.bool)
    gen[0, 2:15] = True
    gen[1, 5:12] = True
    gen[2, 1:16] = True
    return x, gen


@pytest.mark.parametrize(("variant", "bs", "temperature"),
                         [("mdm", 0, 0.0), ("mdm", 4, 0.0), ("mdm", 0, 1.0), ("block", 0, 0.0)])
def test_same_tokens_as_generate(variant, bs, temperature):
    model, (x, gen) = tiny(variant), problem()
    for k in (1, 2, 3, ALL):
        out = decode_parallel(model, x, gen, mask_id=MASK, k=k, block_size=bs, temperature=temperature, seed=7,
                              forbid_ids=(0, 1))
        ref = generate(model, x, gen, mask_id=MASK, forbid_ids=(0, 1),
                       cfg=SamplerConfig(name="confidence" if variant == "mdm" else "block", tokens_per_step=k or L,
                                         block_size=bs, temperature=temperature, seed=7, kv_cache=False))
        assert torch.equal(out.tokens, ref.tokens), (k, out.tokens, ref.tokens)
        assert out.forwards == ref.nfe
        assert torch.equal(out.committed, gen.sum(1))


def test_gap_is_zero_for_one_token_per_step_and_not_otherwise():
    model, (x, gen) = tiny(), problem()
    one = decode_parallel(model, x, gen, mask_id=MASK, k=1)
    assert one.gap.abs().max() < 1e-6 and one.joint_forwards == 0
    assert torch.equal(one.steps, gen.sum(1))
    four = decode_parallel(model, x, gen, mask_id=MASK, k=4)
    assert four.gap.abs().max() > 1e-3
    assert torch.equal(four.steps, (gen.sum(1) + 3) // 4)
    skipped = decode_parallel(model, x, gen, mask_id=MASK, k=4, joint=False)
    assert torch.equal(skipped.tokens, four.tokens) and skipped.gap.abs().max() == 0


def test_joint_equals_a_slow_chain_rule_reference():
    """All at once: the marginals come from the first forward; the chain rule commits the same tokens
    one at a time in the step's order of confidence, one row and one forward at a time."""
    model, (x, gen) = tiny(), problem()
    out = decode_parallel(model, x, gen, mask_id=MASK, k=ALL)
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone()
        xi[0, gen[i]] = MASK
        with torch.no_grad():
            logp0 = model(xi, None).double()[0]
        logp0[:, [MASK]] = -math.inf
        logp0 = logp0.log_softmax(-1)
        pos = gen[i].nonzero()[:, 0]
        tok = out.tokens[i, pos]
        conf = logp0[pos, tok]
        order = sorted(range(len(pos)), key=lambda j: (-float(conf[j]), j))
        marginal, joint = float(conf.sum()), 0.0
        for j in order:
            with torch.no_grad():
                lg = model(xi, None).double()[0, pos[j]]
            lg[MASK] = -math.inf
            joint += float(lg.log_softmax(-1)[tok[j]])
            xi[0, pos[j]] = tok[j]
        assert out.marginal[i] == pytest.approx(marginal, abs=1e-6)
        assert out.joint[i] == pytest.approx(joint, abs=1e-5)


class TwoCells(torch.nn.Module):
    """A hand-made model over [BOS, c1, c2, EOS] with digits a = 4, b = 5: with both cells masked
    each cell's marginal is p(a) = 0.6, p(b) = 0.4; once a cell holds a digit, the other holds the
    other digit with probability 0.99 (the cells must differ, as in a Sudoku row)."""

    class cfg:  # noqa: N801  (what the samplers read of a model config)
        variant, time_conditioning, block_size = "mdm", False, 0

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def block_len(self, seq_len):
        return seq_len

    def forward(self, x, t=None, key_padding_mask=None):
        B, n = x.shape
        probs = torch.full((B, n, 6), 1e-9, dtype=torch.float64)
        for i in range(B):
            for c, other in ((1, 2), (2, 1)):
                o = int(x[i, other])
                if o == MASK:
                    probs[i, c, 4], probs[i, c, 5] = 0.6, 0.4
                else:
                    probs[i, c, 9 - o], probs[i, c, o] = 0.99, 0.01
        return probs.log().float()


def test_gap_on_a_known_joint():
    x = torch.tensor([[0, 4, 4, 1]])
    gen = torch.tensor([[False, True, True, False]])
    model = TwoCells()
    one = decode_parallel(model, x, gen, mask_id=MASK, k=1, forbid_ids=(0, 1))
    assert one.tokens[0, 1:3].tolist() == [4, 5] and abs(float(one.gap[0])) < 1e-6  # coherent
    both = decode_parallel(model, x, gen, mask_id=MASK, k=2, forbid_ids=(0, 1))
    assert both.tokens[0, 1:3].tolist() == [4, 4]  # each likely alone, not together
    assert float(both.marginal[0]) == pytest.approx(2 * math.log(0.6), abs=1e-5)
    assert float(both.joint[0]) == pytest.approx(math.log(0.6) + math.log(0.01), abs=1e-5)
    assert float(both.gap[0]) == pytest.approx(math.log(60.0), abs=1e-5)


def test_sudoku_violations_on_a_hand_made_grid():
    solution = sudoku.solve(sudoku.from_text("." * 81))
    assert sudoku.unit_duplicates(solution) == {"row": 0, "col": 0, "box": 0, "total": 0}
    grid = list(solution)
    grid[0] = grid[1]  # r0c0 := r0c1: one duplicate in row 0, in column 0 (where that digit also sits) and box 0
    assert sudoku.unit_duplicates(grid) == {"row": 1, "col": 1, "box": 1, "total": 3}
    triple = [5, 5, 5] + [0] * 78  # three 5s in row 0 and box 0: two extra in each, none in a column
    assert sudoku.unit_duplicates(triple) == {"row": 2, "col": 0, "box": 2, "total": 4}
    assert sudoku.unit_duplicates([0] * 81)["total"] == 0  # blanks are not duplicates


def test_parse_ks():
    assert parse_ks("1, 2,8,all") == [1, 2, 8, ALL]
    with pytest.raises(ValueError, match="'0' is not a positive integer"):
        parse_ks("1,0")


def test_refuses_variants_it_does_not_measure():
    x, gen = problem()
    with pytest.raises(ValueError, match="one token per step"):
        decode_parallel(tiny("ar"), x, gen, mask_id=MASK, k=2)


def test_cli_on_a_tiny_sudoku_run(tmp_path, monkeypatch, capsys):
    from pretrain.launch import main as launch
    from pretrain.parallel_decoding import main

    (tmp_path / "s.yaml").write_text("""
data: {source: "task:sudoku", tokenizer: task, seq_len: 168, packing: pad,
       task: {num_train: 64, num_val: 8, sudoku: {givens: 60}}}
model: {variant: mdm, n_layers: 1, d_model: 32, n_heads: 2, block_size: 8}
train: {steps: 2, batch_size: 8, warmup_steps: 1, eval_every: 2, eval_batches: 1, log_every: 1, device: cpu}
tracking: {enabled: false}
""")
    monkeypatch.chdir(tmp_path)
    assert launch(["--config", "s.yaml", "--log-level", "WARNING", "--set", "launch.run_name=r"]) == 0
    run = next((tmp_path / "runs").glob("*/r"))
    capsys.readouterr()
    rc = main(["--run", str(run), "--k", "1,4,all", "--block-size", "0,9", "--num-samples", "3",
               "--batch-size", "2", "--json", str(tmp_path / "pd.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = json.loads((tmp_path / "pd.json").read_text())["rows"]
    assert [(r["block_size"], r["k"]) for r in rows] == [(b, k) for b in (0, 9) for k in ("1", "4", "all")]
    for r in rows:
        for key in ("task/solved", "task/cell_acc", "sudoku/violations", "sudoku/givens_changed", "gap/step",
                    "gap/token", "nll/marginal", "nll/joint", "steps"):
            assert math.isfinite(r[key]), (key, r)
        assert r["examples"] == 3 and r["sudoku/violations"] >= 0
    assert all(abs(r["gap/step"]) < 1e-6 for r in rows if r["k"] == "1")
    by = {(r["block_size"], r["k"]): r for r in rows}
    assert by[(0, "1")]["steps"] == 81 and by[(0, "all")]["steps"] == 1 and by[(9, "all")]["steps"] == 10
    assert "gap/step" in out and "sudoku/violations" in out
