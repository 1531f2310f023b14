#!/usr/bin/env python3
"""Reference for `nanscope generate`: transformers' CPU generate(do_sample=False), batch 1.
argv: MODEL DTYPE PROMPT_TOKENS NEW_TOKENS [ATTN]. Prints JSON: load, prefill and decode seconds,
new tokens per second (decode steps only), the generated ids."""
import json, os, sys, time
import torch, transformers

d, dt = sys.argv[1], {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
P, N = int(sys.argv[3]), int(sys.argv[4])
attn = sys.argv[5] if len(sys.argv) > 5 else "eager"
torch.set_num_threads(int(os.environ.get("THREADS", "16")))
ids = torch.tensor([[(i * 37 + 11) % 1000 + 1 for i in range(P)]])
t0 = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt, device_map="cpu", attn_implementation=attn)
t1 = time.perf_counter()
kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=0)
with torch.no_grad():
    m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)  # warm-up
    t2 = time.perf_counter()
    m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    t3 = time.perf_counter()
    out = m.generate(ids, max_new_tokens=N, min_new_tokens=N, **kw)
    t4 = time.perf_counter()
prefill = t3 - t2
decode = (t4 - t3) - prefill
print(json.dumps({"tool": "transformers", "dtype": sys.argv[2], "attn": attn, "load_seconds": t1 - t0,
                  "prefill_seconds": prefill, "total_seconds": t4 - t3,
                  "tokens_per_s": N / (t4 - t3), "decode_tokens_per_s": (N - 1) / decode,
                  "ids": out[0, P:].tolist()[:16]}))
