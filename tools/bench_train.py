#!/usr/bin/env python3
"""LoRA training throughput on one GPU: ftune (CUDA backend) against HF transformers + PEFT,
eager and under torch.compile. Random-init Llama shapes, LoRA r8 alpha 16 dropout 0.05 on all
linear layers, bf16, SDPA (HF), AdamW lr 2e-5, seq 2048, gradient accumulation 1, every token a
label (labels = input ids).

  tools/bench_train.py --ftune build/ftune --out DIR [--shapes 1b,8b] [--batches 1,4]
        [--checkpointing on,off] [--impls ftune,hf_eager,hf_compiled] [--steps 10 --warmup 3]
        [--gpu N] [--work DIR] [--timeout 900] [--peak_tflops 989] [--dry_run]
  tools/bench_train.py run ...             # only run the cases (same options)
  tools/bench_train.py report --out DIR    # only write the table from DIR/runs-*.json

Every case appends one JSON object to DIR/runs-TAG.json (--tag; several `run`s, one per GPU,
can share DIR, and a case run again replaces the older result); the table goes to stdout and
DIR/bench_train.md, everything (runs, commands, log tails, GPU, versions) to DIR/bench_train.json.
Logs: DIR/logs/. ftune: mean tokens_per_s of the metrics.jsonl steps after the warm-up ones,
max peak_gpu_mem_gib. HF: tools/bench_train_hf.py in its own process, peak =
torch.cuda.max_memory_allocated; compiled gets --compile_warmup more warm-up steps.
Power: nvidia-smi sampled every 250 ms during each case; the table gives the median board
power and SM clock over the busy samples (utilization >= 90%), and tokens per joule, because
at batch 4 the card runs at its power limit and trades clock for power.
"""
import argparse, datetime, functools, glob, json, os, random, shlex, shutil, subprocess, sys, tempfile, time

SHAPES = {  # Llama-3.2-1B and Llama-3-8B; "tiny" only to try the tool on a CPU (--device cpu)
    "1b": dict(hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, tied=True),
    "8b": dict(hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256, tied=False),
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=512, tied=True),
}
IMPLS = ("ftune", "hf_eager", "hf_compiled")
FORMULA = ("model FLOPs/token = 4*P + 6*L*seq*q_dim: P = weights of all matrix products (decoder "
           "linears + lm_head, not the embedding lookup), 2P forward + 2P input gradients (LoRA "
           "freezes the base, no weight gradients); causal attention 2*seq*q_dim per layer forward "
           "(QK^T and PV, half the square), x3 with the backward; recompute and LoRA's own "
           "products not counted")
HERE = os.path.dirname(os.path.abspath(__file__))


def flops_per_token(s, seq):
    h, L, hd = s["hidden"], s["layers"], s["hidden"] // s["heads"]
    qd, kvd = s["heads"] * hd, s["kv"] * hd
    p = L * (h * (qd + 2 * kvd) + qd * h + 3 * h * s["inter"]) + h * s["vocab"]
    return 4 * p + 6 * L * seq * qd


def sh(cmd, log, env=None, timeout=None):
    """Runs cmd with stdout+stderr into log; returns the exit code (124 on timeout)."""
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[bench_train] timed out after {timeout} s\n")
            return 124


def tail(path, n=20):
    try:
        return open(path, errors="replace").read().splitlines()[-n:]
    except OSError:
        return []


def failure(rc, log):
    lines = tail(log)
    oom = any("out of memory" in l.lower() or "outofmemory" in l.lower() for l in lines)
    return {"error": "OOM" if oom else "timeout" if rc == 124 else f"failed (rc {rc})", "log_tail": lines}


def out(cmd, env=None):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"


@functools.lru_cache(None)
def has_dtype_option(ftune):  # init-model --dtype/--fast_init are recent
    return "--dtype" in out([ftune, "init-model", "--help"])


class PowerSampler:
    """nvidia-smi power.draw / clocks.sm / utilization.gpu every 250 ms while a case runs."""
    QUERY = "power.draw,power.limit,clocks.sm,utilization.gpu"

    def __init__(self, gpu, env):
        self.gpu, self.env, self.proc, self.summary = gpu, env, None, None

    def __enter__(self):
        self.file = tempfile.TemporaryFile(mode="w+")
        cmd = ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits", "-lms", "250"]
        if self.gpu is not None:
            cmd += ["-i", str(self.gpu)]
        try:
            self.proc = subprocess.Popen(cmd, stdout=self.file, stderr=subprocess.DEVNULL, env=self.env)
        except OSError:  # no nvidia-smi: the case runs, its power columns stay empty
            self.proc = None
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.file.seek(0)
            self.summary = summarize_power(self.file.read().splitlines())
        self.file.close()


