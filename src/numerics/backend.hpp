// Which kernel computes each matrix product of the forward pass, decided in one place.
//
// A product's path (MatmulPath) follows from the run dtype, its number of tokens (rows), the
// processor's features (has_amx_hardware, has_onednn_bf16) and the options (Backend):
// choose_linear_path for the linear layers, choose_attention_path for eager attention's q.k^T
// and p.v. The kernels (kernels.cpp, gemm_amx.cpp) and the forward pass ask these two functions
// and nothing else. The options are read from the environment once (backend_from_environment)
// and can be replaced in-process (set_backend, ScopedBackend): `--threads` on the command line,
// and the tests, which force each path in turn so that one run covers every path this machine
// can run, emulated AMX tiles included (tests/unit/test_backend.cpp).
//
// Every path computes the same function up to the fp32 accumulation order: products summed in
// fp32, bias added in fp32, one rounding to the run dtype (docs/forward.md). The AMX and oneDNN
// paths multiply bf16 values and read bf16 subnormal inputs as zero, as torch's bf16 kernels do.
//
// The environment (read by backend_from_environment only; docs/backend.md has the same table):
//
// | variable                       | field             | effect                                 |
// |--------------------------------|-------------------|----------------------------------------|
// | NANSCOPE_THREADS=N             | threads           | workers of parallel_for (default: one  |
// |                                |                   | per hardware thread)                   |
// | NANSCOPE_PROFILE=1             | profile           | time per step of each forward pass on  |
// |                                |                   | stderr (profile.hpp)                   |
// | NANSCOPE_NO_AMX=1              | amx = Off         | bf16 products on oneDNN (or OpenBLAS)  |
// |                                |                   | even where the processor has AMX       |
// | NANSCOPE_AMX_EMULATE=1         | amx = Emulated    | every AMX path on tiles emulated in    |
// |                                |                   | C++, on any machine (slow; tests)      |
// | NANSCOPE_NO_ONEDNN=1           | onednn = false    | bf16 products without AMX on OpenBLAS  |
// | NANSCOPE_NO_AVX512=1           | avx512 = false    | few-token products on the AVX2 kernel  |
// |                                |                   | even where the processor has AVX-512   |
// | NANSCOPE_DECODE=ROWS,PREFETCH  | decode.rows/      | the AVX-512 streaming kernel's rows    |
// |   [,X16]                       |   .prefetch/.x16  | per block, prefetch distance, bf16 x   |
// | NANSCOPE_AMX_BLOCK=M,N,K       | amx_tuning.m/n/k  | the AMX kernel's C block and K step,   |
// |                                |                   | multiples of 32 (K 0: the whole K)     |
// | NANSCOPE_AMX_PREFETCH=ab|a|b|0 | amx_tuning.       | which operand's next tiles are         |
// |                                |   prefetch_a/_b   | prefetched into L1 (1: both)           |
// | NANSCOPE_AMX_ORDER=mn|nm       | amx_tuning.       | rows (mn) or columns (nm) outer inside |
// |                                |   n_outer         | a block                                |
// | NANSCOPE_AMX_STEAL=0|1         | amx_tuning.steal  | 0: a static split of the AMX blocks    |
// |                                |                   | among the workers instead of stealing  |
// | NANSCOPE_CUDA_GEMM_F32=1       | cuda_gemm_f32_out | --device cuda: products write fp32 and |
// |                                |                   | round once after (default: the run     |
// |                                |                   | dtype, as torch's cuBLAS calls)        |
// | NANSCOPE_CUDA_GRAPH=0          | cuda_graph=false  | decode steps launched one by one, not  |
// |                                |                   | replayed as one CUDA graph (default)   |
// | NANSCOPE_CUDA_STEP_TIMES=1     | cuda_step_times   | per-step queue / total time on stderr  |
// | NANSCOPE_CUDA_STREAMS=1        | cuda_step_streams | a fused decode step's k/v and up       |
// |                                |                   | products on two more streams (the same |
// |                                |                   | bits; within noise on the H200)        |
// | NANSCOPE_CUDA_PROFILE=1        | cuda_profile      | GPU and host time per phase of the     |
// |                                |                   | passes, summed, on stderr at exit      |
// | NANSCOPE_CUDA_FUSE=0           | cuda_fuse=false   | decode steps and hidden's passes       |
// |                                |                   | without the fused kernels (same        |
// |                                |                   | numbers: an A/B of the launches)       |
// | NANSCOPE_CUDA_JOIN=0           | cuda_join=false   | hidden's passes: q/k/v and gate/up as  |
// |                                |                   | separate products, not one product of  |
// |                                |                   | the matrices joined end to end         |
// | NANSCOPE_CUDA_GEMV=0           | cuda_gemv=false   | a decode step's products of one row by |
// |                                |                   | cuBLAS instead of the warp-per-row     |
// |                                |                   | kernel (kernels.cu: gemv)              |
// | NANSCOPE_CUDA_FLASH=0          | cuda_flash=false  | attention of passes without a cache or |
// |                                |                   | sites (hidden) by the q.k^T product    |
// |                                |                   | and the softmax kernels instead of one |
// |                                |                   | tensor-core kernel (flash_attention)   |
// | NANSCOPE_GPU_MEMORY=SIZE       | cuda_weight_cap   | --device cuda: the weights may hold at |
// |                                |                   | most SIZE (4GiB, 500MB) of GPU memory; |
// |                                |                   | the layers beyond are streamed from    |
// |                                |                   | page-locked host memory (--gpu-memory) |
// | ONEDNN_MAX_CPU_ISA (oneDNN's)  | onednn_amx=false  | when set, oneDNN's own cap decides;    |
// |                                |                   | otherwise nanscope lets oneDNN 2.6 use |
// |                                |                   | AMX (opt-in there)                     |
//
// A value that does not parse keeps the default (as before: these are tuning aids, not input).
// The AMX tuning variables are for bench/amx_sweep.sh; defaults were chosen on the 16-core Xeon
// (gemm_amx.cpp, BENCHMARKS.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "numerics/dtype.hpp"

