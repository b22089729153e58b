#!/usr/bin/env python3
"""Writes the embedded default's small pre-tokenized dataset (inputs/data/).

Each example is a "prompt" of random tokens, a separator, then an "answer" that follows
simple rules a LoRA adapter can pick up quickly (a small answer alphabet, counting runs
seeded by the prompt), so the demo's loss falls visibly within a minute on 2 cores.
Labels are -100 on the prompt, as in SFT. Deterministic: same files every run.
"""
import argparse
import json
import os
import random

SEP, EOS = 3, 2
ANSWER_BASE, ANSWER_SIZE = 400, 24  # answers use tokens 400..423


def example(rng):
    prompt = [rng.randrange(10, 390) for _ in range(rng.randrange(8, 24))]
    start = prompt[0] % ANSWER_SIZE
    step = 1 + prompt[-1] % 3
    answer = [ANSWER_BASE + (start + i * step) % ANSWER_SIZE for i in range(rng.randrange(12, 32))]
    ids = [1] + prompt + [SEP] + answer + [EOS]
    n_prompt = 1 + len(prompt) + 1
    labels = [-100] * n_prompt + answer + [EOS]
    return {"input_ids": ids, "labels": labels}


def write(path, n, seed):
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(example(rng), separators=(",", ":")) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "inputs", "data"))
    a = ap.parse_args()
    write(os.path.join(a.out, "train", "demo_train.jsonl"), 512, 1234)
    write(os.path.join(a.out, "validation", "demo_validation.jsonl"), 64, 5678)
