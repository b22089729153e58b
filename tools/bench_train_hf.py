#!/usr/bin/env python3
"""HF transformers + PEFT LoRA training throughput, the baseline for tools/bench_train.py.

Random-init Llama of the given shape (--tied 0 for untied embeddings), bf16, SDPA, LoRA r8
alpha 16 dropout 0.05 on all linear layers, AdamW lr 2e-5, labels = input ids, optional
gradient checkpointing (non-reentrant) and torch.compile(model) (--compile 1: give it more
--warmup, it compiles in the first steps). Prints one JSON line with tokens_per_s (timed steps
only), peak_gib (torch.cuda.max_memory_allocated over all steps, weights included) and the
per-step times, or {"error": "OOM", ...} when it does not fit. Needs torch, transformers, peft
and a GPU.
"""
import argparse
import json
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpointing", type=int, default=1)
    ap.add_argument("--compile", type=int, default=0)
    ap.add_argument("--tied", type=int, default=1)
    a = ap.parse_args()
    try:
        run(a)
    except Exception as e:  # torch.cuda.OutOfMemoryError, or one wrapped by the compiler
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        print(json.dumps({"impl": "hf+peft" + (" compiled" if a.compile else " eager"), "error": "OOM",
                          "detail": str(e).splitlines()[0][:300] if str(e) else type(e).__name__,
                          "batch": a.batch, "seq": a.seq, "checkpointing": a.checkpointing}), flush=True)


def run(a):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate,
                      vocab_size=a.vocab, max_position_embeddings=max(a.seq, 2048),
                      tie_word_embeddings=bool(a.tied), rope_theta=500000.0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    # Built on the GPU in bf16 (an 8B model initialised on the CPU in fp32 takes minutes).
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16)
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    model.train()
    step_fn = model
    if a.compile:
        step_fn = torch.compile(model)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for s in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if s == 0:
            first = time.perf_counter() - t0  # includes compilation for --compile 1
        if s >= a.warmup:
            times.append(time.perf_counter() - t0)
    tok_s = a.batch * a.seq * len(times) / sum(times)
    print(json.dumps({"impl": "hf+peft" + (" compiled" if a.compile else " eager"),
                      "gpu": torch.cuda.get_device_name(0), "tokens_per_s": round(tok_s, 1),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "batch": a.batch, "seq": a.seq, "checkpointing": a.checkpointing,
                      "warmup": a.warmup, "steps": a.steps, "step_s": [round(t, 4) for t in times],
                      "first_step_s": round(first, 2), "loss": round(loss.item(), 4),
                      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "peft": peft.__version__}}), flush=True)


if __name__ == "__main__":
    main()
