"""Tensor parallelism (parallel/tensor_parallel.py) and process groups (parallel/state.py).

The distributed checks run in 2 real processes on CPU over gloo with megatron-core's real layers:
this file is also the worker script (`python test_tensor_parallel.py MODE OUTDIR`, with the
launcher's environment variables). Each mode is launched once per module and runs every
scenario, because importing megatron-core costs seconds per process; the workers write their
measurements as JSON and the tests below assert on them, one property per test.

Reference: the plain model built with the same seed in each process, run on the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from parallel.tensor_parallel import merge_state_dicts, plan_style, shard_layout, shard_state_dict
from pretrain.config import ModelConfig
from pretrain.model import build_model

REPO = Path(__file__).resolve().parents[2]
V, L, B = 37, 16, 3  # odd vocabulary: exercises the padding to a multiple of tp
TOL = 1e-5

CASES: dict[str, dict] = {
    "mdm": dict(model={}, pad=False),
    "mdm_pad": dict(model={}, pad=True),
    "ar": dict(model={"variant": "ar"}, pad=False),
    "ar_pad": dict(model={"variant": "ar"}, pad=True),
    # tied embeddings, GELU, LayerNorm, adaLN time conditioning (re-initialised away from zero)
    "mdm_tied_gelu_adaln_pad": dict(
        model={"tie_embeddings": True, "mlp": "gelu", "norm": "layernorm", "time_conditioning": True, "cond_dim": 16},
        pad=True,
    ),
    # the two-stream pass over [x_t | x_0]
    "block_two_stream": dict(model={"variant": "block", "block_size": 4}, pad=True),
}


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(n_layers=2, d_model=32, n_heads=4), **kw)


def plain_model(case: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(tiny(**CASES[case]["model"]), V, L)
    with torch.no_grad():  # adaLN-Zero starts at 0, which would zero most gradients: perturb it
        for name, p in model.named_parameters():
            if "adaLN" in name:
                p.normal_(0.0, 0.05)
    return model


# ---------------------------------------------------------------------------------------------
# Worker (runs in each spawned process)
# ---------------------------------------------------------------------------------------------


def _inputs(case: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, L), generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    real = torch.ones(B, L, dtype=torch.bool)
    if CASES[case]["pad"]:
        real[1, 11:] = False
        real[2, 5:] = False
    kwargs = {"t": torch.rand(B, generator=g), "key_padding_mask": real}
    if CASES[case]["model"].get("variant") == "block":
        kwargs["x0"] = torch.randint(0, V, (B, L), generator=g)
    return ids, targets, real, kwargs


def _loss(logits, targets, real):
    return nn.functional.cross_entropy(logits[real].float(), targets[real])


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
    worst = max(a, key=lambda k: (a[k].double() - b[k].double()).abs().max().item())
    return (a[worst].double() - b[worst].double()).abs().max().item(), worst


def _run_case(case: str, group) -> dict:
    import torch.distributed as dist

    from parallel.tensor_parallel import (
        apply_tensor_parallel,
        gather_tensor_parallel_state_dict,
        gather_tensor_parallel_tensors,
    )

    plain = plain_model(case)
    tp_model = apply_tensor_parallel(plain_model(case))
    ids, targets, real, kwargs = _inputs(case)
    out = {}

    logits_plain, logits_tp = plain(ids, **kwargs), tp_model(ids, **kwargs)
    out["logits_shape"] = list(logits_tp.shape)
    out["logits_diff"] = (logits_plain - logits_tp).abs().max().item()

    _loss(logits_plain, targets, real).backward()
    _loss(logits_tp, targets, real).backward()
    grads_plain = {n: p.grad for n, p in plain.named_parameters()}
    grads_tp = gather_tensor_parallel_tensors(
        {n: p.grad for n, p in tp_model.named_parameters()}, V, group
    )
    out["grad_keys_match"] = sorted(grads_plain) == sorted(grads_tp)
    out["grad_norm"] = torch.stack([g.norm() for g in grads_plain.values()]).norm().item()
    out["grad_diff"], out["grad_worst"] = _max_diff(grads_plain, grads_tp)

    # replicated parameters: same gradient on every TP rank without any extra communication
    spread = 0.0
    for name, p in tp_model.named_parameters():
        if shard_layout(name)[0] is None:
            parts = [torch.empty_like(p.grad) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, p.grad, group=group)
            spread = max(spread, max((x - parts[0]).abs().max().item() for x in parts))
    out["replicated_grad_spread"] = spread
    out["n_marked"] = sum(bool(getattr(p, "tensor_model_parallel", False)) for p in tp_model.parameters())

    # Adam's first step is ~lr * g / (|g| + eps): for gradients near eps it magnifies the last-bit
    # differences of TP's reduction order, so eps is 1e-6 here rather than 1e-8 (measured: 3e-5
    # apart at 1e-8 on a q/k weight whose gradient is ~1e-8; 1e-6 keeps that under 1e-6)
    for model in (plain, tp_model):
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6).step()
    stepped_plain, stepped_tp = plain.state_dict(), gather_tensor_parallel_state_dict(tp_model)
    out["state_keys_match"] = sorted(stepped_plain) == sorted(stepped_tp)
    out["step_diff"], out["step_worst"] = _max_diff(stepped_plain, stepped_tp)
    out["step_moved"] = _max_diff(stepped_plain, plain_model(case).state_dict())[0]

    # gather(shard(sd)) on the live model: load a rank's shard of a different full state dict
    other = plain_model(case, seed=7).state_dict()
    tp_model.load_state_dict(shard_state_dict(other, group.rank(), group.size()), strict=True)
    back = gather_tensor_parallel_state_dict(tp_model)
    out["roundtrip_exact"] = sorted(back) == sorted(other) and all(torch.equal(back[k], other[k]) for k in other)
    return out


def _mpu_report() -> dict:
    from parallel.state import DeepSpeedMpu

    mpu = DeepSpeedMpu()
    return {
        "model": [mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()],
        "tensor": [mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()],
        "tensor_src": mpu.get_tensor_model_parallel_src_rank(),
        "pipeline": [mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()],
        "data": [mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()],
        "data_ranks": mpu.get_data_parallel_group_ranks(),
        "groups_exist": all(
            g is not None
            for g in (
                mpu.get_model_parallel_group(),
                mpu.get_tensor_model_parallel_group(),
                mpu.get_pipeline_model_parallel_group(),
                mpu.get_data_parallel_group(),
            )
        ),
    }


def worker(outdir: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    from parallel.state import destroy, init_distributed
    from parallel.tensor_parallel import apply_tensor_parallel

    topo = init_distributed(backend="gloo", tp=2, pp=1, timeout_s=60)
    result: dict = {"topology": dataclasses.asdict(topo), "mpu_tp2": _mpu_report(), "cases": {}}
    group = ps.get_tensor_model_parallel_group()
    for case in CASES:
        result["cases"][case] = _run_case(case, group)
    try:  # each rank seeded differently: the shards would not form one model
        apply_tensor_parallel(plain_model("mdm", seed=100 + topo.rank))
        result["different_seeds"] = "accepted"
    except ValueError as e:
        result["different_seeds"] = str(e)

    destroy(process_group=False)
    topo1 = init_distributed(backend="gloo", tp=1, pp=1, timeout_s=60)
    result["topology_tp1"] = dataclasses.asdict(topo1)
    result["mpu_tp1"] = _mpu_report()
    destroy()
    (outdir / f"rank{topo.rank}.json").write_text(json.dumps(result))


def worker_deepspeed(outdir: Path) -> None:
    """The trainer's DeepSpeed engine (parallel/engine.py) over the TP model with DeepSpeedMpu, ZeRO 0,
    1 and 3: the gradient norm it reports and its (clipped) step must equal the plain model's, i.e.
    each sharded parameter counts once and each replicated one once (on tp rank 0), over the groups
    the adapter hands it. ZeRO-0 is the engine's own norm (DeepSpeed's torch-optimizer path has none)."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import deepspeed

    from parallel.engine import DeepSpeedEngine, deepspeed_config
    from parallel.state import DeepSpeedMpu, destroy, init_distributed
    from parallel.tensor_parallel import apply_tensor_parallel, gather_tensor_parallel_state_dict

    topo = init_distributed(backend="gloo", tp=2, pp=1, timeout_s=60)
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the process group
    case, clip, result = "mdm_pad", 0.5, {}
    ids, targets, real, kwargs = _inputs(case)
    for stage in (0, 1, 3):
        plain = plain_model(case)
        model = apply_tensor_parallel(plain_model(case))
        config = deepspeed_config(B, 1, 1, clip, stage, "fp32", n_params=10**6)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
        engine = DeepSpeedEngine(model, opt, config, mpu=DeepSpeedMpu())
        engine.backward(_loss(engine(ids, **kwargs), targets, real))
        stepped = engine.step()
        _loss(plain(ids, **kwargs), targets, real).backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
        torch.optim.AdamW(plain.parameters(), lr=1e-2, eps=1e-6).step()
        result[f"zero{stage}"] = {
            "ds_grad_norm": stepped.grad_norm,
            "applied": stepped.applied,
            "plain_grad_norm": norm.item(),
            "step_diff": _max_diff(plain.state_dict(), gather_tensor_parallel_state_dict(engine.module))[0],
        }
    destroy()
    (outdir / f"ds-rank{topo.rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Launcher and tests
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(outdir: Path, mode: str, world: int = 2) -> list[dict]:
    """Launch `world` worker processes as a launcher would (env vars), collect their reports."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, mode, str(outdir)], env=env, cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{logs[rank][-4000:]}"
    prefix = "ds-" if mode == "deepspeed" else ""
    return [json.loads((outdir / f"{prefix}rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("tp"), "tp")


def test_topology_from_parallel_state_tp2(runs):
    for rank, r in enumerate(runs):
        t = r["topology"]
        assert (t["rank"], t["world_size"], t["local_rank"]) == (rank, 2, rank)
        assert (t["tp_rank"], t["tp_size"], t["dp_rank"], t["dp_size"], t["pp_size"]) == (rank, 2, 0, 1, 1)


def test_deepspeed_mpu_tp2_dp1(runs):
    for rank, r in enumerate(runs):
        m = r["mpu_tp2"]
        assert m["groups_exist"]
        assert m["model"] == [rank, 2] and m["tensor"] == [rank, 2] and m["tensor_src"] == 0
        assert m["pipeline"] == [0, 1] and m["data"] == [0, 1] and m["data_ranks"] == [rank]


def test_deepspeed_mpu_tp1_dp2(runs):
    for rank, r in enumerate(runs):
        m, t = r["mpu_tp1"], r["topology_tp1"]
        assert m["model"] == [0, 1] and m["tensor"] == [0, 1] and m["tensor_src"] == rank
        assert m["data"] == [rank, 2] and m["data_ranks"] == [0, 1]
        assert (t["dp_rank"], t["dp_size"], t["tp_size"]) == (rank, 2, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_plain_model(runs, case):
    for r in runs:
        c = r["cases"][case]
        assert c["logits_shape"] == [B, L, V]  # full, unpadded vocabulary
        assert c["logits_diff"] < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_gathered_gradients_equal_plain_model(runs, case):
    for r in runs:
        c = r["cases"][case]
        assert c["grad_keys_match"]
        assert c["grad_norm"] > 1e-3  # the comparison is not between zeros
        assert c["grad_diff"] < TOL, c["grad_worst"]


@pytest.mark.parametrize("case", list(CASES))
def test_replicated_parameters_get_identical_grads_on_every_tp_rank(runs, case):
    for r in runs:
        assert r["cases"][case]["replicated_grad_spread"] == 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_adamw_step_keeps_tp_weights_equal_to_plain(runs, case):
    for r in runs:
        c = r["cases"][case]
        assert c["state_keys_match"]
        assert c["step_moved"] > 1e-3  # the step did change the weights
        assert c["step_diff"] < TOL, c["step_worst"]


@pytest.mark.parametrize("case", list(CASES))
def test_gather_of_shard_round_trips_exactly(runs, case):
    assert all(r["cases"][case]["roundtrip_exact"] for r in runs)


def test_sharded_parameters_are_marked_for_deepspeed(runs):
    # untied: tok_emb + head + per block qkv, proj, fc_in, fc_out (+ gate for SwiGLU)
    assert runs[0]["cases"]["mdm"]["n_marked"] == 2 + 2 * 5
    assert runs[0]["cases"]["mdm_tied_gelu_adaln_pad"]["n_marked"] == 1 + 2 * 4  # tied, GELU


def test_differently_seeded_ranks_are_refused(runs):
    for r in runs:
        assert "same seed" in r["different_seeds"]


# ---------------------------------------------------------------------------------------------
# In-process tests (no process group)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", ["mdm", "mdm_tied_gelu_adaln_pad"])
def test_shard_then_merge_round_trips(case, tp):
    full = plain_model(case).state_dict()
    shards = [shard_state_dict(full, r, tp) for r in range(tp)]
    assert shards[0]["tok_emb.weight"].shape[0] == -(-V // tp)  # padded, split evenly
    assert shards[1]["blocks.0.attn.qkv.weight"].shape[0] == 3 * 32 // tp
    assert shards[1]["blocks.0.attn.proj.weight"].shape[1] == 32 // tp
    merged = merge_state_dicts(shards, V)
    assert sorted(merged) == sorted(full)
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_qkv_shard_holds_whole_heads():
    """Rank r's qkv rows are q, k, v of heads [r h/tp, (r+1) h/tp) in the model's layout."""
    full = plain_model("mdm").state_dict()["blocks.0.attn.qkv.weight"]  # [3d, d] = [h * 3 * hd, d]
    h, hd, tp = 4, 8, 2
    per_head = full.view(h, 3, hd, -1)
    for r in range(tp):
        shard = shard_state_dict({"blocks.0.attn.qkv.weight": full}, r, tp)["blocks.0.attn.qkv.weight"]
        assert torch.equal(shard.view(h // tp, 3, hd, -1), per_head[r * h // tp : (r + 1) * h // tp])


def test_plan_covers_every_matmul_of_the_model():
    """A new Linear/Embedding in the model must be added to TP_PLAN or knowingly kept replicated
    (per-sequence time conditioning), or it would silently run on sharded activations."""
    replicated_ok = ("adaLN", "time_emb")
    model = build_model(tiny(time_conditioning=True, cond_dim=16), V, L)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            assert plan_style(name) is not None or any(s in name for s in replicated_ok), name


def test_init_distributed_refuses_tp_not_dividing_world(monkeypatch):
    import torch.distributed as dist

    from parallel.state import init_distributed

    for k, v in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=r"tensor_parallel \(2\) x pipeline_parallel \(1\) = 2 does not divide"):
        init_distributed(backend="gloo", tp=2)
    assert not dist.is_initialized()  # failed before any rendezvous (which would hang)


@pytest.mark.slow  # ~8 s; the first DeepSpeed init on a machine also compiles its CPU comm op (~35 s)
def test_deepspeed_zero_with_mpu_adapter_matches_plain_model(tmp_path):
    for r in _launch(tmp_path, "deepspeed"):
        for stage in ("zero0", "zero1", "zero3"):
            z = r[stage]
            assert z["applied"]
            assert z["plain_grad_norm"] > 0.5  # clip 0.5 is active, so a wrong norm changes the step
            assert abs(z["ds_grad_norm"] - z["plain_grad_norm"]) < 1e-5 * z["plain_grad_norm"], stage
            assert z["step_diff"] < TOL, stage


if __name__ == "__main__":
    {"tp": worker, "deepspeed": worker_deepspeed}[sys.argv[1]](Path(sys.argv[2]))
