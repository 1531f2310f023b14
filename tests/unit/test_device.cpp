// `--device`: the host side of the CUDA backend, which every build and CI run (no GPU needed).
// The GPU computation itself is tested on the GPU machine against transformers' goldens
// (tests/gpu/run.sh); the DeviceGpu tests below run there too (the GPU machine's job runs
// nanscope_tests --gtest_filter='Device*') and skip where no GPU is visible.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <utility>

#include "cli_util.hpp"
#include "common/error.hpp"
#include "common/strings.hpp"
#include "cuda/forward_cuda.hpp"
#include "cuda/weight_plan.hpp"
#include "formats/checkpoint.hpp"
#include "model/adapter_overlay.hpp"
#include "model/forward.hpp"
#include "numerics/backend.hpp"
#include "numerics/dtype.hpp"
#include "synthetic_model.hpp"
#include "tools/generate.hpp"
#include "tools/hidden.hpp"

namespace nanscope {
namespace {

using testing::fixture;
using ::testing::HasSubstr;
using testing::run_cli;
using testing::TempDir;

// Whether an NVIDIA GPU is visible: then `--device cuda` runs instead of failing (the GPU
// machine), and the tests of the failure below do not apply.
bool gpu_visible() {
  return std::system("nvidia-smi -L > /dev/null 2>&1") == 0;
}

// Greedy decoding on the GPU of the DeviceGpu tests: an 8-token prompt, `n` new tokens, eos off.
GenerateOptions gpu_greedy(int64_t n, DType dt, AttentionProfile at = AttentionProfile::Eager) {
  GenerateOptions o;
  o.prompt = {7, 60, 113, 166, 219, 272, 325, 378};
  o.max_new_tokens = n;
  o.eos = std::vector<int64_t>{};
  o.dtype = dt;
  o.attention = at;
  o.device = Device::Cuda;
  return o;
}

TEST(Device, ParsesCpuAndCudaOnly) {
  EXPECT_EQ(parse_device("cpu"), Device::Cpu);
  EXPECT_EQ(parse_device("cuda"), Device::Cuda);
  EXPECT_EQ(parse_device("gpu"), std::nullopt);
  EXPECT_EQ(parse_device("CUDA"), std::nullopt);
  EXPECT_STREQ(device_name(Device::Cuda), "cuda");
  EXPECT_STREQ(device_name(Device::Cpu), "cpu");
  EXPECT_EQ(parse_device_flag("cpu"), Device::Cpu);
  try {
    parse_device_flag("tpu");
    ADD_FAILURE() << "no error for --device tpu";
  } catch (const InputError& e) {
    EXPECT_THAT(e.what(), HasSubstr("--device tpu: expected cpu or cuda"));
  }
}

// Without the backend, --device cuda says how to build it; with it but without a GPU, that there
// is no usable device. Both are input errors (exit 2), never a crash or a silent CPU run.
TEST(Device, CudaWithoutBackendOrGpuIsAnInputError) {
  if (gpu_visible()) GTEST_SKIP() << "a GPU is visible: tests/gpu/run.sh covers --device cuda";
  const std::string expected = cuda_built() ? "no usable CUDA device" : "-DNANSCOPE_CUDA=ON";
  const auto r =
      run_cli({"trace", fixture("models/qwen3-tiny"), "--ids", "1,2,3", "--device", "cuda"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr(expected));
  TempDir d;
  const auto input = (d.path / "in.jsonl").string();
  std::ofstream(input) << "{\"id\": \"a\", \"ids\": [1, 2, 3]}\n";
  const auto h = run_cli({"hidden", fixture("models/qwen3-tiny"), "--input", input, "--out",
                          (d.path / "out").string(), "--device", "cuda"});
  EXPECT_EQ(h.exit_code, 2) << h.err;
  EXPECT_THAT(h.err, HasSubstr(expected));
  const auto g =
      run_cli({"generate", fixture("models/qwen3-tiny"), "--ids", "1,2,3", "--device", "cuda"});
  EXPECT_EQ(g.exit_code, 2) << g.err;
  EXPECT_THAT(g.err, HasSubstr(expected));
  const Checkpoint ck = Checkpoint::open(fixture("models/qwen3-tiny"));
  ForwardOptions opt;
  opt.device = Device::Cuda;
  const std::vector<int64_t> ids = {1, 2, 3};
  try {
    forward(ck, ids, opt);
    ADD_FAILURE() << "forward ran with --device cuda and no GPU";
  } catch (const InputError& e) {
    EXPECT_THAT(e.what(), HasSubstr(expected));
  }
  EXPECT_EQ(
      run_cli({"trace", fixture("models/qwen3-tiny"), "--ids", "1", "--device", "gpu"}).exit_code,
      2);
}

// check and compare take --device too (their runs are trace's and forward's): on a machine
// without a GPU (or the backend) the same input error, never a silent CPU run.
TEST(Device, CheckAndCompareOnCudaWithoutGpuAreInputErrors) {
  if (gpu_visible()) GTEST_SKIP() << "a GPU is visible: tests/gpu/run.sh covers --device cuda";
  const std::string expected = cuda_built() ? "no usable CUDA device" : "-DNANSCOPE_CUDA=ON";
  const std::string m = fixture("models/qwen3-tiny");
  const auto c = run_cli({"check", m, "--ids", "1,2,3", "--device", "cuda", "--json"});
  EXPECT_EQ(c.exit_code, 2) << c.out << c.err;
  EXPECT_THAT(c.out + c.err, HasSubstr(expected));
  for (const char* flag : {"--device", "--device-b"}) {
    const auto r = run_cli({"compare", m, m, "--ids", "1,2,3", flag, "cuda"});
    EXPECT_EQ(r.exit_code, 2) << flag << ": " << r.err;
    EXPECT_THAT(r.err, HasSubstr(expected)) << flag;
  }
  EXPECT_EQ(run_cli({"compare", m, m, "--ids", "1,2", "--device-a", "tpu"}).exit_code, 2);
  EXPECT_EQ(run_cli({"check", m, "--ids", "1,2", "--device", "tpu"}).exit_code, 2);
}

// --gpu-memory's sizes as users type them (also merge's --max-shard-size).
TEST(GpuMemory, SizesParseAsUsersTypeThem) {
  EXPECT_EQ(parse_byte_size("4GiB"), uint64_t(4) << 30);
  EXPECT_EQ(parse_byte_size("4G"), uint64_t(4) << 30);
  EXPECT_EQ(parse_byte_size("4gib"), uint64_t(4) << 30);
  EXPECT_EQ(parse_byte_size("500MB"), uint64_t(500000000));
  EXPECT_EQ(parse_byte_size("1.5GiB"), uint64_t(3) << 29);
  EXPECT_EQ(parse_byte_size("2 TB"), uint64_t(2000000000000));
  EXPECT_EQ(parse_byte_size("8192"), uint64_t(8192));
  EXPECT_EQ(parse_byte_size("64KiB"), uint64_t(65536));
  for (const char* bad :
       {"", "0", "0GiB", "-1G", "GiB", "4XB", "4 GiBs", "1e3", ".", "99999999999T"})
    EXPECT_FALSE(parse_byte_size(bad)) << bad;
}

// The plan: nothing streamed without a cap or when all fits; under a cap, as many layers resident
// as fit beside the two slots, the streamed ones spread over the depth, the whole under the cap.
TEST(GpuMemory, PlanKeepsWhatFitsAndSpreadsTheStreamedLayers) {
  const uint64_t L = 200u << 20, fixed = 800u << 20;
  const std::vector<uint64_t> layers(36, L);
  EXPECT_EQ(plan_gpu_weights(layers, fixed, 0).streamed_layers(), 0);
  EXPECT_EQ(plan_gpu_weights(layers, fixed, fixed + 36 * L).streamed_layers(), 0);
  const uint64_t cap = uint64_t(4) << 30;
  const GpuWeightPlan p = plan_gpu_weights(layers, fixed, cap);
  const int64_t keep = int64_t((cap - fixed - 2 * L) / L);  // 14 of 36
  EXPECT_EQ(p.streamed_layers(), 36 - keep);
  EXPECT_EQ(p.slot_bytes, L);
  EXPECT_EQ(p.resident_bytes, fixed + uint64_t(keep) * L);
  EXPECT_LE(p.resident_bytes + 2 * p.slot_bytes, cap);
  EXPECT_EQ(p.minimum, fixed + 2 * L);
  EXPECT_TRUE(p.streamed.back());
  // Spread: no more than ceil(36 / 14) streamed layers in a row, and both halves stream alike.
  int run = 0, longest = 0, first_half = 0;
  for (size_t i = 0; i < 36; ++i) {
    run = p.streamed[i] ? run + 1 : 0;
    longest = std::max(longest, run);
    if (i < 18) first_half += p.streamed[i];
  }
  EXPECT_LE(longest, 3);
  EXPECT_NEAR(first_half, p.streamed_layers() / 2.0, 1.0);
  // At the minimum every layer streams through the two slots.
  EXPECT_EQ(plan_gpu_weights(layers, fixed, p.minimum).streamed_layers(), 36);
}

TEST(GpuMemory, ACapBelowTheMinimumNamesTheMinimum) {
  const std::vector<uint64_t> layers(36, 200u << 20);
  try {
    plan_gpu_weights(layers, 800u << 20, uint64_t(1) << 30);
    ADD_FAILURE() << "a 1 GiB cap under a 1.17 GiB minimum was accepted";
  } catch (const InputError& e) {
    EXPECT_THAT(e.what(), HasSubstr("--gpu-memory 1.00 GiB"));
    EXPECT_THAT(e.what(), HasSubstr("at least 1.17 GiB"));
  }
  // A real model's plan: Qwen3-tiny's layers are the config's shapes in the run dtype.
  const Checkpoint ck = Checkpoint::open(fixture("models/qwen3-tiny"));
  const ModelSpec spec = model_spec(ck.config());
  const GpuWeightPlan bf = plan_gpu_weights(spec, DType::BF16, false, 0);
  const GpuWeightPlan f32 = plan_gpu_weights(spec, DType::F32, false, 0);
  EXPECT_GT(bf.resident_bytes, 0u);
  EXPECT_NEAR(double(f32.resident_bytes) / double(bf.resident_bytes), 2.0, 0.2);
  EXPECT_EQ(plan_gpu_weights(spec, DType::BF16, false, bf.minimum).streamed_layers(),
            int64_t(spec.layers.size()));
}

// The flag: a size users can type, and only where a GPU runs (else it would be ignored silently).
TEST(GpuMemory, TheFlagWantsASizeAndTheGpu) {
  const std::string m = fixture("models/qwen3-tiny");
  const auto cpu = run_cli({"trace", m, "--ids", "1,2,3", "--gpu-memory", "4GiB"});
  EXPECT_EQ(cpu.exit_code, 2) << cpu.err;
  EXPECT_THAT(cpu.err, HasSubstr("--gpu-memory 4GiB: it caps the GPU's memory; add --device cuda"));
  const auto bad = run_cli({"generate", m, "--ids", "1,2,3", "--gpu-memory", "lots"});
  EXPECT_EQ(bad.exit_code, 2) << bad.err;
  EXPECT_THAT(bad.err, HasSubstr("--gpu-memory lots: expected a size like 4GiB"));
  for (const char* cmd : {"check", "hidden", "compare"}) {
    const auto h = run_cli({cmd, "--help"});
    EXPECT_THAT(h.out, HasSubstr("--gpu-memory")) << cmd;
  }
  const auto cmp = run_cli({"compare", m, m, "--ids", "1,2", "--gpu-memory", "1G"});
  EXPECT_EQ(cmp.exit_code, 2) << cmp.err;
  EXPECT_THAT(cmp.err, HasSubstr("add --device cuda"));
}

// Greedy decoding on the GPU brings back only the argmax and a finite flag of each step's logits
// (computed there); with the rows kept (keep_logits) the host picks. Both must give the same
// tokens, and each token must be the first index of its row's largest value: tied and untied
// tables, Gemma's embedding scale and soft-capping, fp32 and bf16, eager and fused.
TEST(DeviceGpu, GreedyPickOnTheGpuIsTheHostsArgmaxOfTheRow) {
  if (!gpu_visible() || !cuda_built()) GTEST_SKIP() << "no GPU: the GPU machine runs this";
  for (const char* model : {"qwen3-tiny", "llama-tiny", "gemma2-tiny", "mistral-tiny"})
    for (DType dt : {DType::F32, DType::BF16})
      for (AttentionProfile at : {AttentionProfile::Eager, AttentionProfile::Fused}) {
        const Checkpoint ck = Checkpoint::open(fixture(std::string("models/") + model));
        GenerateOptions o = gpu_greedy(24, dt, at);
        const GenerateResult picked = generate(ck, o);
        o.keep_logits = true;
        const GenerateResult rows = generate(ck, o);
        const std::string what = std::string(model) + " " + std::string(dtype_name(dt)) + " " +
                                 std::string(attention_name(at));
        ASSERT_EQ(picked.ids, rows.ids) << what;
        ASSERT_EQ(rows.step_logits.size(), rows.ids.size()) << what;
        for (size_t i = 0; i < rows.ids.size(); ++i) {
          const std::vector<float>& l = rows.step_logits[i];
          const auto best = std::max_element(l.begin(), l.end()) - l.begin();
          EXPECT_EQ(rows.ids[i], best) << what << " step " << i;
        }
      }
}

// A decode step's fused kernels (NANSCOPE_CUDA_FUSE, on by default) change the launches, never
// the numbers: every step's logits bit for bit as the separate kernels compute them, graph or
// not. The families cover q/k norms (Qwen3), biases (Qwen2), windows (Mistral, Qwen2's), fused
// projections and partial rotary (Phi-3/4) and Gemma's norms after attention (not fused: the same
// path either way); fp32, bf16 and fp16; eager and fused attention; the fused step's products
// on one stream and, with NANSCOPE_CUDA_STREAMS, on three.
TEST(DeviceGpu, FusedDecodeKernelsGiveTheLogitsOfTheSeparateOnes) {
  if (!gpu_visible() || !cuda_built()) GTEST_SKIP() << "no GPU: the GPU machine runs this";
  for (const char* model : {"qwen3-tiny", "qwen2-tiny", "qwen2-tiny-window", "llama-tiny",
                            "mistral-tiny", "phi3-tiny", "phi4-tiny-partial", "gemma2-tiny"})
    for (DType dt : {DType::F32, DType::BF16, DType::F16})
      for (AttentionProfile at : {AttentionProfile::Eager, AttentionProfile::Fused})
        for (bool graph : {false, true})
          for (auto [gemv, streams] : {std::pair{true, false}, {false, false}, {false, true}}) {
            const Checkpoint ck = Checkpoint::open(fixture(std::string("models/") + model));
            GenerateOptions o = gpu_greedy(40, dt, at);
            o.keep_logits = true;
            Backend b = backend();
            b.cuda_graph = graph;
            b.cuda_gemv = gemv;
            b.cuda_fuse = false;
            GenerateResult apart;
            {
              const ScopedBackend use(b);
              apart = generate(ck, o);
            }
            b.cuda_fuse = true;
            b.cuda_step_streams = streams;
            GenerateResult fused;
            {
              const ScopedBackend use(b);
              fused = generate(ck, o);
            }
            const std::string what = std::string(model) + " " + std::string(dtype_name(dt)) + " " +
                                     std::string(attention_name(at)) + (graph ? " graph" : "") +
                                     (gemv ? " gemv" : " cublas") + (streams ? " streams" : "");
            ASSERT_EQ(fused.ids, apart.ids) << what;
            ASSERT_EQ(fused.step_logits.size(), apart.step_logits.size()) << what;
            for (size_t i = 0; i < fused.step_logits.size(); ++i) {
              const std::vector<float>& x = fused.step_logits[i];
              const std::vector<float>& y = apart.step_logits[i];
              ASSERT_EQ(x.size(), y.size()) << what;
              EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)), 0)
                  << what << " step " << i;
            }
          }
}

