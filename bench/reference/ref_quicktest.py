#!/usr/bin/env python3
"""Reference for `nanscope trace`: the quick test of the NaN report (load on CPU, one forward
with output_hidden_states). argv: MODEL DTYPE [ATTN] [IDS] [DEVICE=cpu]. Prints JSON: seconds, peak RSS."""
import json, resource, sys, time
import torch, transformers

d, dt = sys.argv[1], {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
attn = sys.argv[3] if len(sys.argv) > 3 else "eager"
ids = [int(x) for x in sys.argv[4].split(",")] if len(sys.argv) > 4 else [9707, 11, 1879, 0]
dev = sys.argv[5] if len(sys.argv) > 5 else "cpu"
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "16")))
t0 = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt, device_map=dev,
                                                      attn_implementation=attn)
t1 = time.perf_counter()
with torch.no_grad():
    o = m(torch.tensor([ids], device=dev), output_hidden_states=True)
t2 = time.perf_counter()
states = [{"finite": bool(torch.isfinite(h).all()), "abs_max": float(h.float().abs().max())}
          for h in o.hidden_states]
print(json.dumps({"tool": "transformers", "dtype": sys.argv[2], "attn": attn, "device": dev, "seconds": t2 - t0,
                  "load_seconds": t1 - t0, "forward_seconds": t2 - t1,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "states": len(states), "all_finite": all(s["finite"] for s in states)}))
