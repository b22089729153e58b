#!/usr/bin/env python3
"""The largest model that trains: ftune LoRA (r8 alpha 16 dropout 0.05, all linear layers, bf16
activations, AdamW, seq 2048, batch 1, gradient checkpointing on) on one GPU, per model shape x
weight mode (bf16, int8 = load_in_8bit, nf4 = load_in_4bit, full = use_peft false; "+offload" adds
offload_param = cpu, "+zero3" zero_stage = 3);
a case is shape:mode[:batch[:ranks]]; ranks > 1 runs `mpirun -np ranks` on this host's GPUs
(one per rank; tokens/s in the table is per GPU, peak is rank 0's). Models are random-on-load
directories (`ftune init-model --weights on_load`): a 70B model is 140 GB in bf16, more than the
GPU machine's disk, so ftune makes the weights (the counter-based fast init) while loading.

  tools/bench_big_models.py --ftune build/ftune --out DIR [--cases 8b:bf16,70b:nf4,8b:bf16+offload:4,70b:bf16+zero3:1:2,...]
        [--steps 4 --warmup 1] [--work DIR] [--timeout 500]

Prints a table, writes DIR/big_models.md and DIR/big_models.json (commands, logs' tails, every
step's metrics). tokens/s: mean over the steps after the warm-up ones; peak: ftune's
peak_gpu_mem_gib (all device memory it allocated); setup: metrics' elapsed_s at step 1 less
that step's own time (weights made, quantised and copied; data loaded).
"""
import argparse, json, os, random, shlex, shutil, subprocess, sys, time

SHAPES = {  # Llama-3-8B, Llama-3-70B (and tiny, to try the tool on a CPU)
    "1b": dict(hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, tied=True),
    "8b": dict(hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256, tied=False),
    "70b": dict(hidden=8192, layers=80, heads=64, kv=8, inter=28672, vocab=128256, tied=False),
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=512, tied=True),
}
MODES = {"bf16": [], "int8": ["--load_in_8bit", "true"], "nf4": ["--load_in_4bit", "true"]}
MODES["full"] = ["--use_peft", "false"]  # full fine-tuning: every weight trains (fp32 masters)
# Suffixes: "+offload" = offload_param "cpu" (projections in pinned host memory); "+zero3" =
# zero_stage 3 (each rank keeps 1/N of every layer, gathered just in time; on one GPU this
# measures the streaming path's cost); "+offload_opt" = offload_optimizer "cpu". E.g.
# "int8+zero3+offload", "full+offload_opt".
SUFFIXES = {"offload": ["--offload_param", "cpu"], "zero3": ["--zero_stage", "3"],
            "offload_opt": ["--offload_optimizer", "cpu"]}  # masters + AdamW state in host memory


def mode_args(mode):
    base, *extra = mode.split("+")
    if base not in MODES or any(e not in SUFFIXES for e in extra):
        raise SystemExit(f"unknown mode {mode!r}: {'/'.join(MODES)} with +{'/+'.join(SUFFIXES)}")
    return MODES[base] + [x for e in extra for x in SUFFIXES[e]]
SEQ = 2048


def params(s):
    h, L, hd = s["hidden"], s["layers"], s["hidden"] // s["heads"]
    lin = L * (h * (s["heads"] + 2 * s["kv"]) * hd + s["heads"] * hd * h + 3 * h * s["inter"])
    return lin + h * s["vocab"] * (1 if s["tied"] else 2) + L * 2 * h + h


def flops_per_token(s):  # as tools/bench_train.py: 4P + 6 L seq q_dim
    h, L, hd = s["hidden"], s["layers"], s["hidden"] // s["heads"]
    p = L * (h * (s["heads"] + 2 * s["kv"]) * hd + s["heads"] * hd * h + 3 * h * s["inter"]) + h * s["vocab"]
    return 4 * p + 6 * L * SEQ * s["heads"] * hd


