#!/usr/bin/env python3
"""Writes the embedded default's small ShareGPT SFT set and a tiny tokenizer trained on it.

Everything here is synthetic and written for this project (no scraped data): short
multi-turn conversations whose answers follow from the question (sums, differences,
products, unit conversions, reversed words, letter counts, and capitals from a small table
below), so a LoRA adapter on a tiny model can learn them quickly.

Outputs (all deterministic; < 1 MB together):
  inputs/data/sharegpt/train/part-00.jsonl, part-01.jsonl   ShareGPT {"conversations": [...]}
  inputs/data/sharegpt/validation/part-00.jsonl
  inputs/tiny-tokenizer/tokenizer.json, tokenizer_config.json
      byte-level BPE, 512 ids (fits inputs/tiny-llama: <unk>=0 <s>=1 </s>=2 <pad>=3);
      add_special_tokens prepends <s> (post-processor and add_bos_token agree)
  tests/fixtures/tiny_tokenizer_golden.jsonl
      HF `tokenizers` ids for sample texts ({"text", "ids", "ids_special"}) plus one
      {"digest": ...} line: FNV-1a 64 over the little-endian int32 ids of every message
      value of every data file (sorted file order, no special tokens), so ftune's C++
      tokenizer can be checked on the whole dataset without storing all ids.

Needs `pip install tokenizers` (tested with 0.23). Usage: python3 tools/make_demo_sft.py
"""
import argparse
import json
import os
import random
import struct

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = 512

CAPITALS = [  # a small hand-written table
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Greece", "Athens"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("India", "New Delhi"), ("Australia", "Canberra"),
]
WORDS = [
    "apple", "river", "garden", "planet", "silver", "window", "candle", "forest", "pencil",
    "rocket", "tiger", "bridge", "orange", "castle", "meadow", "lantern", "harbor", "violin",
    "marble", "thunder", "pepper", "falcon", "ribbon", "island", "copper", "summer", "basket",
    "mirror", "engine", "jungle", "anchor", "puzzle", "saddle", "tunnel", "wizard", "yellow",
]
UNITS = [  # (question unit, answer unit, factor)
    ("meters", "kilometers", 1000), ("minutes", "hours", 60), ("grams", "kilograms", 1000),
    ("seconds", "minutes", 60), ("centimeters", "meters", 100), ("hours", "days", 24),
]
SYSTEMS = [
    "You are a careful assistant. Answer in one short sentence.",
    "You are a helpful tutor for arithmetic, units, words and geography.",
    "Answer the question exactly and briefly.",
]


def plural(n, unit):
    return unit[:-1] if n == 1 else unit


def task(rng):
    """One (question, answer) pair of a random kind."""
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randrange(0, 100), rng.randrange(0, 100)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a = rng.randrange(10, 100)
        b = rng.randrange(0, a + 1)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    if kind == 2:
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind == 3:
        small, big, factor = rng.choice(UNITS)
        n = rng.randrange(1, 10)
        return (f"How many {small} are in {n} {plural(n, big)}?",
                f"{n} {plural(n, big)} is {n * factor} {small}.")
    if kind == 4:
        w = rng.choice(WORDS)
        return f'Reverse the word "{w}".', f'The word "{w}" reversed is "{w[::-1]}".'
    if kind == 5:
        w = rng.choice(WORDS)
        return f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.'
    country, capital = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", f"The capital of {country} is {capital}."


def conversation(rng):
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"from": "system", "value": rng.choice(SYSTEMS)})
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        q, a = task(rng)
        msgs.append({"from": "human", "value": q})
        msgs.append({"from": "gpt", "value": a})
    return {"conversations": msgs}


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")


def train_tokenizer(corpus):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3], "special ids must be 0..3"
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return tok


def fnv1a64(data, h=0xcbf29ce484222325):
    for byte in data:
        h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=root, help="repository root to write into")
    args = ap.parse_args()

    rng = random.Random(20240607)
    train = [conversation(rng) for _ in range(480)]
    valid = [conversation(rng) for _ in range(48)]
    data_dir = os.path.join(args.root, "inputs", "data", "sharegpt")
    files = {
        os.path.join(data_dir, "train", "part-00.jsonl"): train[:240],
        os.path.join(data_dir, "train", "part-01.jsonl"): train[240:],
        os.path.join(data_dir, "validation", "part-00.jsonl"): valid,
    }
    for path, records in files.items():
        write_jsonl(path, records)

    values = [m["value"] for path in sorted(files) for r in files[path] for m in r["conversations"]]
    # Template fragments (vicuna, the default template) so they get merges of their own.
    vicuna_sys = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    corpus = values + [vicuna_sys + "</s>USER: " + v + " ASSISTANT:" for v in values[:200]]
    tok = train_tokenizer(corpus)

    tok_dir = os.path.join(args.root, "inputs", "tiny-tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    tok.save(os.path.join(tok_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    # Golden ids: a sample of texts (rendered prompts, special tokens, odd bytes) ...
    samples = values[:24] + [
        vicuna_sys + "</s>USER: What is 2 plus 3? ASSISTANT:",
        "<s>hello</s> world<pad><unk>", "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n",
        "Ünïcödé wörds, 中文, emoji 🙂 and ZWJ 👩‍💻", "", " ", "12345678901234567890",
        "<|im_start|>user\nhi<|im_end|>\n", "[INST] <<SYS>>\nsys\n<</SYS>>\n\nq [/INST]",
    ]
    golden = []
    for text in samples:
        golden.append({"text": text, "ids": tok.encode(text, add_special_tokens=False).ids,
                       "ids_special": tok.encode(text, add_special_tokens=True).ids})
    # ... and a digest over every message value of the whole dataset.
    h, tokens = 0xcbf29ce484222325, 0
    for v in values:
        ids = tok.encode(v, add_special_tokens=False).ids
        tokens += len(ids)
        h = fnv1a64(struct.pack(f"<{len(ids)}i", *ids), h)
    rel = [os.path.relpath(p, args.root) for p in sorted(files)]
    golden.append({"digest": {"files": rel, "texts": len(values), "tokens": tokens,
                              "fnv1a64": f"{h:016x}"}})
    write_jsonl(os.path.join(args.root, "tests", "fixtures", "tiny_tokenizer_golden.jsonl"), golden)
    print(f"wrote {len(train)} train / {len(valid)} validation conversations, "
          f"vocab {tok.get_vocab_size()}, {tokens} tokens in {len(values)} message values")


if __name__ == "__main__":
    main()
