#!/usr/bin/env bash
# The multi-GPU session, start to end, on one machine of N GPUs (the figures of bench/RESULTS.md,
# "Several GPUs"; issue 15). Everything it writes goes to $OUT (default bench_out/).
#
#   bench/multi_gpu.sh N PROFILE [MEM_LIMIT_GIB] [STEPS] [EXTRA_TRAIN_FLAGS]
#
# 0. measure the collectives for groups of 2, 4 and 8 (up to N) into $OUT/profile.json
#    (bench/profile_device.py; copy its `collectives` into compiler/profiles/PROFILE.json by hand);
# 1. compile the plan for the full DeepSeek-Coder-V2-Lite (27 layers, seq 2048, global batch 64, the
#    compiler choosing micro-batch and execution) on 4 devices (all N if fewer) with PROFILE, for N runtime GPUs, and
#    its two runners-up (--plan_rank 2, 3);
# 2. run the plan for STEPS steps and the runners-up for 15 with torchrun on N GPUs (bench/plan_runs.py:
#    one JSON per run under $OUT/runs with device, gpus, tokens_per_s_per_gpu, mfu, step_time_s,
#    predicted_step_time_s, peak_memory_gib);
# 3. fine-tuning at full size on packed instruction rows: LoRA (rank 64 on every projection, the
#    experts included) and full-parameter SFT, each compiled with --document_masking on;
# 4. save a checkpoint of a 4-layer model of the same shape on N GPUs under its own 4-device plan,
#    merge it with merge_ckpt.py and load it with transformers.
set -uo pipefail
N=${1:?number of GPUs}
PROFILE=${2:?device profile (h100, h200)}
MEM=${3:-128}
STEPS=${4:-30}
EXTRA=${5:-}
OUT=${OUT:-bench_out}
MODEL=configs/deepseek-coder-v2-lite
P=$(( N < 4 ? N : 4 ))  # devices of one plan: 4, or all of a smaller machine (replicated to N)
mkdir -p "$OUT/plans"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

python bench/profile_device.py --procs "$N" --out "$OUT/profile.json" 2>&1 | tail -12

COMPILE=(python train.py --run_mode compile --model_id $MODEL --plan_ngpus "$P" --runtime_ngpus "$N" --seq_len 2048
         --micro_batch_size auto --global_batch_size 64 --device_profile "$PROFILE" --mem_limit_gib "$MEM")
for rank in 1 2 3; do
    "${COMPILE[@]}" --plan_rank $rank --plan_out "$OUT/plans/rank$rank.json" 2>&1 | tail -6
done

python bench/plan_runs.py --model_id $MODEL --steps "$STEPS" --warmup 5 --out "$OUT/runs" --timeout_s 420 \
    --extra "$EXTRA" --run "best=$OUT/plans/rank1.json@$N" \
    --run "second=$OUT/plans/rank2.json@$N:15" --run "third=$OUT/plans/rank3.json@$N:15"

# 3. fine-tuning at full size: packed instruction rows, LoRA and full-parameter SFT
"${COMPILE[@]}" --document_masking on --lora_rank 64 --lora_alpha 128 \
    --lora_targets attention,dense_mlp,shared_experts,experts --plan_out "$OUT/plans/lora.json" 2>&1 | tail -6
"${COMPILE[@]}" --document_masking on --plan_out "$OUT/plans/sft.json" 2>&1 | tail -6
python bench/plan_runs.py --model_id $MODEL --packed --steps 20 --warmup 5 --out "$OUT/finetune" --timeout_s 420 \
    --extra "$EXTRA" --run "lora=$OUT/plans/lora.json@$N" --run "sft=$OUT/plans/sft.json@$N"
rm -rf "$OUT"/finetune/sft_rows_*  # large; the runs' JSON say what happened

# 4. checkpoint -> merge -> transformers, on a 4-layer model of the same shape (the full model's
#    optimizer state would be ~190 GB of disk)
DATA=$(ls -d "$OUT"/runs/rows_*x2048 | head -1)  # the random rows plan_runs.py wrote
SMALL="$OUT/coder-4layers"
python - "$SMALL" <<'EOF'
import json, os, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
config = json.load(open("configs/deepseek-coder-v2-lite/config.json"))
config["num_hidden_layers"] = 4
json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=1)
EOF
python train.py --run_mode compile --model_id "$SMALL" --plan_ngpus "$P" --runtime_ngpus "$N" --seq_len 2048 \
    --micro_batch_size 2 --global_batch_size 16 --device_profile "$PROFILE" --mem_limit_gib "$MEM" \
    --plan_out "$OUT/plans/small.json" 2>&1 | tail -6
torchrun --nproc_per_node "$N" train.py --model_id "$SMALL" --dataset_path "$DATA" \
    --plan "$OUT/plans/small.json" --runtime_ngpus "$N" --device cuda --max_steps 3 --warmup_steps 1 \
    --save_dir "$OUT/small_run" 2>&1 | tail -4
python merge_ckpt.py --ckpt_dir "$OUT/small_run" --output_dir "$OUT/small_hf" --dtype bf16 2>&1 | tail -2
python - "$OUT/small_hf" "$DATA" <<'EOF'
import sys, json, torch, datasets
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, torch_dtype=torch.bfloat16).cuda()
rows = datasets.load_from_disk(sys.argv[2]).with_format("torch")[:2]["input_ids"].long().cuda()
with torch.no_grad():
    loss = model(input_ids=rows, labels=rows).loss
print(f"transformers loaded {type(model).__name__} from {sys.argv[1]}: loss on 2 rows {loss.item():.4f}")
EOF
rm -rf "$OUT/small_run" "$OUT/small_hf" "$DATA"  # large; the logs above say what happened
