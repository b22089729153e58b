#!/usr/bin/env python3
"""LoRA training throughput on one GPU: ftune (CUDA backend) against HF transformers + PEFT,
eager and under torch.compile. Random-init Llama shapes, LoRA r8 alpha 16 dropout 0.05 on all
linear layers, bf16, AdamW lr 2e-5, seq 2048, gradient accumulation 1, every token a label.

  tools/bench_train.py run --ftune build/ftune --out DIR [--shapes 8b,1b] [--batches 4,1]
        [--ckpt on,off] [--impls ftune,hf_eager,hf_compiled] [--gpu 0] [--tag NAME]
  tools/bench_train.py report --out DIR      # merges DIR/runs-*.json into the table

`run` appends one JSON object per case to DIR/runs-TAG.json (several `run`s, one per GPU, can
share DIR); `report` prints a markdown table and writes DIR/bench_train.{json,md}.

MFU uses model FLOPs per token (recompute not counted): LoRA freezes the base weights, so
training costs 2P (forward) + 2P (input gradients) = 4P, P = parameters of every matrix
product (decoder linears + lm_head), plus causal attention 3 x 2 x seq x q_dim per layer
(forward 2 x seq x q_dim, backward twice that). Peak: 989 TFLOP/s dense bf16 (H100/H200 SXM).
"""
import argparse, glob, json, os, random, subprocess, sys, tempfile, time

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied
    "1b": dict(hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, tied=True),
    "8b": dict(hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256, tied=False),
}
PEAK = 989e12


def flops_per_token(s, seq):
    h, i, L, v = s["hidden"], s["inter"], s["layers"], s["vocab"]
    hd = h // s["heads"]
    qd, kvd = s["heads"] * hd, s["kv"] * hd
    p = L * (h * (qd + 2 * kvd) + qd * h + 3 * h * i) + h * v
    return 4 * p + 3 * L * 2 * seq * qd


def sh(cmd, log, env=None, timeout=900):
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def tail(path, n=15):
    try:
        return open(path).read().splitlines()[-n:]
    except OSError:
        return []


def run_ftune(a, shape, s, batch, ckpt, work, env):
    model = os.path.join(work, "model_" + shape)
    if not os.path.exists(os.path.join(model, "config.json")):
        cmd = [a.ftune, "init-model", "--output", model, "--hidden_size", str(s["hidden"]),
               "--num_hidden_layers", str(s["layers"]), "--num_attention_heads", str(s["heads"]),
               "--num_key_value_heads", str(s["kv"]), "--intermediate_size", str(s["inter"]),
               "--vocab_size", str(s["vocab"]), "--tie_word_embeddings", str(s["tied"]).lower(),
               "--max_position_embeddings", "8192", "--rope_theta", "500000"]
        if "--dtype" in subprocess.run([a.ftune, "init-model", "--help"], capture_output=True, text=True).stdout:
            cmd += ["--dtype", "bfloat16", "--fast_init", "true"]
        if sh(cmd, os.path.join(a.out, f"init_{shape}.log")) != 0:
            return {"error": "init-model failed"}
    data = os.path.join(work, "data.jsonl")
    if not os.path.exists(data):
        r = random.Random(0)
        with open(data, "w") as f:
            for _ in range(4 * (a.warmup + a.steps) + 8):
                f.write(json.dumps({"input_ids": [r.randrange(s["vocab"]) for _ in range(a.seq)]}) + "\n")
    out = os.path.join(work, f"out_{shape}_{batch}_{ckpt}")
    log = os.path.join(a.out, f"ftune_{shape}_b{batch}_{ckpt}.log")
    cmd = [a.ftune, "train", "--model_name_or_path", model, "--train_file_dir", data, "--output_dir", out,
           "--overwrite_output_dir", "true", "--device", "cuda", "--per_device_train_batch_size", str(batch),
           "--gradient_accumulation_steps", "1", "--max_steps", str(a.warmup + a.steps),
           "--gradient_checkpointing", "true" if ckpt == "on" else "false", "--lora_rank", "8",
           "--lora_alpha", "16", "--lora_dropout", "0.05", "--learning_rate", "2e-5", "--logging_steps", "1",
           "--validation_split_percentage", "0", "--model_max_length", str(a.seq), "--save_steps", "0"]
    rc = sh(cmd, log, env)
    rows = []
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"tokens_per_s"' in l]
    if rc != 0 or len(rows) <= a.warmup:
        text = "\n".join(tail(log))
        return {"error": "OOM" if "out of memory" in text.lower() else f"failed (rc {rc})", "log_tail": tail(log)}
    rows = rows[a.warmup:]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
            "peak_gib": max(r.get("peak_gpu_mem_gib", -1) for r in rows), "cmd": " ".join(cmd)}


