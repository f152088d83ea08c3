#!/usr/bin/env bash
# Does a larger model close the demo's adaptation gap? Rebuilds the demo (scripts/build_demo.sh:
# same data, tokenizer, steps and stage-2 recipe) at several model sizes and prints, per size, the
# AR base's accuracy and the adapted model's at thresholds 1.0 and 0.9 (200 held-out problems,
# batch 8). Meant for a GPU: on 2 CPU cores even the bundled size takes about an hour.
#
#   bash scripts/demo_scale_gpu.sh OUT_DIR                     # every size below
#   SIZES="m384 l768" bash scripts/demo_scale_gpu.sh OUT_DIR   # some of them
#
# Sizes (name: hidden, MLP, layers, query heads x head dim, stage-1 peak learning rate); every
# one has 2 KV heads. d192 is the bundled model (since session 24), s192 the four-layer bundle
# of sessions 11 to 23. On 2 CPU cores a 256-wide model reached only 72.5% AR at the recipe's
# 1500 steps and 3e-3 (session 7), hence the lower rates of the larger.
#   s192: 192,  512, 4,  4 x 48, 3e-3
#   d192: 192,  512, 6,  4 x 48, 1.5e-3
#   m384: 384, 1024, 6,  6 x 64, 1e-3
#   l768: 768, 2048, 8, 12 x 64, 5e-4
# Stage 2 runs at configs/demo_adapt.gin's peak rate (6e-4 since session 9) for s192 and d192,
# at 3e-4 (the rate of every size before session 9) for the larger two: a binding, so it wins
# over a --gin_file overlay in STAGE2_ARGS; a --gin_param there wins over it. Every size takes
# the configs' step counts (1500 + 1000 since session 28; STAGE1_STEPS / STAGE2_STEPS below).
#
# Writes OUT_DIR/scale_<size>.json (benchmarks/demo_speed_accuracy.py's report) and
# OUT_DIR/scale_summary.jsonl (one line per size). Work files: $SCALE_WORK/<size>/ (default
# workdirs/scale, relative to the repository root); a size whose work directory exists resumes (delete it to start over).
# Environment: PYTHON, NUM_TRAIN (see build_demo.sh),
# STAGE2_ARGS (e.g. "--gin_file configs/demo_paper_recipe.gin"), STAGE1_STEPS / STAGE2_STEPS
# to change the step counts and CHECK_ARGS to add benchmark arguments (e.g. a smoke test:
# STAGE1_STEPS=3 STAGE2_STEPS=2 CHECK_ARGS="--num_problems 8").
set -euo pipefail
OUT=$(realpath -m "${1:?usage: bash scripts/demo_scale_gpu.sh OUT_DIR}")  # before the cd
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SIZES=${SIZES:-d192 m384 l768}
SCALE_WORK=${SCALE_WORK:-workdirs/scale}
mkdir -p "$OUT"

size_args() {  # train.py arguments of one size (no spaces inside an argument)
  local hidden mlp layers heads head_dim lr
  case "$1" in
    s192) hidden=192 mlp=512 layers=4 heads=4 head_dim=48 lr=3e-3 ;;
    d192) hidden=192 mlp=512 layers=6 heads=4 head_dim=48 lr=1.5e-3 ;;
    m384) hidden=384 mlp=1024 layers=6 heads=6 head_dim=64 lr=1e-3 ;;
    l768) hidden=768 mlp=2048 layers=8 heads=12 head_dim=64 lr=5e-4 ;;
    *) echo "unknown size '$1'; use s192, d192, m384 or l768" >&2; return 2 ;;
  esac
  echo "--gin_param model_config.hidden_size=$hidden" \
       "--gin_param model_config.intermediate_size=$mlp" \
       "--gin_param model_config.num_hidden_layers=$layers" \
       "--gin_param model_config.num_attention_heads=$heads" \
       "--gin_param model_config.head_dim=$head_dim" \
       "--gin_param TrainConfig.learning_rate=$lr"
}

stage2_size_args() {  # the size's stage-2 rate, before the caller's STAGE2_ARGS
  case "$1" in
    s192|d192) echo "" ;;
    *) echo "--gin_param TrainConfig.learning_rate=3e-4" ;;
  esac
}

for size in $SIZES; do
  stage1="$(size_args "$size")"  # fails (set -e) on an unknown size before any work
  stage2="$(stage2_size_args "$size") ${STAGE2_ARGS:-}"
  if [ -n "${STAGE1_STEPS:-}" ]; then stage1="$stage1 --gin_param TrainConfig.num_steps=$STAGE1_STEPS"; fi
  if [ -n "${STAGE2_STEPS:-}" ]; then stage2="$stage2 --gin_param TrainConfig.num_steps=$STAGE2_STEPS"; fi
  work="$SCALE_WORK/$size"
  echo "[demo_scale] $size: $stage1"
  # Not bundled, so no 20 MiB limit on the export (384 wide: 74 MiB).
  WORK="$work" MODELS_OUT="$work/models" EXPORT_MAX_MIB=4096 \
    STAGE1_ARGS="$stage1" STAGE2_ARGS="$stage2" \
    CHECK_ARGS="--batch_sizes 8 --no_plot ${CHECK_ARGS:-}" PYTHON="$PYTHON" bash scripts/build_demo.sh
  cp "$work/check.json" "$OUT/scale_$size.json"
  "$PYTHON" - "$size" "$OUT/scale_$size.json" >> "$OUT/scale_summary.jsonl" <<'EOF'
import json, sys
size, path = sys.argv[1:]
report = json.load(open(path))
batch = report["summary"]["batch_size_8"]
line = {"size": size, "params": report["params"], "device": report["device"],
        "ar_accuracy": batch["ar_accuracy"]}
for threshold in ("1.0", "0.9"):
  row = batch[f"threshold_{threshold}_no_cache"]
  line[f"accuracy_{threshold}"] = row["accuracy"]
  line[f"tokens_per_forward_{threshold}"] = row["tokens_per_row_forward"]
  line[f"speedup_vs_ar_{threshold}"] = row["speedup_vs_ar"]
print(json.dumps(line))
EOF
  tail -n 1 "$OUT/scale_summary.jsonl"
done
