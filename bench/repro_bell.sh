#!/usr/bin/env bash
# Seed 001 at the scale of this machine (issue 11): does bell-shaped diffusion-time sampling reach
# uniform sampling's final validation NLL with fewer tokens? Every step is the product's own command:
#   1. build the shards once (sentencepiece trained on the local English corpora, wrap packing at 128),
#   2. train bell and uniform (per seed) and one AR reference with python -m pretrain.launch,
#   3. python -m pretrain.evaluate on each final checkpoint (the whole held-out split), then
#      python -m pretrain.compare: table, plots, and the per-seed headline ratio
#      (tokens uniform needs to reach its final NLL / tokens bell needs to reach it).
# Results: bench/RESULTS.md. Usage (from anywhere):
#   bench/repro_bell.sh                      # seed 0: bell, uniform, ar (~20 min per run on 2 busy cores)
#   SEEDS="0 1 2" bench/repro_bell.sh        # more seeds for bell/uniform; finished runs are not redone
#   OUT=/scratch/repro STEPS=800 bench/repro_bell.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/repro}              # run dirs, the MLflow store and the comparison (gitignored by default)
SEEDS=${SEEDS:-0}                   # seeds of the bell/uniform pair
AR_SEEDS=${AR_SEEDS-0}             # seeds of the AR reference (after the first bell/uniform pair; empty: none)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
URI="sqlite:///$OUT/mlruns.db"
SET=(launch.output_dir="$OUT" tracking.uri="$URI" tracking.artifact_location="$OUT/mlruns")
[[ -n "${STEPS:-}" ]] && SET+=(train.steps="$STEPS")
echo "MLflow store: $URI (open: mlflow ui --backend-store-uri $URI --host 127.0.0.1)"

stamp() { date +%H:%M:%S; }
train() {  # recipe seed
    echo "[$(stamp)] train $1 seed $2"
    local t0=$SECONDS
    python -m pretrain.launch --config "configs/repro/$1.yaml" --set seed="$2" "${SET[@]}"
    echo "[$(stamp)] $1 seed $2 took $((SECONDS - t0)) s"
}

echo "[$(stamp)] build shards"
python -m data_pipeline.build --config configs/repro/text_bell.yaml --no-progress

first=1
for seed in $SEEDS; do
    train text_bell "$seed"
    train text_uniform "$seed"
    if ((first)); then
        for ar_seed in $AR_SEEDS; do train text_ar "$ar_seed"; done
        first=0
    fi
done

# The curves score a fixed prefix of the held-out split (train.eval_batches, cheap enough to repeat);
# the final checkpoints are also scored on all of it (logged to each run under eval/).
echo "[$(stamp)] final checkpoints on the whole held-out split"
mkdir -p "$OUT/fullval"
for run in "$OUT"/repro_bell/*/; do
    name=$(basename "$run")
    [[ -f "$OUT/fullval/$name.json" ]] && continue
    python -m pretrain.evaluate --run "$run" --eval-batches 0 --num-samples 0 --json "$OUT/fullval/$name.json" \
        | grep -E "^val/nll" | sed "s|^|$name |"
done

echo "[$(stamp)] compare"
python -m pretrain.compare --uri "$URI" --experiment repro_bell --baseline time_sampler=uniform \
    --headline time_sampler=uniform:bell --out "$OUT/compare" --attach
echo "[$(stamp)] done: report $OUT/compare/report.md, MLflow $URI"