// A decode step's one-row products by warps (cuda::gemv): within one rounding of the exact
// product, as cuBLAS's are (the fp32 sums' order differs, so the two may part by the last bit);
// a NaN weight poisons its row. Widths with and without whole 16-byte chunks, rows past a block.
TEST(DeviceGpu, OneRowProductsAreTheExactProductRoundedOnce) {
  if (!gpu_visible() || !cuda_built()) GTEST_SKIP() << "no GPU: the GPU machine runs this";
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (DType dt : {DType::F32, DType::BF16, DType::F16})
    for (auto [rows, cols] :
         {std::pair<int64_t, int64_t>{5, 37}, {64, 64}, {300, 2560}, {17, 9728}, {1001, 136}}) {
      std::vector<float> w(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(cols));
      for (float& v : w) v = round_to(0.5f * u(rng), dt);
      for (float& v : x) v = round_to(u(rng), dt);
      w[size_t(3 * cols + cols / 2)] = std::numeric_limits<float>::quiet_NaN();
      const std::vector<float> got = cuda_matvec(w, x, rows, cols, dt, true);
      const std::vector<float> cub = cuda_matvec(w, x, rows, cols, dt, false);
      const double rel = dt == DType::F32 ? 0x1p-23 : dt == DType::BF16 ? 0x1p-7 : 0x1p-10;
      int64_t apart = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const std::string what = std::string(dtype_name(dt)) + " " + std::to_string(rows) + "x" +
                                 std::to_string(cols) + " row " + std::to_string(r);
        if (r == 3) {
          EXPECT_TRUE(std::isnan(got[size_t(r)]) && std::isnan(cub[size_t(r)])) << what;
          continue;
        }
        double exact = 0, mass = 0;
        for (int64_t k = 0; k < cols; ++k) {
          const double p = double(w[size_t(r * cols + k)]) * double(x[size_t(k)]);
          exact += p, mass += std::fabs(p);
        }
        // One rounding to the run dtype (an ulp at most) plus the fp32 sums' own error.
        const double tol = rel * std::fabs(exact) + double(cols) * 0x1p-24 * mass + 0x1p-24;
        EXPECT_LE(std::fabs(got[size_t(r)] - exact), tol) << what << " gemv";
        EXPECT_LE(std::fabs(cub[size_t(r)] - exact), tol) << what << " cuBLAS";
        EXPECT_EQ(round_to(got[size_t(r)], dt), got[size_t(r)]) << what;
        apart += got[size_t(r)] != cub[size_t(r)];
      }
      std::printf("%s %lldx%lld: %lld of %lld rows part from cuBLAS by rounding\n",
                  std::string(dtype_name(dt)).c_str(), static_cast<long long>(rows),
                  static_cast<long long>(cols), static_cast<long long>(apart),
                  static_cast<long long>(rows - 1));
    }
}

