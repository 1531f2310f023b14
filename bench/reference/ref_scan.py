#!/usr/bin/env python3
"""Reference for `nanscope scan`: the safetensors library + torch, checking NaN/inf and the fp16
range tensor by tensor (what people write today). Prints JSON: seconds, peak RSS."""
import json, os, resource, sys, time
import torch
from safetensors import safe_open

d = sys.argv[1]
t0 = time.perf_counter()
files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
bad = big = n = 0
for f in files:
    with safe_open(os.path.join(d, f), framework="pt") as s:
        for k in s.keys():
            x = s.get_tensor(k)
            if x.is_floating_point():
                bad += int((~torch.isfinite(x)).sum())
                big += int((x.float().abs() > 65504).sum()) if x.dtype != torch.float16 else 0
            n += 1
dt = time.perf_counter() - t0
print(json.dumps({"tool": "safetensors+torch", "seconds": dt, "tensors": n, "nonfinite": bad,
                  "fp16_range": big,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
