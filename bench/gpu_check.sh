#!/usr/bin/env bash
# The short prepared GPU check (issue 18, Benchmarks): under 8 minutes on one GPU (H100-class): the
# parts' time limits add up to 500 s (launch 110, kernels 80, tests 80, step 80 + 150).
#
#   bash bench/gpu_check.sh [OUTDIR]          # OUTDIR default: bench/results/gpu_check
#
# What it runs, in order (each part has its own time limit; a failed part is reported, the rest go on):
#   1. device   nvidia-smi's name/memory/driver and torch's CUDA/NCCL versions
#   2. launch   the product's launch in bf16 with NCCL at world size 1: `python -m pretrain.launch` on
#               configs/quickstart.yaml (Sudoku, padded rows), 100 steps, train.dtype=bf16,
#               parallel.zero_stage=1 (DeepSpeed, so torch.distributed initialises with NCCL),
#               train.activation_checkpointing=every_k; reads its metrics back (loss first/last,
#               validation NLL) and the attention kernel the model logged
#   3. kernels  MDLM-small (12 x 768, bf16): an unpadded batch under
#               sdpa_kernel(FLASH_ATTENTION) only (fails unless flash really ran), and a padded batch
#               through FlexAttention (compiled, block mask from lengths) against SDPA's dense mask
#   3b. tests   tests/pretrain/test_attention_kernel.py on the GPU (its CUDA-only test: FlexAttention's
#               gradients equal the dense mask's under activation checkpointing)
#   4. step     bench/bench_step.py --device cuda --dtype bf16: Trainer.train_step vs the bare loop,
#               MFU and peak memory for mdlm-small (the recipe: residual dropout 0.1 as MDLM, no
#               attention dropout -> FlexAttention on its padded rows; and model.attention_dropout=0.1
#               -> SDPA's dense mask, the kernel FlexAttention's absence would leave) and 350m (24 x 1024)
#
# Output format. Everything is echoed to stdout and OUTDIR/gpu_check.log; the machine-readable lines
# start with "GPU_CHECK " followed by space-separated key=value pairs (values without spaces):
#   GPU_CHECK part=device name=<gpu> memory_mib=<n> torch=<v> cuda=<v> nccl=<v>
#   GPU_CHECK part=launch status=ok|failed rc=<n> seconds=<s> backend=nccl|auto(nccl_not_in_log) world_size=1 dtype=bf16
#             steps=<n> loss_first=<x> loss_last=<x> val_nll=<x> attention_kernel=<kernel>
#             mfu=<the trainer's logged train/mfu, median over logged steps (real tokens only)>
#   GPU_CHECK part=flash status=ok|failed shape=BxL
#   GPU_CHECK part=flex status=ok|failed max_abs_diff=<x> kernel=<kernel>
#   GPU_CHECK part=tests status=ok|failed rc=<n> file=<test file>
#   GPU_CHECK part=step size=<name> overrides=<k=v,...|-> ms=<framework ms> bare_ms=<ms> ratio=<x>
#             mfu=<framework MFU> bare_mfu=<x> peak_memory_gib=<x> attention_kernel=<kernel> tokens=<n>
#   GPU_CHECK part=done seconds=<total>
# attention_kernel is one of sdpa:no-mask, sdpa:causal (flash-eligible), flex:block-mask,
# sdpa:dense-mask (pretrain/model/attention_kernel.py). Files: OUTDIR/gpu_check.log,
# OUTDIR/launch/ (the run), OUTDIR/bench_step*.json (bench_step's rows).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUTDIR=${1:-bench/results/gpu_check}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
: > "$LOG"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false
START=$(date +%s)
say() { echo "$*" | tee -a "$LOG"; }

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "GPU_CHECK part=device status=failed reason=no_cuda"
    exit 1
fi

# 1. device
python - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
p = torch.cuda.get_device_properties(0)
nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
print(f"GPU_CHECK part=device name={p.name.replace(' ', '_')} memory_mib={p.total_memory // 2**20} "
      f"torch={torch.__version__} cuda={torch.version.cuda} nccl={nccl}")
EOF

# 2. the product's launch: bf16, NCCL, world size 1
RUN=$OUTDIR/launch
rm -rf "$RUN"
mkdir -p "$RUN"
T0=$(date +%s)
(cd "$RUN" && timeout 110 python -m pretrain.launch --config "$REPO/configs/quickstart.yaml" --set \
    train.steps=100 train.eval_every=50 train.log_every=10 train.device=cuda train.dtype=bf16 \
    launch.nproc=1 parallel.zero_stage=1 train.activation_checkpointing=every_k tracking.enabled=false \
    tracking.log_samples=0 data.shard_dir="$RUN/shards") > "$RUN/launch.log" 2>&1
RC=$?
T1=$(date +%s)
tail -n 15 "$RUN/launch.log" | tee -a "$LOG"
python - "$RUN" "$RC" "$((T1 - T0))" <<'EOF' 2>&1 | tee -a "$LOG"
import re, sys
from pathlib import Path
run, rc, secs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
fields = {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": secs, "backend": "nccl",
          "world_size": 1, "dtype": "bf16"}
