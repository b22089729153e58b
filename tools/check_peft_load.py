#!/usr/bin/env python3
"""Loads an ftune output with the Python stack and checks it agrees with ftune.

  python3 tools/check_peft_load.py --model inputs/tiny-llama --adapter outputs/default/adapter \
      --data inputs/data/validation --metrics outputs/default/metrics.jsonl

transformers loads the model directory (written by `ftune init-model`), PEFT loads the adapter
with PeftModel.from_pretrained unchanged, and the mean token loss over the pre-tokenized data is
compared with the last eval_loss that ftune logged (fp32, same shift and -100 masking).
Needs torch, transformers and peft (run it on the GPU machine, CPU is enough).
"""
import argparse
import glob
import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def examples(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True)) if os.path.isdir(path) else [path]
    for f in files:
        for line in open(f):
            if line.strip():
                j = json.loads(line)
                if "input_ids" not in j:
                    sys.exit(f"{f}: this check needs pre-tokenized data")
                yield j["input_ids"], j.get("labels", j["input_ids"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--metrics", help="ftune metrics.jsonl: compare with its last eval_loss")
    ap.add_argument("--max_examples", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (ids, labels) in enumerate(examples(a.data)):
            if i >= a.max_examples:
                break
            x = torch.tensor([ids])
            y = torch.tensor([labels])
            logits = model(input_ids=x).logits[0, :-1]
            tgt = y[0, 1:]
            loss = torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((tgt != -100).sum())
    mean = total / count
    print(f"PEFT mean loss over {count} tokens: {mean:.6f}")
    if a.metrics:
        ftune_loss = None
        for line in open(a.metrics):
            j = json.loads(line)
            for k, v in j.items():
                if k.endswith("_loss") and k.startswith("eval"):
                    ftune_loss = v
        if ftune_loss is None:
            sys.exit("no eval loss in " + a.metrics)
        rel = abs(ftune_loss - mean) / abs(mean)
        print(f"ftune eval loss {ftune_loss:.6f}; relative difference {rel:.2e}")
        if rel > a.tolerance:
            sys.exit(f"MISMATCH: relative difference {rel:.2e} > {a.tolerance}")
    print("ok: PeftModel.from_pretrained loaded the ftune adapter")


if __name__ == "__main__":
    main()
