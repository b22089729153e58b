#!/usr/bin/env python3
"""torch.distributed (NCCL) all-reduce bandwidth, the reference for `ftune doctor`'s NCCL line.

Run under torchrun: `torchrun --nproc_per_node N tools/bench_allreduce_torch.py --mib 1024`.
Same definitions as nccl-tests and ftune doctor: algbw = bytes / time, busbw = algbw * 2(n-1)/n,
fp32 sum, median of --iters timed calls after --warmup. Rank 0 prints one JSON line.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    n = dist.get_world_size()
    x = torch.ones(a.mib * 2**20 // 4, dtype=torch.float32, device="cuda")
    times = []
    for i in range(a.warmup + a.iters):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    algbw = a.mib * 2**20 / t / 1e9
    if dist.get_rank() == 0:
        print(json.dumps({"impl": "torch.distributed", "ranks": n, "mib": a.mib,
                          "time_ms": round(t * 1e3, 3), "algbw_GBs": round(algbw, 1),
                          "busbw_GBs": round(algbw * 2 * (n - 1) / n, 1),
                          "gpu": torch.cuda.get_device_name(local), "torch": torch.__version__}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
