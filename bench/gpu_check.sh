#!/usr/bin/env bash
# The GPU check of bench/GPU_PLAN.md: every step bounded by `timeout`, each step's results
# written under OUTDIR as soon as it ends (a timeout loses that step only).
#
#   bash bench/gpu_check.sh OUTDIR [STEP ...]      # steps: setup cft decode llamarec run sasrec
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh OUTDIR  # the same steps CPU-sized (checks the plumbing)
#
# Bounds (seconds, 570 in all, so one 10-minute command holds them): setup 60, cft 75,
# decode 45, llamarec 30, run 210, sasrec 150.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR [STEP ...]}; shift
mkdir -p "$out"
steps=${*:-setup cft decode llamarec run sasrec}
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
export PYTHONPATH=/tmp/site:$root PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export BENCHMARK_CACHE=${BENCHMARK_CACHE:-/tmp/bench-cache}
runs=${GPU_CHECK_RUNS:-/tmp/gpu-check-runs}
if [[ -n "${GPU_CHECK_DRY:-}" ]]; then
  dev=cpu; cft_args="--batch 2 --steps 1 --threads 2"; dec_args="--users 4 --batches 2 --naive-users 1 --beams 4 --k 5"
  lr_args="--users 4 --batches 2 --histories 10 --naive-users 1"
  run_args="--eval-users 8 --set cft.max_train_examples=16 --set sft.max_train_examples=16 --set cft.valid_users=4
            --set sft.valid_users=4 --set cft.num_beams=2 --set sft.num_beams=2 --set cft.max_new_tokens=12
            --set sft.max_new_tokens=12"
  sas_args="--set sasrec.max_train_seconds=5 --set sasrec.epochs=1 --eval-users 200"
else
  dev=cuda; cft_args="--batch 64 --steps 10"; dec_args="--users 256 --batches 32,64 --naive-users 8"
  lr_args="--users 943 --batches 64,128 --histories 20 --naive-users 8"
  # the reference recipe is ~4.5k optimizer steps per method (97k examples x 3 epochs): a named
  # smaller budget that fits, every departure printed and stored with the units
  run_args="--set cft.max_train_examples=8192 --set sft.max_train_examples=8192 --set cft.epochs=1
            --set sft.epochs=1 --set cft.valid_users=128 --set sft.valid_users=128
            --set cft.eval_batch_size=64 --set sft.eval_batch_size=64"
  sas_args="--set sasrec.max_train_seconds=90"
fi

step() {  # step NAME SECONDS COMMAND...: run bounded, log to OUTDIR/NAME.txt, record the outcome
  local name=$1 limit=$2; shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  local t0=$SECONDS
  [[ -n "${GPU_CHECK_DRY:-}" ]] && limit=$((limit * 6))  # a 2-core CPU runs the small steps slower
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0)) limit=$limit" | tee -a "$out/steps.txt"
}

setup() {
  nvidia-smi || true
  if [[ -z "${GPU_CHECK_DRY:-}" && ! -f /tmp/m/smol.gguf ]]; then
    cat /tmp/m/part00 .gpu-carry/b/part01 > /tmp/m/smol.gguf
    echo "$(cat .gpu-carry/b/sha256)  /tmp/m/smol.gguf" | sha256sum -c --quiet || return 1
  fi
  python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__,
peft.__version__, accelerate.__version__, torch.cuda.is_available())"
  python3 -c "from benchmark.llm.loading import load_llm; print(load_llm(None, device='cpu').name)"  # GGUF -> cache, once
}
[[ -z "${GPU_CHECK_DRY:-}" ]] && export BENCHMARK_LLM=/tmp/m/smol.gguf

step setup 60 bash -c "$(declare -f setup); setup"
# CFT/SFT step-time ratio at equal batch and MFU: LoRA eager, then CFT's recipe (full fine-tuning) compiled
step cft 75 bash -c "python3 bench/bench_cft.py --device $dev $cft_args --json $out/cft_lora.json &&
  python3 bench/bench_cft.py --device $dev $cft_args --full --compile --variants sft,cft --json $out/cft_full_compiled.json"
step decode 45 python3 bench/bench_decoding.py --device $dev $dec_args --impl ours
step llamarec 30 python3 bench/bench_llamarec.py --device $dev $lr_args
# one cft,sft run on every ML-100K test user; the run store is copied out as soon as it ends
step run 210 python3 -m benchmark --runs-dir "$runs" run --methods cft,sft --budget reference --device $dev --quiet \
  --run-id gpu-cft-sft $run_args
[[ " $steps " == *" run "* ]] && { tar czf "$out/runs-cft-sft.tgz" -C "$runs" gpu-cft-sft 2>/dev/null || true; }
# SASRec's ML-1M recipe (K&V), bounded by max_train_seconds so that it ends with a unit
step sasrec 150 python3 -m benchmark --runs-dir "$runs" run --methods sasrec --dataset ml-1m --device $dev --quiet \
  --run-id gpu-sasrec-ml1m $sas_args
[[ " $steps " == *" sasrec "* ]] && { tar czf "$out/runs-sasrec-ml1m.tgz" -C "$runs" gpu-sasrec-ml1m 2>/dev/null || true; }
cat "$out/steps.txt"
