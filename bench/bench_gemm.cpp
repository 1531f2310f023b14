// The bf16 linear layer at the shapes of a Qwen3-4B decoder, several ways, one JSON line per case:
//   bench_gemm [--tokens 128,1024,4096] [--repeat 3] [--amx-only 1]  |  bench_gemm --peak STEPS
// "linear": nanscope's linear() as the forward pass calls it (fp32 activations holding bf16
// values in, bf16-rounded fp32 out: the AMX kernel where the processor has AMX, else oneDNN, else
// OpenBLAS on widened weights); "amx": the AMX kernel alone (numerics/gemm_amx, packing
// included); "onednn": the oneDNN bf16 matmul with an fp32 result on operands already in bf16;
// "onednn_bf16_out": the same rounded to bf16 inside oneDNN. GFLOP/s = 2*M*N*K / time. Also
// counts how many outputs of linear() and oneDNN, both rounded to bf16, agree bit for bit.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "numerics/dtype.hpp"
#include "numerics/gemm_amx.hpp"
#include "numerics/gemm_bf16.hpp"
#include "numerics/kernels.hpp"
#include "numerics/parallel.hpp"

int main(int argc, char** argv) {
  using namespace nanscope;
  std::vector<int64_t> tokens = {128, 1024, 4096};
  int repeat = 3;
  bool amx_only = false;  // --amx-only 1: only the AMX kernel's column (block-size sweeps)
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--amx-only") {
      amx_only = v != "0";
    } else if (k == "--tokens") {
      tokens.clear();
      std::stringstream ss(v);
      for (std::string p; std::getline(ss, p, ',');) tokens.push_back(std::atoll(p.c_str()));
    } else if (k == "--peak") {
      if (gemm_amx::available()) {
        const auto p = gemm_amx::peak(std::atoll(v.c_str()));
        std::printf("%s\n", nlohmann::json{{"amx_peak_products_gflops", p.products},
                                           {"amx_peak_with_loads_gflops", p.with_loads},
                                           {"threads", default_threads()}}
                                .dump()
                                .c_str());
      }
      return 0;
    } else if (k == "--repeat") {
      repeat = std::atoi(v.c_str());
    } else {
      std::fprintf(stderr, "usage: %s [--tokens 128,1024,4096] [--repeat 3] [--amx-only 1]\n",
                   argv[0]);
      return 2;
    }
  }
  const bool have = gemm_bf16::available();
  std::fprintf(stderr, "oneDNN: %s; AMX kernel: %s\n", gemm_bf16::implementation().c_str(),
               gemm_amx::available() ? "yes" : "no");
  struct Shape {
    const char* name;
    int64_t K, N;
  };
  const Shape shapes[] = {
      {"q_proj", 2560, 4096}, {"gate_proj", 2560, 9728}, {"down_proj", 9728, 2560}};
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const Shape& s : shapes) {
    std::vector<uint16_t> w(size_t(s.N * s.K));
    for (auto& x : w) x = f32_to_bf16(nd(rng) * 0.02f);
    const WeightView wv{reinterpret_cast<const std::byte*>(w.data()), DType::BF16, s.N, s.K};
    for (int64_t M : tokens) {
      std::vector<float> x(size_t(M * s.K)), ref(size_t(M * s.N)), got(ref.size());
      std::vector<uint16_t> xb(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        xb[i] = f32_to_bf16(nd(rng));
        x[i] = bf16_to_f32(xb[i]);
      }
      auto time = [&](auto&& fn) {
        double best = 1e300;
        for (int r = 0; r < repeat; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          fn();
          best = std::min(
              best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        return best;
      };
      const double flop = 2.0 * double(M) * double(s.N) * double(s.K);
      nlohmann::json j = {{"shape", s.name}, {"M", M}, {"K", s.K}, {"N", s.N}};
      if (!amx_only) {
        const double t32 = time([&] { linear(x.data(), M, wv, nullptr, DType::BF16, ref.data()); });
        j["linear_s"] = t32;
        j["linear_gflops"] = flop / t32 / 1e9;
      }
      if (gemm_amx::available()) {
        std::vector<float> a(ref.size());
        const double ta =
            time([&] { gemm_amx::linear(x.data(), M, s.K, w.data(), s.N, nullptr, a.data()); });
        j["amx_gflops"] = flop / ta / 1e9;
      }
      if (have && !amx_only) {
        const double t16 =
            time([&] { gemm_bf16::matmul(xb.data(), M, s.K, w.data(), s.N, got.data()); });
        int64_t same = 0;
        double worst = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const float g = round_to(got[i], DType::BF16);
          same += g == ref[i];
          worst = std::max(worst, double(std::fabs(g - ref[i]) / (std::fabs(ref[i]) + 1e-3)));
        }
        j["onednn_s"] = t16;
        j["onednn_gflops"] = flop / t16 / 1e9;
        j["bit_identical"] = double(same) / double(got.size());
        j["worst_rel"] = worst;
        // What the forward pass calls: the bf16 result (bias slot empty), half the bytes.
        std::vector<uint16_t> ob(got.size());
        const double tb = time([&] {
          gemm_bf16::matmul_bf16_out(xb.data(), M, s.K, w.data(), s.N, nullptr, ob.data());
        });
        j["onednn_bf16_out_gflops"] = flop / tb / 1e9;
      }
      std::printf("%s\n", j.dump().c_str());
      std::fflush(stdout);
    }
  }
  std::printf("%s\n", nlohmann::json{{"onednn", gemm_bf16::implementation()}}.dump().c_str());
  return 0;
}