def run_hf(a, shape, s, batch, ckpt, compiled, env):
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "bench_train_hf.py"), "--hidden", str(s["hidden"]),
           "--layers", str(s["layers"]), "--heads", str(s["heads"]), "--kv_heads", str(s["kv"]),
           "--intermediate", str(s["inter"]), "--vocab", str(s["vocab"]), "--tied", str(int(s["tied"])),
           "--seq", str(a.seq), "--batch", str(batch), "--checkpointing", str(int(ckpt == "on")),
           "--compile", str(int(compiled)), "--steps", str(a.steps),
           "--warmup", str(a.warmup + (3 if compiled else 0))]
    log = os.path.join(a.out, f"hf_{'compiled' if compiled else 'eager'}_{shape}_b{batch}_{ckpt}.log")
    rc = sh(cmd, log, env, timeout=a.hf_timeout)
    for line in reversed(tail(log, 50)):
        if line.startswith("{"):
            r = json.loads(line)
            if "error" in r:
                return {"error": r["error"]}
            return {"tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"], "cmd": " ".join(cmd)}
    text = "\n".join(tail(log))
    return {"error": "OOM" if "out of memory" in text.lower() else ("timeout" if rc == 124 else f"failed (rc {rc})"),
            "log_tail": tail(log)}


def cmd_run(a):
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    if a.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(a.gpu)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(a.gpu or 0)],
                         capture_output=True, text=True).stdout.strip()
    work = a.work or tempfile.mkdtemp(prefix="ftune_bench_")
    path = os.path.join(a.out, f"runs-{a.tag}.json")
    for shape in a.shapes.split(","):
        s = SHAPES[shape]
        for batch in [int(b) for b in a.batches.split(",")]:
            for ckpt in a.ckpt.split(","):
                for impl in a.impls.split(","):
                    t0 = time.time()
                    if impl == "ftune":
                        r = run_ftune(a, shape, s, batch, ckpt, work, env)
                    else:
                        r = run_hf(a, shape, s, batch, ckpt, impl == "hf_compiled", env)
                    r.update(impl=impl, shape=shape, batch=batch, checkpointing=ckpt, seq=a.seq, gpu=gpu,
                             wall_s=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d"))
                    print(json.dumps({k: v for k, v in r.items() if k not in ("cmd", "log_tail")}), flush=True)
                    with open(path, "a") as f:
                        f.write(json.dumps(r) + "\n")


def cmd_report(a):
    runs = [json.loads(l) for p in sorted(glob.glob(os.path.join(a.out, "runs-*.json"))) for l in open(p)]
    key = lambda r: (r["shape"], r["batch"], r["checkpointing"])
    by = {(key(r), r["impl"]): r for r in runs}
    gpus = sorted({r["gpu"] for r in runs})
    lines = [f"GPU: {', '.join(gpus)}; seq {runs[0]['seq'] if runs else '-'}; MFU = tokens/s x model FLOPs per token / 989 TFLOP/s",
             "", "| shape | batch | ckpt | impl | tokens/s | peak GiB | MFU | ftune / HF eager | ftune / HF compiled |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for k in sorted({key(r) for r in runs}, key=lambda k: (k[0] != "8b", -k[1], k[2])):
        fpt = flops_per_token(SHAPES[k[0]], runs[0]["seq"])
        ft = by.get((k, "ftune"), {}).get("tokens_per_s")
        for impl in ("ftune", "hf_eager", "hf_compiled"):
            r = by.get((k, impl))
            if not r:
                continue
            tps = r.get("tokens_per_s")
            ratio = lambda other: (f"{ft / by[(k, other)]['tokens_per_s']:.2f}x"
                                   if impl == "ftune" and ft and by.get((k, other), {}).get("tokens_per_s") else "")
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {impl} | " +
                         (f"{tps:,.0f} | {r['peak_gib']:.1f} | {100 * tps * fpt / PEAK:.1f}%" if tps else f"{r['error']} | | ") +
                         f" | {ratio('hf_eager')} | {ratio('hf_compiled')} |")
    lines += ["", "Model FLOPs per token: " + ", ".join(f"{s} {flops_per_token(SHAPES[s], runs[0]['seq']) / 1e9:.2f} G"
                                                    for s in sorted({r['shape'] for r in runs}))]
    text = "\n".join(lines)
    print(text)
    open(os.path.join(a.out, "bench_train.md"), "w").write(text + "\n")
    json.dump(runs, open(os.path.join(a.out, "bench_train.json"), "w"), indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--ftune", default="build/ftune")
    r.add_argument("--out", required=True)
    r.add_argument("--shapes", default="8b,1b")
    r.add_argument("--batches", default="4,1")
    r.add_argument("--ckpt", default="on,off")
    r.add_argument("--impls", default="ftune,hf_eager,hf_compiled")
    r.add_argument("--gpu", type=int)
    r.add_argument("--tag", default="0")
    r.add_argument("--work", help="scratch dir for models and data (default: a new temp dir)")
    r.add_argument("--seq", type=int, default=2048)
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--hf_timeout", type=int, default=900)
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    a = ap.parse_args()
    cmd_run(a) if a.cmd == "run" else cmd_report(a)


if __name__ == "__main__":
    main()