log = (run / "launch.log").read_text(errors="replace")
kernels = re.findall(r"attention kernel: (\S+)", log)
fields["attention_kernel"] = ",".join(dict.fromkeys(kernels)) or "?"
# parallel/state.py picks nccl on CUDA; say whether the log shows it
fields["backend"] = "nccl" if re.search(r"nccl", log, re.I) else "auto(nccl_not_in_log)"
try:
    from pretrain.train import read_metrics
    (run_dir,) = (run / "runs" / "quickstart").iterdir()
    train, ev = read_metrics(run_dir), read_metrics(run_dir, "eval")
    fields["steps"] = max(train)
    fields["loss_first"] = f"{train[min(train)]['train/loss']:.4f}"
    fields["loss_last"] = f"{train[max(train)]['train/loss']:.4f}"
    last = ev[max(ev)]
    fields["val_nll"] = f"{last['val/nll']:.4f}"
    mfus = [m["train/mfu"] for m in train.values() if "train/mfu" in m]
    fields["mfu"] = f"{sorted(mfus)[len(mfus) // 2]:.3f}" if mfus else "?"  # the trainer's, real tokens
except Exception as e:  # a failed run: say what is missing
    fields["error"] = type(e).__name__
print("GPU_CHECK part=launch " + " ".join(f"{k}={v}" for k, v in fields.items()))
EOF

# 3. kernels: flash without padding, FlexAttention with padding (MDLM-small shape, bf16)
timeout 80 python - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from pretrain.config import load_config
from pretrain.model import build_model
cfg = load_config("configs/lm1b_bell.yaml")
model = build_model(cfg.model, 30522, 128).cuda().eval()
ids = torch.randint(0, 30522, (64, 128), device="cuda")
full = torch.ones(64, 128, dtype=torch.bool, device="cuda")
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            model(ids, key_padding_mask=full)
        print(f"GPU_CHECK part=flash status=ok shape=64x128 kernel={model.attention_kernel}")
    except RuntimeError as e:
        print(f"GPU_CHECK part=flash status=failed shape=64x128 error={type(e).__name__}")
    lengths = torch.randint(10, 129, (64,), device="cuda")
    pad = torch.arange(128, device="cuda")[None, :] < lengths[:, None]
    try:
        model.use_flex = True
        flex = model(ids, key_padding_mask=pad)
        kernel = model.attention_kernel
        model.use_flex = False
        dense = model(ids, key_padding_mask=pad)
        diff = (flex.float() - dense.float())[pad].abs().max().item()
        ok = diff < 0.1 * dense.float()[pad].abs().max().item()  # bf16: same logits up to rounding
        print(f"GPU_CHECK part=flex status={'ok' if ok else 'failed'} max_abs_diff={diff:.4g} kernel={kernel}")
    except Exception as e:
        print(f"GPU_CHECK part=flex status=failed error={type(e).__name__}:{str(e)[:80].replace(' ', '_')}")
EOF

# 3b. the attention-kernel tests on the GPU (flex vs dense gradients under activation checkpointing)
timeout 80 python -m pytest tests/pretrain/test_attention_kernel.py -q -p no:cacheprovider > "$OUTDIR/tests.log" 2>&1
RC=$?
tail -n 3 "$OUTDIR/tests.log" | tee -a "$LOG"
say "GPU_CHECK part=tests status=$([ $RC -eq 0 ] && echo ok || echo failed) rc=$RC file=tests/pretrain/test_attention_kernel.py"

# 4. bench_step: framework vs bare, MFU, peak memory
step() {  # $1 = json name, rest = bench_step args
    local out=$OUTDIR/$1.json limit=$2; shift 2
    timeout "$limit" python bench/bench_step.py --device cuda --dtype bf16 --warmup 3 --repeats 8 --out "$out" "$@" \
        2>&1 | tail -n 6 | tee -a "$LOG"
    python - "$out" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["results"]
except Exception as e:
    print(f"GPU_CHECK part=step status=failed file={sys.argv[1]} error={type(e).__name__}")
    sys.exit(0)
for r in rows:
    print(f"GPU_CHECK part=step size={r['name']} overrides={','.join(r['overrides']) or '-'} "
          f"ms={r['framework_ms']:.1f} bare_ms={r['bare_ms']:.1f} ratio={r['ratio']:.3f} "
          f"mfu={r.get('framework_mfu', 0):.3f} bare_mfu={r.get('bare_mfu', 0):.3f} "
          f"peak_memory_gib={r.get('peak_memory_gib', 0):.2f} attention_kernel={r['attention_kernel']} "
          f"tokens={r['tokens_per_step']}")
EOF
}
step bench_step_recipe 150 --sizes mdlm-small 350m
step bench_step_attn_dropout 80 --sizes mdlm-small --set model.attention_dropout=0.1

say "GPU_CHECK part=done seconds=$(( $(date +%s) - START ))"
