// The decoder's products on the GPU, called as forward_cuda.cpp calls them (cublasGemmEx, bf16
// in and out, fp32 compute) with and without a workspace of our own, and through cuBLASLt's
// heuristic: time (median of 10) and a hash of the output bits per variant, so that
// bench/reference/ref_cuda_gemm.py (torch's F.linear on the same inputs) says which one torch's
// numbers are. Usage: bench_cuda_gemm [N=8192]; bench_cuda_gemm sweep N...: the joined q/k/v and
// gate/up shapes and o/down at each N (hidden's batches), cublasGemmEx against every algorithm
// cuBLASLt's heuristic offers (up to 16), each timed with its hash: whether a tuned choice would
// be faster and whether it keeps GemmEx's bits.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CK(x)                                                                   \
  do {                                                                          \
    auto e_ = (x);                                                              \
    if (int(e_) != 0) {                                                         \
      std::fprintf(stderr, "%s:%d %s = %d\n", __FILE__, __LINE__, #x, int(e_)); \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

// The inputs both sides build: v_i = ((i * 7919) % 1001 - 500) / 500 * scale, in bf16.
std::vector<__nv_bfloat16> pattern(size_t n, float scale, size_t salt) {
  std::vector<__nv_bfloat16> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = __float2bfloat16_rn(float(int64_t((i * 7919 + salt) % 1001) - 500) / 500.0f * scale);
  return v;
}

// sum_i bits_i * (i % 65521 + 1) mod 2^64: cheap on both sides (numpy in the reference).
uint64_t bits_hash(const std::vector<uint16_t>& v) {
  uint64_t h = 0;
  for (size_t i = 0; i < v.size(); ++i) h += uint64_t(v[i]) * uint64_t(i % 65521 + 1);
  return h;
}

// Median of 10 of run() after 3 warm-ups, in ms.
template <typename Fn>
float median_ms(Fn&& run, cudaEvent_t e0, cudaEvent_t e1) {
  for (int i = 0; i < 3; ++i) run();
  std::vector<float> ts;
  for (int i = 0; i < 10; ++i) {
    CK(cudaEventRecord(e0));
    run();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  return ts[5];
}

int sweep(int argc, char** argv) {
  const int shapes[][2] = {{6144, 2560}, {19456, 2560}, {2560, 4096}, {2560, 9728}};
  cublasHandle_t h;
  CK(cublasCreate(&h));
  cublasLtHandle_t lt;
  CK(cublasLtCreate(&lt));
  const size_t ws_bytes = size_t(32) << 20;
  void* ws = nullptr;
  CK(cudaMalloc(&ws, ws_bytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const float one = 1.0f, zero = 0.0f;
  for (int a = 2; a < argc; ++a) {
    const int N = std::atoi(argv[a]);
    for (const auto& s : shapes) {
      const int M = s[0], K = s[1];
      const auto w = pattern(size_t(M) * K, 0.02f, 1), x = pattern(size_t(N) * K, 1.0f, 2);
      void *dw, *dx, *dc;
      CK(cudaMalloc(&dw, w.size() * 2));
      CK(cudaMalloc(&dx, x.size() * 2));
      CK(cudaMalloc(&dc, size_t(M) * N * 2));
      CK(cudaMemcpy(dw, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
      std::vector<uint16_t> out(size_t(M) * N);
      const auto hash = [&] {
        CK(cudaMemcpy(out.data(), dc, out.size() * 2, cudaMemcpyDeviceToHost));
        return bits_hash(out);
      };
      const float gm = median_ms(
          [&] {
            CK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, &one, dw, CUDA_R_16BF, K, dx,
                            CUDA_R_16BF, K, &zero, dc, CUDA_R_16BF, M, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
          },
          e0, e1);
      const uint64_t gh = hash();
      cublasLtMatmulDesc_t op;
      cublasLtMatrixLayout_t la, lb, lc;
      CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
      CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
      CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, M, K));
      CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, N, K));
      CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, M, N, M));
      cublasLtMatmulPreference_t pref;
      CK(cublasLtMatmulPreferenceCreate(&pref));
      CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                              &ws_bytes, sizeof(ws_bytes)));
      cublasLtMatmulHeuristicResult_t heur[16] = {};
      int found = 0;
      CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 16, heur, &found));
      std::printf(
          "{\"M\": %d, \"N\": %d, \"K\": %d, \"gemmex_ms\": %.4f, \"gemmex_tflops\": %.1f, "
          "\"algos\": [",
          M, N, K, gm, 2.0 * M * N * K / (gm * 1e-3) / 1e12);
      for (int i = 0; i < found; ++i) {
        const float ms = median_ms(
            [&] {
              CK(cublasLtMatmul(lt, op, &one, dw, la, dx, lb, &zero, dc, lc, dc, lc, &heur[i].algo,
                                ws, ws_bytes, nullptr));
            },
            e0, e1);
        std::printf("%s{\"ms\": %.4f, \"tflops\": %.1f, \"same_bits\": %s}", i ? ", " : "", ms,
                    2.0 * M * N * K / (ms * 1e-3) / 1e12, hash() == gh ? "true" : "false");
      }
      std::printf("]}\n");
      std::fflush(stdout);
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatmulDescDestroy(op);
      cublasLtMatrixLayoutDestroy(la);
      cublasLtMatrixLayoutDestroy(lb);
      cublasLtMatrixLayoutDestroy(lc);
      cudaFree(dw);
      cudaFree(dx);
      cudaFree(dc);
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "sweep") return sweep(argc, argv);
  const int N = argc > 1 ? std::atoi(argv[1]) : 8192;
  const int shapes[][2] = {{9728, 2560}, {4096, 2560}, {1024, 2560}, {2560, 9728}, {2560, 4096}};
  cublasHandle_t h;
  CK(cublasCreate(&h));
  cublasLtHandle_t lt;
  CK(cublasLtCreate(&lt));
  const size_t ws_bytes = size_t(32) << 20;
  void* ws = nullptr;
  CK(cudaMalloc(&ws, ws_bytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (const auto& s : shapes) {
    const int M = s[0], K = s[1];
    const auto w = pattern(size_t(M) * K, 0.02f, 1), x = pattern(size_t(N) * K, 1.0f, 2);
    void *dw, *dx, *dc;
    CK(cudaMalloc(&dw, w.size() * 2));
    CK(cudaMalloc(&dx, x.size() * 2));
    CK(cudaMalloc(&dc, size_t(M) * N * 2));
    CK(cudaMemcpy(dw, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    const float one = 1.0f, zero = 0.0f;
    for (int variant = 0; variant < 3; ++variant) {
      cublasLtMatmulDesc_t op = nullptr;
      cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
      cublasLtMatmulHeuristicResult_t heur{};
      if (variant == 1) CK(cublasSetWorkspace(h, ws, ws_bytes));
      if (variant == 2) {
        CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
        CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, M, K));
        CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, N, K));
        CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, M, N, M));
        cublasLtMatmulPreference_t pref;
        CK(cublasLtMatmulPreferenceCreate(&pref));
        CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &ws_bytes, sizeof(ws_bytes)));
        int found = 0;
        CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 1, &heur, &found));
        CK(found == 1 ? 0 : 1);
        cublasLtMatmulPreferenceDestroy(pref);
      }
      auto run = [&] {
        if (variant < 2)
          CK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, &one, dw, CUDA_R_16BF, K, dx,
                          CUDA_R_16BF, K, &zero, dc, CUDA_R_16BF, M, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT));
        else
          CK(cublasLtMatmul(lt, op, &one, dw, la, dx, lb, &zero, dc, lc, dc, lc, &heur.algo, ws,
                            ws_bytes, nullptr));
      };
      for (int i = 0; i < 3; ++i) run();
      std::vector<float> ts;
      for (int i = 0; i < 10; ++i) {
        CK(cudaEventRecord(e0));
        run();
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        ts.push_back(ms);
      }
      std::sort(ts.begin(), ts.end());
      std::vector<uint16_t> out(size_t(M) * N);
      CK(cudaMemcpy(out.data(), dc, out.size() * 2, cudaMemcpyDeviceToHost));
      static const char* names[] = {"gemmex", "gemmex+ws32M", "lt+ws32M"};
      std::printf(
          "{\"M\": %d, \"N\": %d, \"K\": %d, \"variant\": \"%s\", \"ms\": %.4f, "
          "\"tflops\": %.1f, \"hash\": \"%016llx\"}\n",
          M, N, K, names[variant], ts[5], 2.0 * M * N * K / (ts[5] * 1e-3) / 1e12,
          static_cast<unsigned long long>(bits_hash(out)));
      if (variant == 2) {
        cublasLtMatmulDescDestroy(op);
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc);
      }
    }
    CK(cublasSetWorkspace(h, nullptr, 0));
    cudaFree(dw);
    cudaFree(dx);
    cudaFree(dc);
  }
  return 0;
}
