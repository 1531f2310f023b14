#!/usr/bin/env python3
"""Reference for `bench_hidden`: transformers on CPU extracting every hidden state
(output_hidden_states=True) of random-id prompts, batched.
argv: MODEL [PROMPTS=64] [TOKENS=128] [DTYPE=bf16] [BATCH=PROMPTS] [ATTN=eager] [DEVICE=cpu]
[MAX_GPU]. On cuda the states are copied to the host as float32 (what users keep), and one
prompt runs first, untimed (CUDA's and cuBLAS's start-up), as bench_hidden does. MAX_GPU (e.g.
4GiB): the weights beyond it offloaded to the CPU as users of transformers do it (accelerate's
device_map="auto" with max_memory), against `--gpu-memory`.
Prints one JSON line: tokens/s, peak RSS."""
import json, os, resource, sys, time
import torch, transformers

d = sys.argv[1]
prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 64
tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
dname = sys.argv[4] if len(sys.argv) > 4 else "bf16"
batch = int(sys.argv[5]) if len(sys.argv) > 5 else prompts
attn = sys.argv[6] if len(sys.argv) > 6 else "eager"
dev = sys.argv[7] if len(sys.argv) > 7 else "cpu"
max_gpu = sys.argv[8] if len(sys.argv) > 8 else None
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dname]
torch.set_num_threads(int(os.environ.get("THREADS", str(os.cpu_count()))))
t0 = time.perf_counter()
where = dict(device_map="auto", max_memory={0: max_gpu, "cpu": "200GiB"}) if max_gpu else \
    dict(device_map=dev)
m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt, attn_implementation=attn, **where)
m.eval()
t1 = time.perf_counter()
g = torch.Generator().manual_seed(1234)
ids = torch.randint(0, m.config.vocab_size, (prompts, tokens), generator=g).to(dev)
checksum = 0.0
if dev == "cuda":
    with torch.no_grad():
        m(input_ids=ids[:1], output_hidden_states=True, use_cache=False)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
with torch.no_grad():
    for b in range(0, prompts, batch):
        o = m(input_ids=ids[b:b + batch], output_hidden_states=True, use_cache=False)
        states = [h.float().cpu() for h in o.hidden_states]  # what users keep
        checksum += float(states[-1][0, 0, 0])
t2 = time.perf_counter()
print(json.dumps({"tool": "transformers", "model": d, "prompts": prompts, "tokens": tokens,
                  "batch": batch, "dtype": dname, "attention": attn, "device": dev,
                  "load_seconds": t1 - t0, "seconds": t2 - t1,
                  "tokens_per_s": prompts * tokens / (t2 - t1),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "max_gpu": max_gpu, "gpu_peak_allocated_gib":
                      torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "checksum": checksum}))
