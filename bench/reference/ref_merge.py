#!/usr/bin/env python3
"""Reference for `nanscope merge`: the merge script of the NaN report (bf16 on CPU, PeftModel,
merge_and_unload, save_pretrained). argv: BASE ADAPTER OUT. Prints JSON: seconds, peak RSS."""
import json, resource, sys, time
import torch, transformers, peft

base, adapter, out = sys.argv[1:4]
t0 = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map="cpu")
m = peft.PeftModel.from_pretrained(m, adapter)
m = m.merge_and_unload()
m.save_pretrained(out)
dt = time.perf_counter() - t0
print(json.dumps({"tool": "peft merge_and_unload", "seconds": dt,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
