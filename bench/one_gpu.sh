#!/usr/bin/env bash
# The one-GPU measurements of issues 13 and 14 in one device call (bench/RESULTS.md, "The compiler
# chooses how a step runs" and "LoRA fine-tuning on one H200"). Everything it writes goes to $OUT
# (default bench_out/), one JSON per run and its log beside it.
#
#   bench/one_gpu.sh [PROFILE] [PLAN_RUNS]        # PROFILE: h200 (default) or h100
#
# On the lent H200 (see bench/device_wheels.sh for the wheels it needs):
#   export PYTHONPATH=$(bash bench/device_wheels.sh --install); OUT=$OUT bash bench/one_gpu.sh h200 3
#
# 1. bench/packed_attention.py: document-masked attention kernel by kernel (a minute);
# 2. bench/lora_linear.py: the LoRA projection formulations, GPU kernel time (seconds), and
#    bench/expert_lora.py: the routed experts' adapters beside the frozen experts (a minute);
# 3. bench/finetune_step.py: LoRA rank 64 on the full DeepSeek-Coder-V2-Lite, the compiler's plan,
#    then the same with --compile layer (the plan's choice on the h200 profile is layer_cudagraphs:
#    the pair measures what CUDA graphs buy; two minutes each);
# 4. bench/train_step.py --variants plan, PLAN_RUNS times in separate processes (the run-to-run
#    spread of the 4-layer slice's plan, about 40 s each);
# 5. bench/train_step.py --variants plan_vs_hand, the table (base, plan, all options at micro-batch
#    8 / 16 / 32) with predictions (about 70 s; TABLE=0 skips it).
# About eight minutes in all on an H200 (2026-12-02: the runs other than the CUDA-graph one took 260 s
# and 275 s of two calls), so one 600 s device call holds it; PLAN_RUNS=1 or TABLE=0 leave more room.
set -uo pipefail
PROFILE=${1:-h200}
PLAN_RUNS=${2:-3}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
TRAIN=(python bench/train_step.py --device cuda --device_profile "$PROFILE" --mem_limit_gib 128 --global_batch_size 32
       --micro_batch_size 8 --steps 6 --warmup 3)
run() {  # run NAME COMMAND...: its output to $OUT/NAME.log, the last line shown
    local name=$1; shift
    "$@" > "$OUT/$name.log" 2>&1
    echo "$name (exit $?): $(tail -1 "$OUT/$name.log")"
}
run packed_attention python bench/packed_attention.py --json "$OUT/packed_attention.json"
run lora_linear python bench/lora_linear.py --json "$OUT/lora_linear.json"
run expert_lora python bench/expert_lora.py --json "$OUT/expert_lora.json"
run finetune_step python bench/finetune_step.py --device_profile "$PROFILE" --json "$OUT/finetune_step.json"
# the same plan with the compiled layers run without CUDA graphs (the h200 profile's
# graph_replay_launch_kept is fitted to this pair)
run finetune_step-layer python bench/finetune_step.py --device_profile "$PROFILE" \
    --compile layer --json "$OUT/finetune_step-layer.json"
for i in $(seq 1 "$PLAN_RUNS"); do
    run "train_step-plan-$i" "${TRAIN[@]}" --variants plan --json "$OUT/train_step-plan-$i.json"
done
if [[ "${TABLE:-1}" == 1 ]]; then
    run train_step-plan_vs_hand "${TRAIN[@]}" --variants plan_vs_hand --json "$OUT/train_step-plan_vs_hand.json"
fi