def summarize_power(lines):
    """Median power (W) and SM clock (MHz) over samples with the GPU >= 90% busy; None if none."""
    busy = []
    for l in lines:
        try:
            w, limit, mhz, util = (float(x) for x in l.split(",")[:4])
        except ValueError:
            continue
        if util >= 90:
            busy.append((w, mhz, limit))
    if not busy:
        return None
    med = lambda v: sorted(v)[len(v) // 2]
    return {"median_w": med([b[0] for b in busy]), "median_sm_mhz": med([b[1] for b in busy]),
            "limit_w": busy[0][2], "busy_samples": len(busy)}


def ftune_paths(work, shape, batch, ckpt):  # model, data, output dir
    return (os.path.join(work, "model_" + shape), os.path.join(work, f"data_{shape}.jsonl"),
            os.path.join(work, f"out_{shape}_b{batch}_ckpt-{ckpt}"))


def ftune_cmds(a, shape, batch, ckpt, work):
    s, (model, data, odir) = SHAPES[shape], ftune_paths(work, shape, batch, ckpt)
    init = [a.ftune, "init-model", "--output", model, "--hidden_size", str(s["hidden"]),
            "--num_hidden_layers", str(s["layers"]), "--num_attention_heads", str(s["heads"]),
            "--num_key_value_heads", str(s["kv"]), "--intermediate_size", str(s["inter"]),
            "--vocab_size", str(s["vocab"]), "--tie_word_embeddings", str(s["tied"]).lower(),
            "--max_position_embeddings", "8192", "--rope_theta", "500000"]
    if has_dtype_option(a.ftune):  # bf16 + parallel init when available
        init += ["--dtype", "bfloat16", "--fast_init", "true"]
    train = [a.ftune, "train", "--model_name_or_path", model, "--train_file_dir", data,
             "--output_dir", odir, "--overwrite_output_dir", "true",
             "--device", a.device, "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
             "--max_steps", str(a.warmup + a.steps), "--gradient_checkpointing", "true" if ckpt == "on" else "false",
             "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--learning_rate", "2e-5",
             "--logging_steps", "1", "--validation_split_percentage", "0", "--model_max_length", str(a.seq),
             "--save_steps", "0"] + shlex.split(a.extra_args)
    return init, train


def hf_cmd(a, shape, batch, ckpt, compiled):
    s = SHAPES[shape]
    return [sys.executable, os.path.join(HERE, "bench_train_hf.py"), "--hidden", str(s["hidden"]),
            "--layers", str(s["layers"]), "--heads", str(s["heads"]), "--kv_heads", str(s["kv"]),
            "--intermediate", str(s["inter"]), "--vocab", str(s["vocab"]), "--tied", str(int(s["tied"])),
            "--seq", str(a.seq), "--batch", str(batch), "--checkpointing", str(int(ckpt == "on")),
            "--compile", str(int(compiled)), "--steps", str(a.steps),
            "--warmup", str(a.warmup + (a.compile_warmup if compiled else 0))]


def run_ftune(a, shape, batch, ckpt, work, env, logs):
    init, cmd = ftune_cmds(a, shape, batch, ckpt, work)
    res = {"cmd": shlex.join(cmd), "init_cmd": shlex.join(init)}
    model, data, odir = ftune_paths(work, shape, batch, ckpt)
    if not os.path.exists(os.path.join(model, "config.json")):  # once per shape
        log = os.path.join(logs, f"init_{shape}.log")
        rc = sh(init, log, env, timeout=2 * a.timeout)
        if rc != 0:
            return dict(res, **failure(rc, log), stage="init-model")
    if not os.path.exists(data):
        r, vocab = random.Random(0), SHAPES[shape]["vocab"]
        with open(data, "w") as f:
            for _ in range(max(a.batch_list) * (a.warmup + a.steps) + 8):
                f.write(json.dumps({"input_ids": [r.randrange(vocab) for _ in range(a.seq)]}) + "\n")
    log = os.path.join(logs, f"ftune_{shape}_b{batch}_ckpt-{ckpt}.log")
    rc = sh(cmd, log, env, timeout=a.timeout)
    rows = []
    if os.path.exists(os.path.join(odir, "metrics.jsonl")):
        rows = [json.loads(l) for l in open(os.path.join(odir, "metrics.jsonl")) if '"tokens_per_s"' in l]
    timed = [r for i, r in enumerate(rows) if r.get("step", i + 1) > a.warmup]
    if rc != 0 or not timed:
        return dict(res, **failure(rc, log), steps_logged=rows)
    peaks = [r["peak_gpu_mem_gib"] for r in rows if r.get("peak_gpu_mem_gib") is not None]
    return dict(res, tokens_per_s=sum(r["tokens_per_s"] for r in timed) / len(timed),
                peak_gib=max(peaks) if peaks else None, steps_logged=rows)


def run_hf(a, shape, batch, ckpt, compiled, env, logs):
    cmd = hf_cmd(a, shape, batch, ckpt, compiled)
    log = os.path.join(logs, f"hf_{'compiled' if compiled else 'eager'}_{shape}_b{batch}_ckpt-{ckpt}.log")
    rc = sh(cmd, log, env, timeout=a.timeout)
    for line in reversed(tail(log, 200)):
        if line.startswith("{"):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "error" in r:
                return {"cmd": shlex.join(cmd), "error": r["error"], "hf": r, "log_tail": tail(log)}
            return {"cmd": shlex.join(cmd), "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"], "hf": r}
    return dict({"cmd": shlex.join(cmd)}, **failure(rc, log))


