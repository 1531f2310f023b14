#!/usr/bin/env python3
"""Reference for `bench_hidden ... @LENGTHS ... last,mean`: transformers extracting the
last-token and mean states of every layer of prompts of varied lengths, as users write it:
batches of BATCH prompts padded on the right (attention_mask), output_hidden_states=True, each
state pooled on the GPU (last = h[i, len_i - 1], mean = masked fp32 sum / len_i) and copied to
the host as float32.
argv: MODEL LENGTHS_FILE (one length per line) [DTYPE=bf16] [BATCH=32] [ATTN=sdpa] [ORDER=unsorted|sorted].
One batch runs first, untimed (CUDA's and cuBLAS's start-up). Prints one JSON line."""
import json, sys, time
import torch, transformers

d, lf = sys.argv[1], sys.argv[2]
dname = sys.argv[3] if len(sys.argv) > 3 else "bf16"
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 32
attn = sys.argv[5] if len(sys.argv) > 5 else "sdpa"
order = sys.argv[6] if len(sys.argv) > 6 else "unsorted"
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dname]
lengths = [int(x) for x in open(lf).read().split()]
t0 = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt, device_map="cuda",
                                                      attn_implementation=attn)
m.eval()
V = m.config.vocab_size
g = torch.Generator().manual_seed(1234)
prompts = [torch.randint(0, V, (n,), generator=g) for n in lengths]
idx = list(range(len(prompts)))
if order == "sorted":
    idx.sort(key=lambda i: lengths[i])


def run(sel):
    n = max(lengths[i] for i in sel)
    ids = torch.zeros((len(sel), n), dtype=torch.long)
    mask = torch.zeros((len(sel), n), dtype=torch.long)
    for r, i in enumerate(sel):
        ids[r, :lengths[i]] = prompts[i]
        mask[r, :lengths[i]] = 1
    ids, mask = ids.cuda(), mask.cuda()
    o = m(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    last_at = mask.sum(1) - 1
    mf = mask.unsqueeze(-1).float()
    rows = torch.arange(len(sel), device="cuda")
    out = []
    for h in o.hidden_states:
        hf = h.float()
        out.append((hf[rows, last_at].cpu(), ((hf * mf).sum(1) / mf.sum(1)).cpu()))
    return out


with torch.no_grad():
    run(idx[:batch])
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    checksum = 0.0
    for b in range(0, len(idx), batch):
        states = run(idx[b:b + batch])
        checksum += float(states[-1][0][0, 0])
    torch.cuda.synchronize()
    t2 = time.perf_counter()
tokens = sum(lengths)
print(json.dumps({"tool": "transformers", "model": d, "prompts": len(lengths), "tokens": tokens,
                  "padded_tokens": sum(max(lengths[i] for i in idx[b:b + batch]) * len(idx[b:b + batch])
                                       for b in range(0, len(idx), batch)),
                  "batch": batch, "dtype": dname, "attention": attn, "order": order,
                  "load_seconds": t1 - t0, "seconds": t2 - t1, "tokens_per_s": tokens / (t2 - t1),
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "checksum": checksum}))