// A step whose MLP is wide (8,192 rows, many blocks in flight): the fused gate/up + activation
// launch reads the norm's output while it writes the activation, so the two must not share a
// buffer (they did: tokens changed from run to run on Qwen3-4B while the tiny models passed).
// Logits bit for bit against the unfused launches, and the same from one run to the next.
TEST(DeviceGpu, AWideMlpStepReadsItsInputWhole) {
  if (!gpu_visible() || !cuda_built()) GTEST_SKIP() << "no GPU: the GPU machine runs this";
  TempDir dir;
  nlohmann::json cfg = testing::tiny_qwen3_config();
  cfg["hidden_size"] = 256, cfg["intermediate_size"] = 8192, cfg["num_attention_heads"] = 4;
  cfg["num_key_value_heads"] = 2, cfg["head_dim"] = 64, cfg["vocab_size"] = 512;
  std::vector<testing::PlantedTensor> ts = testing::expected_planted(cfg, DType::BF16);
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  for (testing::PlantedTensor& t : ts) {
    size_t n = 1;
    for (int64_t d : t.shape) n *= size_t(d);
    const bool norm = t.name.ends_with("norm.weight");
    for (size_t i = 0; i < n; ++i) t.values.push_back(norm ? 1.0f : nd(rng));
  }
  testing::write_model(dir.path, cfg, ts);
  const Checkpoint ck = Checkpoint::open(dir.path);
  for (DType dt : {DType::BF16, DType::F16}) {
    GenerateOptions o = gpu_greedy(24, dt, AttentionProfile::Fused);
    o.keep_logits = true;
    std::vector<GenerateResult> runs;
    for (bool fuse : {true, true, false}) {
      Backend b = backend();
      b.cuda_fuse = fuse;
      const ScopedBackend use(b);
      runs.push_back(generate(ck, o));
    }
    for (size_t k = 1; k < runs.size(); ++k) {
      ASSERT_EQ(runs[k].ids, runs[0].ids) << dtype_name(dt) << " run " << k;
      for (size_t i = 0; i < runs[0].step_logits.size(); ++i)
        ASSERT_EQ(std::memcmp(runs[k].step_logits[i].data(), runs[0].step_logits[i].data(),
                              runs[0].step_logits[i].size() * sizeof(float)),
                  0)
            << dtype_name(dt) << " run " << k << " step " << i;
    }
  }
}

