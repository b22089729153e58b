#!/usr/bin/env python3
"""Tokenizer speed: ftune's C++ tokenizer vs Hugging Face `tokenizers`, in MB/s of text.

Both encode the same texts without special tokens, in one batch call, single-threaded and
with all cores; best of --iters runs, each with a freshly loaded tokenizer (cold caches).
Two datasets: `corpus` is the shared conformance corpus (mostly random Unicode: a worst
case for word caches) repeated to --min-mb MB; `python_stdlib` is English/code text, the
first --min-mb MB of this Python's standard library sources in 4 KB pieces.
ftune runs through the `bench_tokenizer` driver (tools/bench_tokenizer.cpp), HF through
`Tokenizer.encode_batch` with RAYON_NUM_THREADS set. Token totals are compared as a sanity
check. Prints a table and writes tools/results/tokenizer_bench.{json,md}.

  python3 tools/bench_tokenizer.py [--bench-bin build/bench_tokenizer] [--shared ../shared]
"""
import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter so that RAYON_NUM_THREADS takes effect.
HF_SNIPPET = r"""
import json, sys, time
from tokenizers import Tokenizer
path, corpus, min_mb, iters = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
texts = [json.loads(l)["text"] for l in open(corpus, encoding="utf-8") if l.strip()]
corpus_bytes = sum(len(t.encode("utf-8")) for t in texts)
batch, nbytes = [], 0
while nbytes < min_mb * 1e6:
    batch += texts
    nbytes += corpus_bytes
best, tokens = 1e30, 0
for _ in range(iters):
    tok = Tokenizer.from_file(path)  # fresh per run: cold caches, as for ftune
    start = time.perf_counter()
    out = tok.encode_batch(batch, add_special_tokens=False)
    best = min(best, time.perf_counter() - start)
    tokens = sum(len(e.ids) for e in out)
print(json.dumps({"seconds": best, "mb_per_s": nbytes / 1e6 / best, "tokens": tokens,
                  "bytes": nbytes}))
"""


def hf_version():
    try:
        import tokenizers  # noqa: F401
        return tokenizers.__version__
    except ImportError:
        return None


def find_bench_bin(explicit):
    if explicit:
        return explicit
    for pattern in ("build/bench_tokenizer", "build*/bench_tokenizer", "build*/tools/bench_tokenizer"):
        hits = sorted(glob.glob(os.path.join(ROOT, pattern)))
        if hits:
            return hits[0]
    sys.exit("bench_tokenizer binary not found: build it (target bench_tokenizer) or pass "
             "--bench-bin PATH")


def run_ftune(bench_bin, tok_dir, corpus, min_mb, threads, iters):
    cmd = [bench_bin, "--tokenizer", tok_dir, "--input", corpus, "--min_mb", str(min_mb),
           "--threads", ",".join(map(str, threads)), "--iters", str(iters)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def run_hf(tok_json, corpus, min_mb, threads, iters):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", HF_SNIPPET, tok_json, corpus, str(min_mb),
                          str(iters)], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)


def write_stdlib_corpus(path, min_mb):
    """JSONL of 4 KB pieces of the standard library's .py files (sorted, deterministic)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    total = 0
    with open(path, "w", encoding="utf-8") as out:
        for name in files:
            if "site-packages" in name:
                continue
            try:
                with open(name, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            for i in range(0, len(text), 4096):
                piece = text[i:i + 4096]
                out.write(json.dumps({"text": piece}) + "\n")
                total += len(piece.encode("utf-8"))
            if total >= min_mb * 1e6:
                return total
    return total


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--bench-bin", default=None)
    ap.add_argument("--vocabs", default="qwen3,llama2")
    ap.add_argument("--datasets", default="corpus,python_stdlib")
    ap.add_argument("--min-mb", type=float, default=8.0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", default=None, help="comma list (default: 1,all cores)")
    ap.add_argument("--out", default=os.path.join(ROOT, "tools", "results", "tokenizer_bench"))
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    tok_root = os.path.join(os.path.abspath(args.shared), "data", "tokenizers")
    corpus = os.path.join(tok_root, "corpus.jsonl")
    if not os.path.exists(corpus):
        sys.exit(f"corpus not found: {corpus} (pass --shared DIR)")
    bench_bin = find_bench_bin(args.bench_bin)
    version = hf_version()
    if version is None:
        print("NOTE: Hugging Face `tokenizers` is not installed for this python3 "
              "(pip install tokenizers); reporting ftune numbers only.")

    tmp = tempfile.TemporaryDirectory()
    datasets = {}
    for name in args.datasets.split(","):
        if name == "corpus":
            datasets[name] = corpus
        elif name == "python_stdlib":
            datasets[name] = os.path.join(tmp.name, "python_stdlib.jsonl")
            write_stdlib_corpus(datasets[name], args.min_mb)
        else:
            sys.exit(f"unknown dataset {name}")

    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": cores, "loadavg_at_start": os.getloadavg()},
        "hf_tokenizers_version": version,
        "min_mb": args.min_mb, "iters": args.iters, "threads": threads,
        "method": "texts repeated to at least min_mb MB; one batch call per run, no special "
                  "tokens; best of iters, each run with a freshly loaded tokenizer (cold "
                  "caches); MB = 1e6 bytes of UTF-8 input",
        "runs": [],
    }
    rows = []
    for dataset, path in datasets.items():
        for vocab in args.vocabs.split(","):
            tok_dir = os.path.join(tok_root, vocab)
            ours = run_ftune(bench_bin, tok_dir, path, args.min_mb, threads, args.iters)
            for run in ours["runs"]:
                n = run["threads"]
                hf = run_hf(os.path.join(tok_dir, "tokenizer.json"), path, args.min_mb, n,
                            args.iters) if version else None
                if hf and hf["tokens"] != run["tokens"]:
                    print(f"WARNING: {dataset}/{vocab}: token totals differ "
                          f"(ftune {run['tokens']}, HF {hf['tokens']})")
                results["runs"].append({"dataset": dataset, "vocab": vocab, "threads": n,
                                        "bytes": ours["bytes"], "ftune": run, "hf": hf,
                                        "ftune_load_seconds": ours["load_seconds"]})
                rows.append((dataset, vocab, n, run["mb_per_s"], hf["mb_per_s"] if hf else None))
                print(f"  {dataset} {vocab} threads={n}: ftune {run['mb_per_s']:.1f} MB/s, "
                      f"HF {hf['mb_per_s']:.1f} MB/s" if hf else "", flush=True)

    header = "| dataset | vocab | threads | ftune MB/s | HF tokenizers MB/s | speedup |"
    lines = [header, "|---|---|---:|---:|---:|---:|"]
    for dataset, vocab, n, ours, hf in rows:
        hf_s = f"{hf:.1f}" if hf else "n/a"
        speed = f"{ours / hf:.1f}x" if hf else "n/a"
        lines.append(f"| {dataset} | {vocab} | {n} | {ours:.1f} | {hf_s} | {speed} |")
    table = "\n".join(lines)
    print(table)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write("# Tokenizer speed: ftune vs Hugging Face tokenizers\n\n")
        f.write(f"{results['date']}, {results['machine']['cpu']}, {cores} cores "
                f"(load average at start {results['machine']['loadavg_at_start'][0]:.2f}); "
                f"HF tokenizers {version or 'not installed'}.\n\n")
        f.write(results["method"] + ".\n\n" + table + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