namespace nanscope {

// Where the forward pass runs (ForwardOptions::device, `--device`): the CPU kernels below, or the
// CUDA backend (src/cuda, built with NANSCOPE_CUDA; cuda_built() in cuda/forward_cuda.hpp says
// whether this build has it).
enum class Device : uint8_t { Cpu, Cuda };
const char* device_name(Device d);                       // "cpu" | "cuda"
std::optional<Device> parse_device(std::string_view s);  // nullopt for anything else

// The kernels a matrix product can run on.
enum class MatmulPath : uint8_t {
  Scalar,       // linear_ref's plain loops: the reference; chosen only when forced
  Stream,       // AVX2 microkernel streaming the weights once: few tokens (memory-bound)
  Stream512,    // the same on AVX-512 (16 lanes, all tokens per row block): few tokens
  Blas,         // OpenBLAS sgemm on weights widened to fp32: many tokens, any dtype
  OneDnn,       // oneDNN's bf16 matmul (AVX512-BF16 or AMX inside oneDNN): bf16 runs
  AmxTiles,     // nanscope's tile kernel (gemm_amx) on the processor's AMX: bf16 runs
  AmxEmulated,  // the same kernel on tiles emulated in C++ (slow): bf16 runs, tests
};
inline constexpr MatmulPath kAllMatmulPaths[] = {
    MatmulPath::Scalar, MatmulPath::Stream,   MatmulPath::Stream512,  MatmulPath::Blas,
    MatmulPath::OneDnn, MatmulPath::AmxTiles, MatmulPath::AmxEmulated};

// "scalar", "stream", "stream512", "blas", "onednn", "amx", "amx-emulated".
const char* path_name(MatmulPath p);
inline bool is_amx(MatmulPath p) {
  return p == MatmulPath::AmxTiles || p == MatmulPath::AmxEmulated;
}

// The AMX kernel's blocking (gemm_amx.cpp explains each choice). m and n multiples of 32, k a
// multiple of 32 or 0 (the whole K at once); other values are replaced by the defaults.
struct AmxTuning {
  int64_t m = 128, n = 128, k = 0;
  bool prefetch_b = true;  // software prefetch of the next step's B tiles into L1
  bool prefetch_a = true;  // the same for A, in the micro blocks that touch an A slice first
  bool n_outer = false;    // inside a block: columns outer (B slice stays), rows inner
  bool steal = true;       // blocks shared out with stealing (parallel_for_stealing)
};
bool valid(const AmxTuning& t);

// The AVX-512 streaming kernel's blocking (kernels.cpp): weight rows per block (1, 2, 4 or 8:
// the rows streamed side by side), a software prefetch distance in bytes ahead of each row (0:
// none, the hardware prefetchers alone), and whether a bf16 run's input is read as bf16 (its
// values are bf16 already: half the bytes in L1 beside the weights, the same products).
// NANSCOPE_DECODE=rows,prefetch[,x16].
struct DecodeTuning {
  int64_t rows = 4;
  int64_t prefetch = 1024;
  bool x16 = false;
};

// Where the AMX paths may run.
enum class AmxUse : uint8_t {
  Auto,      // on the processor's tiles where it has AMX
  Off,       // never (NANSCOPE_NO_AMX=1)
  Emulated,  // on emulated tiles, on every machine (NANSCOPE_AMX_EMULATE=1)
};

// The options of the kernels: every tuning knob of src/numerics in one struct.
struct Backend {
  int threads = 0;  // parallel_for's workers; 0: std::thread::hardware_concurrency()
  bool profile = false;
  AmxUse amx = AmxUse::Auto;
  bool onednn = true;      // bf16 products on oneDNN where it has a bf16 kernel and AMX is not used
  bool onednn_amx = true;  // raise oneDNN 2.6's ISA cap to AMX at its first use (see the table)
  AmxTuning amx_tuning;
  bool avx512 = true;  // few-token products on Stream512 where the processor has AVX-512
  DecodeTuning decode;
  // --device cuda: linear products write fp32 and are rounded after, instead of writing the run
  // dtype as torch's cuBLAS calls do (an experiment on the accumulation; NANSCOPE_CUDA_GEMM_F32).
  bool cuda_gemm_f32_out = false;
  bool cuda_graph = true;          // the 1-token decode step replayed as a CUDA graph
  bool cuda_step_times = false;    // each decode step's queueing and total time on stderr
  bool cuda_profile = false;       // time per phase of the GPU passes, on stderr at exit
  bool cuda_step_streams = false;  // fused step: k/v beside q, up beside gate (side streams)
  bool cuda_fuse = true;  // fused kernels of decode steps and hidden's passes (qkv, residual + norm)
  bool cuda_join = true;           // hidden's passes: one product of q/k/v, one of gate/up
  bool cuda_gemv = true;           // a decode step's products by the warp-per-row kernel
  bool cuda_flash = true;          // attention of hidden's passes in one tensor-core kernel
  // --device cuda: bytes of GPU memory the weights may hold (`--gpu-memory`); 0: no cap, every
  // weight stays on the GPU. Under a cap the layers that do not fit are copied in per pass from
  // page-locked host memory (src/cuda/weight_plan.hpp). Activations and caches come on top.
  uint64_t cuda_weight_cap = 0;
  // Tests and experiments: every product this path can compute runs on it, whatever its number
  // of tokens (the bf16-only paths take bf16 runs only; other runs keep the usual choice).
  // choose_*_path throws std::logic_error if this machine cannot run it (path_runs_here).
  std::optional<MatmulPath> force;
};

// The options from the environment (the table above). The only reader of these variables.
Backend backend_from_environment();

// The options in force: backend_from_environment() at the first call, or what set_backend put
// there. set_backend and ScopedBackend must not run while a kernel does (they are not
// synchronised with the workers); threads == 0 and invalid AMX tuning mean the defaults.
const Backend& backend();
void set_backend(const Backend& b);

// Replaces the options for its lifetime (tests: one path at a time), then restores them.
class ScopedBackend {
 public:
  explicit ScopedBackend(const Backend& b);
  ~ScopedBackend();
  ScopedBackend(const ScopedBackend&) = delete;
  ScopedBackend& operator=(const ScopedBackend&) = delete;