def cmd_run(a):
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    if a.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(a.gpu)
    a.batch_list = [int(b) for b in a.batches.split(",")]
    cases = [(sh_, b, c, i) for sh_ in a.shapes.split(",") for b in a.batch_list
             for c in a.checkpointing.split(",") for i in a.impls.split(",")]
    for sh_, b, c, i in cases:
        if sh_ not in SHAPES or c not in ("on", "off") or i not in IMPLS:
            sys.exit(f"bad case {sh_}/{c}/{i}: shapes {','.join(SHAPES)}, checkpointing on|off, impls {','.join(IMPLS)}")
    if a.dry_run:
        work = a.work or "$WORK"
        print(f"# NCCL_NVLS_ENABLE={env['NCCL_NVLS_ENABLE']} CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}")
        for shape in dict.fromkeys(s for s, *_ in cases):
            print(f"# {shape}: {flops_per_token(SHAPES[shape], a.seq) / 1e9:.2f} GFLOP/token\n" +
                  shlex.join(ftune_cmds(a, shape, 1, "on", work)[0]))
        for shape, batch, ckpt, impl in cases:
            print(shlex.join(ftune_cmds(a, shape, batch, ckpt, work)[1] if impl == "ftune"
                             else hf_cmd(a, shape, batch, ckpt, impl == "hf_compiled")))
        return
    work = a.work or tempfile.mkdtemp(prefix="ftune_bench_")
    logs = os.path.join(a.out, "logs")
    os.makedirs(logs, exist_ok=True)
    q = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    gpu = out(q + (["-i", str(a.gpu)] if a.gpu is not None else []), env).splitlines()[:1] or ["unknown"]
    versions = {"ftune": out([a.ftune, "--version"]), "python": sys.version.split()[0],
                "hf": out([sys.executable, "-c", "import json, torch, transformers, peft; print(json.dumps({"
                           "'torch': torch.__version__, 'cuda': torch.version.cuda, "
                           "'transformers': transformers.__version__, 'peft': peft.__version__}))"], env)}
    try:
        versions.update(json.loads(versions.pop("hf")))
    except ValueError:
        versions["torch"] = versions["transformers"] = versions["peft"] = "not importable"
    path = os.path.join(a.out, f"runs-{a.tag}.json")
    try:
        for n, (shape, batch, ckpt, impl) in enumerate(cases):
            t0 = time.time()
            with PowerSampler(a.gpu, env) as power:
                r = (run_ftune(a, shape, batch, ckpt, work, env, logs) if impl == "ftune"
                     else run_hf(a, shape, batch, ckpt, impl == "hf_compiled", env, logs))
            r = dict(impl=impl, power=power.summary, shape=shape, batch=batch, checkpointing=ckpt, seq=a.seq, steps=a.steps,
                     warmup=a.warmup, gpu=gpu[0].split(",")[0].strip(), gpu_info=gpu[0], versions=versions,
                     date=datetime.datetime.now().isoformat(timespec="seconds"),
                     wall_s=round(time.time() - t0, 1), **r)
            got = (f"{r['tokens_per_s']:,.0f} tok/s, peak {fmt(r['peak_gib'], '.1f')} GiB" if "tokens_per_s" in r
                   else r["error"])
            print(f"[{n + 1}/{len(cases)}] {shape} b{batch} ckpt {ckpt} {impl}: {got} ({r['wall_s']} s)",
                  file=sys.stderr, flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(r) + "\n")
            if not a.work and (n + 1 == len(cases) or cases[n + 1][0] != shape):  # free the disk
                shutil.rmtree(os.path.join(work, "model_" + shape), ignore_errors=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def fmt(x, f):
    return "-" if x is None else format(x, f)


def cmd_report(a):
    runs = {}
    for p in sorted(glob.glob(os.path.join(a.out, "runs-*.json"))):
        for l in open(p):
            if l.strip():
                r = json.loads(l)
                runs[(r["shape"], r["batch"], r["checkpointing"], r["impl"])] = r  # the latest wins
    if not runs:
        sys.exit(f"no runs in {a.out}/runs-*.json")
    fpt = {}
    for r in runs.values():
        fpt[r["shape"]] = r["flops_per_token"] = flops_per_token(SHAPES[r["shape"]], r["seq"])
        tps = r.get("tokens_per_s")
        r["mfu"] = tps * r["flops_per_token"] / (a.peak_tflops * 1e12) if tps else None
    rows = list(runs.values())
    gpus = sorted({r["gpu"] for r in rows})
    lines = [f"GPU: {', '.join(gpus)}; {min(r['date'] for r in rows)[:10]}; seq {rows[0]['seq']}; "
             f"MFU = tokens/s x model FLOPs per token / {a.peak_tflops:g} TFLOP/s", "",
             "| shape | batch | checkpointing | impl | tokens/s | peak GiB | MFU % | ftune / HF eager | ftune / HF compiled | W | SM MHz | tokens/J |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (list(fpt).index(r["shape"]), r["batch"], r["checkpointing"] == "off",
                                         IMPLS.index(r["impl"]))):
        ratios = ["", ""]
        base = (r["shape"], r["batch"], r["checkpointing"])
        if r["impl"] == "ftune" and r.get("tokens_per_s"):
            for j, other in enumerate(("hf_eager", "hf_compiled")):
                o = runs.get(base + (other,), {}).get("tokens_per_s")
                ratios[j] = f"{r['tokens_per_s'] / o:.2f}x" if o else ""
        val = (f"{r['tokens_per_s']:,.0f} | {fmt(r['peak_gib'], '.1f')} | {100 * r['mfu']:.1f}"
               if r.get("tokens_per_s") else f"{r['error']} | | ")
        pw = r.get("power") or {}
        power = (f"{pw['median_w']:.0f} | {pw['median_sm_mhz']:.0f} | {r['tokens_per_s'] / pw['median_w']:.1f}"
                 if pw and r.get("tokens_per_s") else " | | ")
        lines.append(f"| {r['shape']} | {r['batch']} | {r['checkpointing']} | {r['impl']} | {val} | {' | '.join(ratios)} | {power} |")
    lines += ["", "Model FLOPs per token: " + ", ".join(f"{s} {v / 1e9:.2f} G ({v:,})" for s, v in fpt.items()),
              "", FORMULA + "."]
    text = "\n".join(lines)
    print(text)
    open(os.path.join(a.out, "bench_train.md"), "w").write(text + "\n")
    vers = list({json.dumps(r.get("versions"), sort_keys=True): r.get("versions") for r in rows}.values())
    doc = {"gpu": sorted({r.get("gpu_info", r["gpu"]) for r in rows}), "date": max(r["date"] for r in rows),
           "versions": vers[0] if len(vers) == 1 else vers, "peak_tflops": a.peak_tflops,
           "flop_formula": FORMULA, "flops_per_token": fpt, "runs": rows}
    json.dump(doc, open(os.path.join(a.out, "bench_train.json"), "w"), indent=1)


