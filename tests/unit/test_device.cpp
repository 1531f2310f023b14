// `--device`: the host side of the CUDA backend, which every build and CI run (no GPU needed).
// The GPU computation itself is tested on the GPU machine against transformers' goldens
// (tests/gpu/run.sh); the DeviceGpu tests below run there too (the GPU machine's job runs
// nanscope_tests --gtest_filter='Device*') and skip where no GPU is visible.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "cli_util.hpp"
#include "common/error.hpp"
#include "cuda/forward_cuda.hpp"
#include "formats/checkpoint.hpp"
#include "model/forward.hpp"
#include "numerics/backend.hpp"
#include "tools/generate.hpp"

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

// check --adapter without --base applies the adapter unmerged, which runs on the CPU only.
TEST(Device, CheckOfAnUnmergedAdapterOnCudaIsAnInputError) {
  if (!cuda_built()) GTEST_SKIP() << "built without the CUDA backend";
  const auto r = run_cli({"check", fixture("models/qwen3-tiny"), "--adapter",
                          fixture("adapters/lora-bf16"), "--ids", "1,2,3", "--device", "cuda"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("applies the adapter unmerged, which runs on the CPU only"));
}

// An adapter is applied on the CPU only so far: generate --device cuda with one is exit 2 saying
// so, before any GPU is looked for (so on every machine).
TEST(Device, GenerateWithAnAdapterOnCudaIsAnInputError) {
  if (!cuda_built()) GTEST_SKIP() << "built without the CUDA backend";
  const auto r = run_cli({"generate", fixture("models/qwen3-tiny"), "--adapter",
                          fixture("adapters/lora-bf16"), "--ids", "1,2,3", "--device", "cuda"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("an adapter applied unmerged runs on the CPU only"));
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
        GenerateOptions o;
        o.prompt = {7, 60, 113, 166, 219, 272, 325, 378};
        o.max_new_tokens = 24;
        o.eos = std::vector<int64_t>{};
        o.dtype = dt;
        o.attention = at;
        o.device = Device::Cuda;
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
          for (bool streams : {false, true}) {
            const Checkpoint ck = Checkpoint::open(fixture(std::string("models/") + model));
            GenerateOptions o;
            o.prompt = {7, 60, 113, 166, 219, 272, 325, 378};
            o.max_new_tokens = 40;
            o.eos = std::vector<int64_t>{};
            o.dtype = dt;
            o.attention = at;
            o.device = Device::Cuda;
            o.keep_logits = true;
            Backend b = backend();
            b.cuda_graph = graph;
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
                                     (streams ? " streams" : "");
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

}  // namespace
}  // namespace nanscope
