#!/usr/bin/env python3
"""Reference for bench/bench_gemm: torch's bf16 linear (its bundled oneDNN, AMX where present)
at the shapes of a Qwen3-4B decoder, one JSON line per case with GFLOP/s."""
import torch, time, json
torch.manual_seed(0)
for (name,K,N) in [("q_proj",2560,4096),("gate_proj",2560,9728),("down_proj",9728,2560)]:
    w = (torch.randn(N,K)*0.02).bfloat16()
    for M in [128,1024,4096]:
        x = torch.randn(M,K).bfloat16()
        torch.nn.functional.linear(x,w)
        best=1e9
        for r in range(3):
            t=time.perf_counter(); torch.nn.functional.linear(x,w); best=min(best,time.perf_counter()-t)
        print(json.dumps(dict(torch=1,shape=name,M=M,s=best,gflops=2*M*N*K/best/1e9)),flush=True)