def parse(argv):
    mode = argv.pop(0) if argv and argv[0] in ("run", "report") else "all"
    ap = argparse.ArgumentParser(prog="bench_train.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=not ("--dry_run" in argv or "-h" in argv or "--help" in argv),
                    help="results directory")
    ap.add_argument("--ftune", default="build/ftune")
    ap.add_argument("--shapes", default="1b,8b", help=f"of {','.join(SHAPES)}")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--checkpointing", "--ckpt", default="on,off")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--compile_warmup", type=int, default=3, help="extra warm-up steps for hf_compiled")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--gpu", type=int, help="CUDA_VISIBLE_DEVICES for the runs")
    ap.add_argument("--device", default="cuda", help="ftune --device (cpu: only to try the tool)")
    ap.add_argument("--tag", default="0", help="runs go to OUT/runs-TAG.json")
    ap.add_argument("--extra_args", default="", help="more `ftune train` arguments, e.g. \"--selective_recompute true\"")
    ap.add_argument("--work", help="scratch dir for models and data (kept; default: a temp dir, deleted)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run (init-model: twice)")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    a = ap.parse_args(argv)
    a.mode = mode
    return a


def main():
    a = parse(sys.argv[1:])
    if a.mode in ("run", "all"):
        cmd_run(a)
    if a.mode in ("report", "all") and not a.dry_run:
        cmd_report(a)


if __name__ == "__main__":
    main()
