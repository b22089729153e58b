#!/usr/bin/env python3
"""ftune's CUDA backend against HF transformers + PEFT in bf16 on a Llama-3.2-1B-shaped model.

  tools/check_peft_bf16.py --ftune build/ftune --work DIR [--steps 10] [--batch 4] [--seq 1024]

Writes a random-init 1B-shaped model (ftune init-model, bf16), random token data, and PEFT's
own initial adapter (r8 alpha16, all linear, dropout 0: dropout masks cannot match across
frameworks); trains --steps steps with HF + PEFT (bf16 base, SDPA, AdamW lr 1e-3, clipping 1.0,
constant lr, no shuffling) and the same with ftune on the GPU, from the same initial adapter.
Prints both loss curves and the largest relative difference as one JSON line (target 1e-2).
"""
import argparse, json, os, random, subprocess, sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ftune", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    model_dir, init_dir = os.path.join(a.work, "model"), os.path.join(a.work, "init_adapter")
    data = os.path.join(a.work, "data.jsonl")
    subprocess.run([a.ftune, "init-model", "--output", model_dir, "--hidden_size", "2048",
                    "--num_hidden_layers", "16", "--num_attention_heads", "32", "--num_key_value_heads", "8",
                    "--intermediate_size", "8192", "--vocab_size", "128256", "--tie_word_embeddings", "true",
                    "--max_position_embeddings", "8192", "--rope_theta", "500000", "--dtype", "bfloat16",
                    "--fast_init", "true"], check=True, stdout=subprocess.DEVNULL)
    r = random.Random(0)
    rows = [[r.randrange(128256) for _ in range(a.seq)] for _ in range(a.steps * a.batch)]
    with open(data, "w") as f:
        for ids in rows:
            f.write(json.dumps({"input_ids": ids}) + "\n")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(init_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, eps=1e-8)
    hf = []
    for s in range(a.steps):
        ids = torch.tensor(rows[s * a.batch:(s + 1) * a.batch], device="cuda")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hf.append(loss.item())
    del model, opt
    torch.cuda.empty_cache()

    out = os.path.join(a.work, "ftune_out")
    subprocess.run([a.ftune, "train", "--model_name_or_path", model_dir, "--train_file_dir", data,
                    "--init_adapter", init_dir, "--output_dir", out, "--overwrite_output_dir", "true",
                    "--device", "cuda", "--per_device_train_batch_size", str(a.batch),
                    "--gradient_accumulation_steps", "1", "--max_steps", str(a.steps), "--shuffle", "false",
                    "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0",
                    "--learning_rate", str(a.lr), "--lr_scheduler_type", "constant", "--warmup_steps", "0",
                    "--max_grad_norm", "1.0", "--weight_decay", "0", "--logging_steps", "1",
                    "--validation_split_percentage", "0", "--model_max_length", str(a.seq)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ft = [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl")) if '"tokens_per_s"' in l]
    worst = max(abs(x - y) / abs(y) for x, y in zip(ft, hf))
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "steps": a.steps, "batch": a.batch, "seq": a.seq,
                      "lr": a.lr, "hf_peft_bf16": [round(x, 5) for x in hf], "ftune_cuda": [round(x, 5) for x in ft],
                      "max_rel_diff": worst, "within_1e-2": worst < 1e-2}))


if __name__ == "__main__":
    main()
