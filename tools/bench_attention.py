#!/usr/bin/env python3
"""Time torch SDPA (causal, bf16) at the shapes test_cuda_attention times, on this GPU, and
write a markdown table next to ftune's own numbers so both come from one card.

    python3 tools/bench_attention.py [--ours test_cuda_attention.log] [--out FILE.md]

FLOPs (matmul only, causal): forward 4*B*H*S^2*d/2; fwd+bwd 3.5x that (backward does 5
products to forward's 2). --ours parses the test's 'ATTN_BENCH ... var=V ...' lines; the
default variant (var=0) goes into the table, all variants into a second one.
"""
import argparse
import re
import statistics

import torch
import torch.nn.functional as F

SHAPES = [(4, 32, 2048, 64), (4, 16, 2048, 128)]  # B, H, S, d


def median_ms(fn, warm=5, reps=20):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_sdpa(B, H, S, d, backend):
    # [B, S, H, d] viewed as [B, H, S, d]: the packed token-major layout ftune uses.
    mk = lambda: torch.randn(B, S, H, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q, k, v = (mk().requires_grad_() for _ in range(3))
    g = mk()
    ctx = (lambda: torch.nn.attention.sdpa_kernel([backend])) if backend else None

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, (q, k, v), g)

    def timed(fn):
        if ctx is None:
            return median_ms(fn)
        with ctx():
            return median_ms(fn)

    with torch.no_grad():
        tf = timed(fwd)
    tfb = timed(fwd_bwd)
    return tf, tfb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="test_cuda_attention output with ATTN_BENCH lines")
    ap.add_argument("--out", default="tools/results/attention_bench.md")
    args = ap.parse_args()

    from torch.nn.attention import SDPBackend

    card = torch.cuda.get_device_name(0)
    backends = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    ours = {}
    if args.ours:
        pat = re.compile(r"ATTN_BENCH B=(\d+) H=(\d+) S=(\d+) d=(\d+) var=(\d+) fwd_ms=(\S+) "
                         r"bwd_ms=(\S+) fwd_tflops=(\S+) bwd_tflops=(\S+) fwdbwd_tflops=(\S+)")
        seen = set()
        for line in open(args.ours, errors="replace"):
            m = pat.search(line)
            if m and m.group(0) not in seen:  # doctest MESSAGE and printf both echo it
                seen.add(m.group(0))
                key = tuple(int(x) for x in m.groups()[:5])
                ours[key] = [float(x) for x in m.groups()[5:]]

    rows, var_rows = [], []
    for B, H, S, d in SHAPES:
        flops = 4.0 * B * H * S * S * d / 2
        sd = {}
        for name, be in backends:
            try:
                tf, tfb = bench_sdpa(B, H, S, d, be)
                sd[name] = (flops / tf * 1e-9, 3.5 * flops / tfb * 1e-9)
            except Exception as e:  # a backend unavailable for this shape/card
                sd[name] = None
                print(f"sdpa {name} d={d}: {type(e).__name__}: {e}".splitlines()[0])
            print(f"sdpa {name:8s} B={B} H={H} S={S} d={d}: {sd[name]}", flush=True)
        o = ours.get((B, H, S, d, 0))
        base = sd.get("default")
        fmt = lambda x: f"{x:.0f}" if x is not None else "n/a"
        ratio = f"{o[4] / base[1]:.2f}x" if o and base else "n/a"
        rows.append(f"| {B}x{H}x{S}, d={d} | {fmt(o[2]) if o else 'n/a'} | "
                    f"{fmt(o[4]) if o else 'n/a'} | "
                    + " | ".join(f"{fmt(sd[n][0]) if sd[n] else 'n/a'} / "
                                 f"{fmt(sd[n][1]) if sd[n] else 'n/a'}" for n, _ in backends)
                    + f" | {ratio} |")
        for (b, h, s, dd, var), val in sorted(ours.items()):
            if (b, h, s, dd) == (B, H, S, d):
                var_rows.append(f"| d={d} | {var} | {val[0]:.3f} | {val[1]:.3f} | {val[2]:.0f} | "
                                f"{val[3]:.0f} | {val[4]:.0f} |")

    md = [f"# Causal attention, bf16, on {card}", "",
          f"torch {torch.__version__}; FLOPs: fwd 4·B·H·S²·d/2, fwd+bwd 3.5x fwd; TFLOP/s "
          "from CUDA events: SDPA median of 20 after 5 warm-ups, ftune median of 15 after 3 "
          "(test_cuda_attention). ftune = flash_attention_forward/backward (default tiles, "
          "packed [B*S, H*d] varlen layout); SDPA on [B,S,H,d].transpose(1,2).", "",
          "| shape (BxHxS) | ftune fwd | ftune fwd+bwd | SDPA default fwd / fwd+bwd | "
          "SDPA flash fwd / fwd+bwd | SDPA cuDNN fwd / fwd+bwd | ftune / SDPA default "
          "(fwd+bwd) |", "|---|---|---|---|---|---|---|", *rows]
    if var_rows:
        md += ["", "ftune tile variants (FTUNE_FA_FWD / FTUNE_FA_BWD = var):", "",
               "| d | var | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | fwd+bwd TFLOP/s |",
               "|---|---|---|---|---|---|---|", *var_rows]
    text = "\n".join(md) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