def run_case(a, shape, mode, batch, ranks=1):
    s = SHAPES[shape]
    model, data = os.path.join(a.work, "onload_" + shape), os.path.join(a.work, f"data_{shape}_big.jsonl")
    tag = f"{shape}_{mode.replace('+', '_')}_b{batch}" + (f"_n{ranks}" if ranks > 1 else "") + \
        (f"_gas{a.gas}" if a.gas > 1 else "")
    odir, log = os.path.join(a.work, "big_" + tag), os.path.join(a.out, f"big_{tag}.log")
    if not os.path.exists(os.path.join(model, "config.json")):
        init = [a.ftune, "init-model", "--output", model, "--weights", "on_load",
                "--hidden_size", str(s["hidden"]), "--num_hidden_layers", str(s["layers"]),
                "--num_attention_heads", str(s["heads"]), "--num_key_value_heads", str(s["kv"]),
                "--intermediate_size", str(s["inter"]), "--vocab_size", str(s["vocab"]),
                "--tie_word_embeddings", str(s["tied"]).lower(), "--max_position_embeddings", "8192",
                "--rope_theta", "500000"]
        subprocess.run(init, check=True, stdout=subprocess.DEVNULL)
    if not os.path.exists(data):
        r = random.Random(0)
        with open(data, "w") as f:
            for _ in range(8 * (a.warmup + a.steps + 4)):
                f.write(json.dumps({"input_ids": [r.randrange(s["vocab"]) for _ in range(SEQ)]}) + "\n")
    cmd = [a.ftune, "train", "--model_name_or_path", model, "--train_file_dir", data, "--output_dir", odir,
           "--overwrite_output_dir", "true", "--device", a.device, "--per_device_train_batch_size", str(batch),
           "--gradient_accumulation_steps", str(a.gas), "--max_steps", str(a.warmup + a.steps),
           "--gradient_checkpointing", "true", "--lora_rank", "8", "--lora_alpha", "16",
           "--lora_dropout", "0.05", "--learning_rate", "2e-5", "--logging_steps", "1",
           "--validation_split_percentage", "0", "--model_max_length", str(SEQ), "--save_steps", "0",
           # Only the final model/adapter: an 8B full fine-tuning's optimizer state (96 GB) would
           # not fit the GPU machine's disk, and the bench deletes the outputs anyway.
           "--save_only_model", "true"] + mode_args(mode)
    if ranks > 1:  # one process per GPU; NVLink multicast off (see the device notes)
        cmd = ["mpirun", "-np", str(ranks), "--allow-run-as-root", "--bind-to", "none",
               "-x", "NCCL_NVLS_ENABLE=0"] + cmd
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.time() - t0
    lines = open(log, errors="replace").read().splitlines()
    res = dict(shape=shape, mode=mode, batch=batch, ranks=ranks, params=params(s), cmd=shlex.join(cmd), rc=rc, wall_s=wall,
               log_tail=lines[-15:])
    mfile = os.path.join(odir, "metrics.jsonl")
    rows = [json.loads(l) for l in open(mfile) if '"tokens_per_s"' in l] if rc == 0 and os.path.exists(mfile) else []
    timed = [r for r in rows if r["step"] > a.warmup]
    # Only metrics.jsonl is kept: a full fine-tuning case writes the whole model (5 GB at 1B,
    # 32 GB at 8B), and the next cases need the disk.
    if os.path.isdir(odir):
        for name in os.listdir(odir):
            if name != "metrics.jsonl":
                p = os.path.join(odir, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    if not timed:
        oom = any("out of memory" in l.lower() for l in lines[-30:])
        last = next((l for l in reversed(lines) if "error" in l.lower()), lines[-1] if lines else "")
        return dict(res, error="OOM" if oom else "timeout" if rc == 124 else f"failed (rc {rc}): {last[:200]}")
    tps = sum(r["tokens_per_s"] for r in timed) / len(timed) / ranks  # per GPU
    peaks = [r["peak_gpu_mem_gib"] for r in rows if r.get("peak_gpu_mem_gib") is not None]
    return dict(res, tokens_per_s=tps, peak_gib=max(peaks) if peaks else None, steps=rows,
                setup_s=rows[0]["elapsed_s"] - rows[0]["tokens"] / rows[0]["tokens_per_s"], mfu=tps * flops_per_token(s) / (a.peak_tflops * 1e12),
                final_loss=rows[-1]["loss"])


def table(results, gpu, gas=1):
    out = [f"GPU: {gpu}; LoRA r8 all linear, seq {SEQ}, checkpointing on, gradient accumulation {gas}; "
           f"tokens/s and peak per GPU; "
           f"MFU = tokens/s x (4P + 6 L seq q_dim) / peak", "",
           "| shape | params | weights | GPUs | batch | tokens/s | peak GiB | MFU | setup s | status |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['params'] / 1e9:.1f}B | {r['mode']} | {r.get('ranks', 1)} | {r['batch']} |  |  |  |  | {r['error']} |")
        else:
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
            out.append(f"| {r['shape']} | {r['params'] / 1e9:.1f}B | {r['mode']} | {r.get('ranks', 1)} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                       f"{peak} | {100 * r['mfu']:.1f}% | {r['setup_s']:.0f} | trains |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ftune", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/ftune_big")
    ap.add_argument("--cases", default="8b:bf16,8b:int8,8b:nf4,70b:nf4,70b:int8,70b:bf16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--gas", type=int, default=1, help="gradient_accumulation_steps of every case")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=500)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100/H200 SXM)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        gpu = "none (CPU)"
    results = []
    for case in a.cases.split(","):
        shape, mode, *rest = case.split(":")
        results.append(run_case(a, shape, mode, int(rest[0]) if rest else 1, int(rest[1]) if len(rest) > 1 else 1))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("steps", "log_tail", "cmd")}), flush=True)
        json.dump(dict(gpu=gpu, results=results), open(os.path.join(a.out, "big_models.json"), "w"), indent=1)
    md = table(results, gpu, a.gas)
    open(os.path.join(a.out, "big_models.md"), "w").write(md + "\n")
    print(md)


if __name__ == "__main__":
    sys.exit(main())