// --gpu-memory: layers streamed through two slots compute the numbers of the resident ones, bit
// for bit: hidden states of passes of several lengths one after another (the slots carry over
// between passes, and a pass that stops early leaves them mid-way), and generate's prompt pass
// and steps (no graph then). Caps at the minimum (every layer streamed, three through two slots)
// and, on a six-layer model, two layers above it; fp32, bf16 and fp16; eager and fused.
TEST(DeviceGpu, StreamedWeightsGiveTheResidentNumbers) {
  if (!gpu_visible() || !cuda_built()) GTEST_SKIP() << "no GPU: the GPU machine runs this";
  // Six layers (written here: the fixtures have three) for a cap that keeps some resident.
  TempDir deep;
  nlohmann::json cfg = testing::tiny_qwen3_config();
  cfg["num_hidden_layers"] = 6;
  testing::write_model(deep.path, cfg, testing::expected_planted(cfg, DType::BF16));
  std::vector<std::string> models = {deep.path.string()};
  for (const char* m : {"qwen3-tiny", "qwen2-tiny", "phi3-tiny", "gemma2-tiny"})
    models.push_back(fixture(std::string("models/") + m));
  for (const std::string& model : models)
    for (DType dt : {DType::F32, DType::BF16, DType::F16})
      for (AttentionProfile at : {AttentionProfile::Eager, AttentionProfile::Fused}) {
        const Checkpoint ck = Checkpoint::open(model);
        const ModelSpec spec = model_spec(ck.config());
        const int64_t n = int64_t(spec.layers.size());
        const std::string what =
            model + " " + std::string(dtype_name(dt)) + " " + std::string(attention_name(at));
        ForwardOptions f;
        f.dtype = dt;
        f.attention = at;
        f.device = Device::Cuda;
        std::vector<HiddenInput> ins(3);
        ins[0].ids = {7, 60, 113, 166, 219};
        ins[1].ids = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2};
        ins[2].ids = {42};
        const std::vector<int64_t> upto1 = {0, 1};  // stops after layer 0: slots mid-way
        GenerateOptions g = gpu_greedy(12, dt, at);
        g.keep_logits = true;
        for (HiddenInput& in : ins)
          for (int64_t& id : in.ids) id %= spec.vocab;
        for (int64_t& id : g.prompt) id %= spec.vocab;
        const uint64_t layer = layer_matrix_bytes(spec.layers[0], spec.hidden, dt);
        // caps[0]: the hidden passes', caps[1]: generate's (an untied table joins the weights).
        const auto runs = [&](std::array<uint64_t, 2> caps) {
          Backend b = backend();
          std::vector<std::vector<float>> out;
          b.cuda_weight_cap = caps[0];
          {
            const ScopedBackend use(b);
            for (const HiddenInput& in : ins) {
              hidden_states(ck, in, f, upto1);
              for (auto& st : hidden_states(ck, in, f).states) out.push_back(std::move(st));
            }
          }
          b.cuda_weight_cap = caps[1];
          const ScopedBackend use(b);
          const GenerateResult r = generate(ck, g);
          for (const auto& l : r.step_logits) out.push_back(l);
          out.push_back(std::vector<float>(r.ids.begin(), r.ids.end()));
          return out;
        };
        const auto resident = runs({0, 0});
        if (model == models[0]) {  // under the minimum: the message says what it needs, exit 2
          const auto r = run_cli(
              {"trace", model, "--ids", "1,2,3", "--device", "cuda", "--gpu-memory", "1KiB"});
          EXPECT_EQ(r.exit_code, 2) << r.err;
          EXPECT_THAT(r.err, HasSubstr("weights need at least")) << r.err;
        }
        // Every layer through the two slots; with six, two resident and four streamed.
        std::vector<int64_t> extras = {0};
        if (n >= 5) extras.push_back(2);
        for (int64_t extra : extras) {
          std::array<uint64_t, 2> caps{};
          for (int decode = 0; decode < 2; ++decode) {
            caps[decode] =
                plan_gpu_weights(spec, dt, decode == 1, 0).minimum + uint64_t(extra) * layer;
            ASSERT_EQ(plan_gpu_weights(spec, dt, decode == 1, caps[decode]).streamed_layers(),
                      n - extra)
                << what;
          }
          const auto streamed = runs(caps);
          ASSERT_EQ(streamed.size(), resident.size()) << what;
          for (size_t i = 0; i < resident.size(); ++i) {
            ASSERT_EQ(streamed[i].size(), resident[i].size()) << what << " #" << i;
            EXPECT_EQ(std::memcmp(streamed[i].data(), resident[i].data(),
                                  resident[i].size() * sizeof(float)),
                      0)
                << what << " +" << extra << " layer #" << i;
          }
        }
      }
}

