#!/usr/bin/env bash
# The CPU learning curve of SFT and CFT on ML-100K (all 943 test users), one point per run.
# Every point is the `cpu` budget of the recipe (full fine-tuning, bf16 where the CPU has it,
# batch 64, lr 1e-4, one epoch) with one more departure: the number of training examples,
# or each user's latest training item for three epochs. Runs one after another into ./runs;
# a finished point is reused, a killed one resumes from its checkpoint.
#   THREADS=1 bash bench/learning_curve.sh [sft|cft|all]   then   python bench/learning_curve.py
# (THREADS=1 when another job shares the 2 cores: oversubscribed torch threads run several times slower;
#  GC=1 adds gradient checkpointing, ~5.5-8 GB instead of 10-15 GB per job, so two points fit in 24 GB)
set -u
cd "$(dirname "$0")/.."
which="${1:-all}"
mkdir -p logs
point() {  # label method [--set field=value ...]
  local label=$1 method=$2; shift 2
  local sets=(--set "$label.num_threads=${THREADS:-2}")
  [ "${GC:-0}" = 1 ] && sets+=(--set "$label.gradient_checkpointing=true")
  for kv in "$@"; do sets+=(--set "$label.$kv"); done
  echo "$(date -u +%FT%TZ) start $label" >> logs/learning_curve.log
  python -m benchmark run --methods "$label=$method" "${sets[@]}" --run-id "curve-$label" --quiet \
    > "logs/curve-$label.log" 2>&1
  local rc=$?  # before any command substitution resets $?
  echo "$(date -u +%FT%TZ) end $label rc=$rc" >> logs/learning_curve.log
}
for m in sft cft; do
  [ "$which" = all ] || [ "$which" = "$m" ] || continue
  [ "$m" = sft ] && point sft_n0 sft max_train_examples=0   # zero-shot: CFT's is the same model
  point "${m}_n256" "$m" max_train_examples=256
  point "${m}_n1024" "$m" max_train_examples=1024
  point "${m}_n2048" "$m" max_train_examples=2048           # the cpu budget itself
  point "${m}_last3" "$m" train_positions=last epochs=3      # 943 latest items x 3 epochs
  point "${m}_n4096" "$m" max_train_examples=4096
done
