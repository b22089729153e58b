#!/usr/bin/env bash
# Training throughput on one GPU: ftune (CUDA backend) against HF transformers + PEFT (eager),
# LoRA r8 all linear, bf16, seq 2048, batch 4, gradient checkpointing, random-init Llama of
# the 1B shape (hidden 2048, 16 layers, GQA 32/8, intermediate 8192, vocab 128256, tied).
# usage: tools/bench_train.sh FTUNE_BIN OUT_DIR   (needs a GPU, torch, transformers, peft)
# Prints a short table; writes the full numbers to OUT_DIR/bench_train.json.
set -uo pipefail
FTUNE=$1 OUT=$2
mkdir -p "$OUT"
W=$(mktemp -d)
"$FTUNE" init-model --output "$W/model" --hidden_size 2048 --num_hidden_layers 16 \
  --num_attention_heads 32 --num_key_value_heads 8 --intermediate_size 8192 --vocab_size 128256 \
  --tie_word_embeddings true --max_position_embeddings 4096 > /dev/null || exit 1
python3 - "$W/data.jsonl" <<'PY'
import json, random, sys
r = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        f.write(json.dumps({"input_ids": [r.randrange(128256) for _ in range(2048)]}) + "\n")
PY
"$FTUNE" train --model_name_or_path "$W/model" --train_file_dir "$W/data.jsonl" --output_dir "$W/out" \
  --device cuda --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_steps 10 \
  --gradient_checkpointing true --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \
  --learning_rate 2e-5 --logging_steps 1 --validation_split_percentage 0 --model_max_length 2048 \
  > "$OUT/ftune_train.log" 2>&1 || { tail -20 "$OUT/ftune_train.log"; exit 1; }
ftune_tok=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$W/out/metrics.jsonl') if '\"tokens_per_s\"' in l]
rows = rows[3:]  # warm-up
print(round(sum(r['tokens_per_s'] for r in rows) / len(rows), 1))")
hf=$(python3 "$(dirname "$0")/bench_train_hf.py" --batch 4 --seq 2048 --checkpointing 1 2>/dev/null | tail -1)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
python3 - "$OUT/bench_train.json" "$ftune_tok" "$hf" "$gpu" <<'PY'
import json, sys
path, ftune_tok, hf, gpu = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
res = {"gpu": gpu, "shape": "llama-1B (2048x16, GQA 32/8, inter 8192, vocab 128256, tied)",
       "batch": 4, "seq": 2048, "checkpointing": True, "ftune_tokens_per_s": ftune_tok, "hf_eager": hf,
       "ratio_vs_hf_eager": round(ftune_tok / hf["tokens_per_s"], 3)}
json.dump(res, open(path, "w"), indent=1)
print(f"| impl | tokens/s ({gpu}) |\n|---|---|\n| ftune (CUDA backend) | {ftune_tok:,.0f} |\n"
      f"| HF+PEFT eager | {hf['tokens_per_s']:,.0f} (peak {hf['peak_gib']} GiB) |\n| ratio | {res['ratio_vs_hf_eager']} |")
PY
rm -rf "$W"
