#!/usr/bin/env python3
"""The decode floor's denominator: how fast this machine's CPUs read memory, as torch's
multi-threaded sum over an 8 GiB tensor does (best of 5). Prints JSON: GB/s."""
import json, os, time
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "16")))
x = torch.ones(2**31, dtype=torch.float32)
x.sum()
best = min((lambda: (lambda t0: (x.sum(), time.perf_counter() - t0)[1])(time.perf_counter()))() for _ in range(5))
print(json.dumps({"label": "mem_read", "bytes": x.numel() * 4, "seconds": best, "gb_per_s": x.numel() * 4 / best / 1e9}))
