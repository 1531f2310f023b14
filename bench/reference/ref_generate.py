#!/usr/bin/env python3
"""Reference for `nanscope generate`: transformers' generate(do_sample=False), batch 1, on the CPU
or (DEVICE cuda) with the model on the GPU. argv: MODEL DTYPE PROMPT_TOKENS NEW_TOKENS [ATTN]
[DEVICE]. Prints JSON: load, prefill and decode seconds, new tokens per second (decode steps
only), the generated ids. On cuda every timer is read after torch.cuda.synchronize()."""
import json, os, sys, time
import torch, transformers

d, dt = sys.argv[1], {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
P, N = int(sys.argv[3]), int(sys.argv[4])
attn = sys.argv[5] if len(sys.argv) > 5 else "eager"
dev = sys.argv[6] if len(sys.argv) > 6 else "cpu"
torch.set_num_threads(int(os.environ.get("THREADS", "16")))
ids = torch.tensor([[(i * 37 + 11) % 1000 + 1 for i in range(P)]], device=dev)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
t0 = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt, device_map=dev, attn_implementation=attn)
sync()
t1 = time.perf_counter()
kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=0)
with torch.no_grad():
    m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)  # warm-up
    sync()
    t2 = time.perf_counter()
    m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync()
    t3 = time.perf_counter()
    out = m.generate(ids, max_new_tokens=N, min_new_tokens=N, **kw)
    sync()
    t4 = time.perf_counter()
prefill = t3 - t2
decode = (t4 - t3) - prefill
print(json.dumps({"tool": "transformers", "device": dev, "dtype": sys.argv[2], "attn": attn,
                  "load_seconds": t1 - t0,
                  "prefill_seconds": prefill, "total_seconds": t4 - t3,
                  "tokens_per_s": N / (t4 - t3), "decode_tokens_per_s": (N - 1) / decode,
                  "ids": out[0, P:].tolist()[:16]}))
