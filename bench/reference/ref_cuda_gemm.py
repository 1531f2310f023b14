"""Reference for bench/cuda/bench_cuda_gemm: torch's F.linear on the GPU (bf16) on the same
inputs, time (median of 10, CUDA events) and a hash of the output bits.
Usage: ref_cuda_gemm.py [N=8192]"""
import json, sys
import torch

N = int(sys.argv[1]) if len(sys.argv) > 1 else 8192


def pattern(n, scale, salt):
    i = torch.arange(n, dtype=torch.int64)
    v = ((i * 7919 + salt) % 1001 - 500).to(torch.float32) / 500.0 * scale
    return v.to(torch.bfloat16)


def bits_hash(t):
    """sum_i bits_i * (i % 65521 + 1) mod 2^64, as bench_cuda_gemm computes it."""
    import numpy as np
    b = t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16).astype(np.uint64).ravel()
    k = (np.arange(b.size, dtype=np.uint64) % np.uint64(65521)) + np.uint64(1)
    return "%016x" % int((b * k).sum(dtype=np.uint64))


for M, K in [(9728, 2560), (4096, 2560), (1024, 2560), (2560, 9728), (2560, 4096)]:
    w = pattern(M * K, 0.02, 1).view(M, K).cuda()
    x = pattern(N * K, 1.0, 2).view(N, K).cuda()
    for _ in range(3):
        y = torch.nn.functional.linear(x, w)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(10):
        s.record(); y = torch.nn.functional.linear(x, w); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    print(json.dumps({"M": M, "N": N, "K": K, "variant": "torch F.linear", "ms": ts[5],
                      "tflops": 2 * M * N * K / (ts[5] * 1e-3) / 1e12, "hash": bits_hash(y)}))