// hidden's batches under the fused profile take one tensor-core kernel per layer
// (flash_attention) in place of the score product and fused_softmax_pv: the same arithmetic but
// the order of its fp32 sums, so the states agree within a rounding or two of the run dtype, over
// sequences shorter than, equal to and longer than its 64-query and 128-key tiles, beside each
// other in one batch, with and without a sliding window, eager and fused; where fp16 eager
// overflows (qwen3-fp16-attn) the NaN/inf pattern is the same. Their numbers against
// transformers: tests/gpu/compare.py's hidden goldens.
TEST(DeviceGpu, FlashAttentionGivesTheFusedKernelsStates) {
  if (!gpu_visible() || !cuda_built()) GTEST_SKIP() << "no GPU: the GPU machine runs this";
  for (const char* m :
       {"qwen3-tiny", "mistral-tiny", "qwen2-tiny-window", "phi3-tiny", "qwen3-fp16-attn"})
    for (DType dt : {DType::BF16, DType::F16})
      for (AttentionProfile at : {AttentionProfile::Eager, AttentionProfile::Fused}) {
        const Checkpoint ck = Checkpoint::open(fixture(std::string("models/") + m));
        const std::string what = std::string(m) + " " + std::string(dtype_name(dt)) + " " +
                                 std::string(attention_name(at));
        ForwardOptions f;
        f.dtype = dt;
        f.attention = at;
        f.device = Device::Cuda;
        std::vector<HiddenInput> ins;
        std::mt19937 rng(7);
        for (int64_t len : {1, 17, 64, 65, 130, 200}) {
          HiddenInput in;
          for (int64_t t = 0; t < len; ++t) in.ids.push_back(int64_t(rng() % 1000));
          ins.push_back(std::move(in));
        }
        std::vector<const HiddenInput*> batch;
        for (const HiddenInput& in : ins) batch.push_back(&in);
        const auto states = [&](bool flash) {
          Backend b = backend();
          b.cuda_flash = flash;
          const ScopedBackend use(b);
          std::vector<std::vector<float>> out;
          hidden_states_batch(ck, batch, f, {}, [&](size_t, int64_t, std::span<const float> st) {
            out.emplace_back(st.begin(), st.end());
          });
          return out;
        };
        const auto flash = states(true), kernels = states(false);
        ASSERT_EQ(flash.size(), kernels.size()) << what;
        ASSERT_GT(flash.size(), 0u) << what;
        for (size_t i = 0; i < flash.size(); ++i) {
          ASSERT_EQ(flash[i].size(), kernels[i].size()) << what;
          double peak = 0, worst = 0, sum = 0;
          size_t same = 0;
          for (size_t e = 0; e < flash[i].size(); ++e) {
            ASSERT_EQ(std::isnan(flash[i][e]), std::isnan(kernels[i][e])) << what << " state " << i;
            ASSERT_EQ(std::isinf(flash[i][e]), std::isinf(kernels[i][e])) << what << " state " << i;
            if (!std::isfinite(kernels[i][e])) {
              ++same;
              continue;
            }
            const double d = std::fabs(double(flash[i][e]) - double(kernels[i][e]));
            peak = std::max(peak, std::fabs(double(kernels[i][e])));
            worst = std::max(worst, d);
            sum += d;
            same += d == 0 ? 1 : 0;
          }
          EXPECT_LE(worst, 0.05 * std::max(1.0, peak)) << what << " state " << i;
          EXPECT_LE(sum / double(flash[i].size()), 0.005 * std::max(1.0, peak))
              << what << " state " << i;
          // State 0 (the embeddings, handed over first for each sequence) comes before attention.
          if (i < ins.size()) {
            EXPECT_EQ(same, flash[i].size()) << what;
          }
        }
      }
}