 private:
  Backend saved_;
};

// Processor features, each detected once at its first use.
bool has_amx_hardware();  // AMX-BF16 tiles, granted to the process by the kernel
bool has_onednn_bf16();   // a oneDNN bf16 matmul other than its reference loops
bool has_avx512();        // AVX-512 F/BW/VL/DQ, with the vector state enabled by the OS

// Whether this machine can run path p (Scalar, Stream, Blas, AmxEmulated: always), and if not
// why not ("no AMX on this processor", ...), for tests to report skipped paths.
bool path_runs_here(MatmulPath p, const char** why = nullptr);

// The path of a linear layer (x[tokens, K] @ W^T) in run dtype dt under options b:
//   force, where set and applicable;
//   bf16, tokens >= 32: AMX (tiles or emulated, per b.amx) if usable, else oneDNN if it has a
//     bf16 kernel, b.onednn, and the caller is not inside a parallel loop (oneDNN takes one caller
//     at a time) (measured on a Sapphire Rapids Xeon: 3-4x the fp32 path already at 128 tokens,
//     bench/bench_gemm.cpp);
//   tokens >= 16: OpenBLAS (compute-bound);
//   else the streaming kernel (memory-bound: the weights are read once), on AVX-512 where the
//     processor has it and b.avx512.
MatmulPath choose_linear_path(DType dt, int64_t tokens, const Backend& b = backend());

// The path of eager attention's q.k^T and p.v products (any number of rows): AMX (tiles or
// emulated) in bf16 runs where it is usable (q, k, p and v hold bf16 values), else OpenBLAS.
MatmulPath choose_attention_path(DType dt, const Backend& b = backend());

// The tiles the gemm_amx kernels run on under b: AmxTiles, AmxEmulated, or nullopt where the AMX
// paths are not used at all (the same rule choose_*_path apply).
std::optional<MatmulPath> amx_tiles(const Backend& b = backend());

}  // namespace nanscope