// hidden's passes through pass_layer (fused kernels: q/k/v rounding + q/k norm + RoPE + storage
// in one launch, the context in storage, residual + next norm) against layer()'s separate
// launches, both with flash attention: the same bits in every state, NaN where there is NaN.
// Families with and without q/k norm, biases, a sliding window, fused projections; eager
// (whose overflow bound then comes from pass_qkv) and fused.
TEST(DeviceGpu, PassLayerGivesTheLayerRecipesBits) {
  if (!gpu_visible() || !cuda_built()) GTEST_SKIP() << "no GPU: the GPU machine runs this";
  for (const char* m :
       {"qwen3-tiny", "qwen2-tiny-window", "mistral-tiny", "phi3-tiny", "qwen3-fp16-attn"})
    for (DType dt : {DType::BF16, DType::F16})
      for (AttentionProfile at : {AttentionProfile::Eager, AttentionProfile::Fused}) {
        const Checkpoint ck = Checkpoint::open(fixture(std::string("models/") + m));
        const std::string what = std::string(m) + " " + std::string(dtype_name(dt)) + " " +
                                 std::string(attention_name(at));
        ForwardOptions f;
        f.dtype = dt;
        f.attention = at;
        f.device = Device::Cuda;
        std::vector<HiddenInput> ins;
        std::mt19937 rng(11);
        for (int64_t len : {1, 17, 64, 65, 130, 200}) {
          HiddenInput in;
          for (int64_t t = 0; t < len; ++t) in.ids.push_back(int64_t(rng() % 1000));
          ins.push_back(std::move(in));
        }
        std::vector<const HiddenInput*> batch;
        for (const HiddenInput& in : ins) batch.push_back(&in);
        const auto states = [&](bool fuse) {
          Backend b = backend();
          b.cuda_fuse = fuse;
          const ScopedBackend use(b);
          std::vector<std::vector<float>> out;
          hidden_states_batch(ck, batch, f, {}, [&](size_t, int64_t, std::span<const float> st) {
            out.emplace_back(st.begin(), st.end());
          });
          return out;
        };
        const auto fused = states(true), apart = states(false);
        ASSERT_EQ(fused.size(), apart.size()) << what;
        ASSERT_GT(fused.size(), ins.size()) << what;
        for (size_t i = 0; i < fused.size(); ++i) {
          ASSERT_EQ(fused[i].size(), apart[i].size()) << what;
          size_t differ = 0;
          for (size_t e = 0; e < fused[i].size(); ++e) {
            const float x = fused[i][e], y = apart[i][e];
            if (!(x == y || (std::isnan(x) && std::isnan(y)))) ++differ;
          }
          EXPECT_EQ(differ, 0u) << what << " state " << i;
        }
      }
}

// An adapter applied unmerged on the GPU (its numbers against peft's PeftModel on cuda:
// tests/gpu/compare.py): the LoRA changes the states (it is not dropped), stays within the run
// dtype's tolerance of the CPU's PeftModel computation, and decodes the same graph or not; what
// the GPU does not apply yet is exit 2 naming it.
TEST(DeviceGpu, AnAdapterIsAppliedUnmergedOnTheGpu) {
  if (!gpu_visible() || !cuda_built()) GTEST_SKIP() << "no GPU: the GPU machine runs this";
  const Checkpoint ck = Checkpoint::open(fixture("models/qwen3-tiny"));
  const auto ov = AdapterOverlay::open(fixture("adapters/lora-bf16"), ck);
  HiddenInput in;
  in.ids = {1, 15, 300, 7, 42, 999, 3, 12};
  for (DType dt : {DType::F32, DType::BF16}) {
    ForwardOptions f;
    f.dtype = dt;
    f.device = Device::Cuda;
    const HiddenStates bare = hidden_states(ck, in, f);
    f.adapter = ov.get();
    const HiddenStates gpu = hidden_states(ck, in, f);
    f.device = Device::Cpu;
    const HiddenStates cpu = hidden_states(ck, in, f);
    const std::vector<float>& g = gpu.states.back();
    const std::vector<float>& c = cpu.states.back();
    const std::vector<float>& b = bare.states.back();
    double d2 = 0, n2 = 0, moved = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      d2 += double(g[i] - c[i]) * (g[i] - c[i]);
      n2 += double(c[i]) * c[i];
      moved += std::fabs(double(g[i]) - b[i]);
    }
    EXPECT_GT(moved, 0.0) << dtype_name(dt) << ": the adapter changed nothing on the GPU";
    EXPECT_LT(std::sqrt(d2 / n2), dt == DType::F32 ? 1e-5 : 1e-2) << dtype_name(dt);
  }
  // Decoding with it: the same logits bit for bit with the step replayed as a graph or not.
  std::vector<GenerateResult> runs;
  for (bool graph : {false, true}) {
    Backend be = backend();
    be.cuda_graph = graph;
    const ScopedBackend use(be);
    GenerateOptions o = gpu_greedy(8, DType::BF16);
    o.adapter = ov;
    o.keep_logits = true;
    runs.push_back(generate(ck, o));
  }
  ASSERT_EQ(runs[0].ids, runs[1].ids);
  ASSERT_EQ(runs[0].ids.size(), 8u);
  for (size_t i = 0; i < runs[0].step_logits.size(); ++i)
    EXPECT_EQ(runs[0].step_logits[i], runs[1].step_logits[i]) << "step " << i;
  // A DoRA on the embedding decodes too, from a table made once by the host's embedding
  // (tests/gpu/compare.py checks its tokens against PeftModel's on the GPU).
  const auto dora = run_cli({"generate", fixture("models/llama-tiny"), "--adapter",
                             fixture("adapters/dora-embed"), "--ids", "1,2,3", "--device", "cuda",
                             "--max-new-tokens", "4", "--eos", "none"});
  EXPECT_EQ(dora.exit_code, 0) << dora.err;
  EXPECT_THAT(dora.out, HasSubstr("[4 new tokens"));
  // What the GPU does not compute is still exit 2, never the bare model's numbers.
  const auto moe =
      run_cli({"trace", fixture("models/qwen3-moe-tiny"), "--adapter",
               fixture("adapters/family-qwen3-moe"), "--ids", "1,2,3", "--device", "cuda"});
  EXPECT_EQ(moe.exit_code, 2) << moe.err;
  EXPECT_THAT(moe.err, HasSubstr("mixture-of-experts"));
}

}  // namespace
}  // namespace nanscope
