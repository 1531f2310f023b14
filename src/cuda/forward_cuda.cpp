// The host side of the CUDA forward pass: weights uploaded once per (checkpoint, run dtype), the
// recipe of model/forward.cpp (norm; attention; optional norm; residual; norm; MLP; optional norm;
// residual) with cuBLAS products and the kernels of kernels.cu, and the observer's reports.
//
// Products are called as torch calls them on the GPU: x @ W^T as cublasGemmEx(T, N) with bf16 /
// fp16 / fp32 inputs and CUBLAS_COMPUTE_32F (no TF32), output in the run dtype; a product with a
// bias writes fp32 and adds the bias before its one rounding, as torch's cuBLASLt epilogue does.
// Eager attention's q.k^T and p.v are batched products (one matrix per sequence and head, k and v
// read at head h / (nH / nKV) as repeat_kv gives them), q.k^T kept in fp32 so that the observer
// sees the value that overflows fp16.
#include "cuda/forward_cuda.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>

#include "common/error.hpp"
#include "common/interrupt_check.hpp"
#include "cuda/kernels.hpp"
#include "cuda/weight_plan.hpp"
#include "model/adapter_overlay.hpp"
#include "model/forward.hpp"
#include "model/rope.hpp"
#include "model/weights.hpp"
#include "numerics/backend.hpp"
#include "numerics/parallel.hpp"

namespace nanscope {

bool cuda_built() {
  return true;
}

namespace {

using cuda::Dt;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(fmt::format("CUDA {}: {}", what, cudaGetErrorString(e)));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(fmt::format("cuBLAS {}: status {}", what, int(s)));
}

Dt dt_of(DType d) {
  return d == DType::BF16 ? Dt::BF16 : d == DType::F16 ? Dt::F16 : Dt::F32;
}
cudaDataType_t cuda_type(Dt d) {
  return d == Dt::BF16 ? CUDA_R_16BF : d == Dt::F16 ? CUDA_R_16F : CUDA_R_32F;
}

// NANSCOPE_CUDA_PROFILE=1: where the passes' time goes. mark(phase) closes the span since the
// previous mark: its GPU time from CUDA events on the legacy stream, and the host's time to get
// there (queueing, or waiting where a call synchronises). Summed per phase and printed at exit.
class Profile {
 public:
  static Profile& get() {
    static Profile p;
    return p;
  }
  bool on() const { return on_; }
  void begin() {
    if (!on_) return;
    n_ = 0;
    record("");
  }
  // Only inside begin() .. end(): the passes run on the legacy stream (a decode step's graph
  // is not split).
  void mark(const char* phase) {
    if (on_ && n_ > 0) record(phase);
  }
  // The GPU's time between the marks, once the pass's work is done.
  void end() {
    if (on_) ended_ = std::chrono::steady_clock::now();
    if (!on_ || n_ == 0) return;
    check(cudaEventSynchronize(ev_[n_ - 1]), "profile");
    for (size_t i = 1; i < n_; ++i) {
      float ms = 0;
      check(cudaEventElapsedTime(&ms, ev_[i - 1], ev_[i]), "profile");
      Sum& s = sums_[names_[i]];
      s.gpu_ms += ms;
      s.host_ms += std::chrono::duration<double, std::milli>(host_[i] - host_[i - 1]).count();
      ++s.count;
    }
    n_ = 0;
  }
  // At a pass's start: the host's time since the previous pass ended (the caller's work
  // between passes: inputs, embeddings, the observer's), while the GPU has nothing queued.
  void between() {
    if (on_ && ended_ != std::chrono::steady_clock::time_point{})
      host("between passes (host)",
           std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - ended_)
               .count());
  }
  // A pass that ended by an error leaves its marks open: a graph capture must not record them.
  void reset() { n_ = 0; }
  // Host time outside the marked spans (a pass's set-up, the weights' upload).
  void host(const char* phase, double ms) {
    if (!on_) return;
    Sum& s = sums_[phase];
    s.host_ms += ms;
    ++s.count;
  }
  ~Profile() {
    if (!on_ || sums_.empty()) return;
    double g = 0, h = 0;
    for (const auto& [name, s] : sums_) g += s.gpu_ms, h += s.host_ms;
    std::fprintf(stderr, "cuda profile: %-28s %10s %10s %8s\n", "phase", "gpu_ms", "host_ms",
                 "count");
    for (const auto& [name, s] : sums_)
      std::fprintf(stderr, "cuda profile: %-28s %10.2f %10.2f %8lld\n", name.c_str(), s.gpu_ms,
                   s.host_ms, static_cast<long long>(s.count));
    std::fprintf(stderr, "cuda profile: %-28s %10.2f %10.2f\n", "total", g, h);
    for (cudaEvent_t e : ev_) cudaEventDestroy(e);
  }

 private:
  Profile() : on_(backend().cuda_profile) {}
  void record(const char* phase) {
    if (n_ == ev_.size()) {
      cudaEvent_t e = nullptr;
      check(cudaEventCreate(&e), "profile");
      ev_.push_back(e);
      host_.emplace_back();
      names_.emplace_back();
    }
    check(cudaEventRecord(ev_[n_], nullptr), "profile");
    host_[n_] = std::chrono::steady_clock::now();
    names_[n_] = phase;
    ++n_;
  }
  struct Sum {
    double gpu_ms = 0, host_ms = 0;
    int64_t count = 0;
  };
  bool on_ = false;
  std::vector<cudaEvent_t> ev_;
  std::vector<std::chrono::steady_clock::time_point> host_;
  std::vector<std::string> names_;
  size_t n_ = 0;
  std::map<std::string, Sum> sums_;
  std::chrono::steady_clock::time_point ended_{};
};

void mark(const char* phase) {
  Profile::get().mark(phase);
}

// Device memory, freed with its owner.
class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) check(cudaMalloc(&p_, bytes), "cudaMalloc");
  }
  ~DevBuf() {
    if (p_ != nullptr && own_) cudaFree(p_);
  }
  DevBuf(DevBuf&& o) noexcept : p_(std::exchange(o.p_, nullptr)), bytes_(o.bytes_), own_(o.own_) {}
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    std::swap(own_, o.own_);
    return *this;
  }
  // The first `bytes` of this memory, not freed with the view (pass_pool).
  DevBuf view(size_t bytes) const {
    DevBuf v;
    v.p_ = p_, v.bytes_ = bytes, v.own_ = false;
    return v;
  }
  // This view from byte `at` on.
  DevBuf offset(size_t at) const {
    DevBuf v;
    v.p_ = static_cast<char*>(p_) + at, v.bytes_ = bytes_ - at, v.own_ = false;
    return v;
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void* get() const { return p_; }
  float* f() const { return static_cast<float*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
  bool own_ = true;
};

// Page-locked host bytes: sources of copies that must not wait for the GPU (cudaMemcpyAsync
// from pageable memory is staged synchronously), and hidden states coming back at the copy
// engine's full rate.
class PinnedBytes {
 public:
  PinnedBytes() = default;
  explicit PinnedBytes(size_t n) : n_(n) {
    if (n > 0) check(cudaMallocHost(&p_, n), "cudaMallocHost");
  }
  ~PinnedBytes() {
    if (p_ != nullptr && own_) cudaFreeHost(p_);
  }
  PinnedBytes(PinnedBytes&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(o.n_), own_(o.own_) {}
  PinnedBytes& operator=(PinnedBytes&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(own_, o.own_);
    return *this;
  }
  PinnedBytes view(size_t n) const {
    PinnedBytes v;
    v.p_ = p_, v.n_ = n, v.own_ = false;
    return v;
  }
  size_t size() const { return n_; }
  PinnedBytes(const PinnedBytes&) = delete;
  PinnedBytes& operator=(const PinnedBytes&) = delete;
  void* get() const { return p_; }
  float* f() const { return static_cast<float*>(p_); }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
  bool own_ = true;
};

// The buffers of the passes without a key/value cache (hidden's batches, trace, check), kept
// for the next one: allocating a batch's ~2.5 GB of device memory and its page-locked state
// buffer took ~50 ms per 8,192-token batch of Qwen3-4B. Such passes run one at a time; a pass
// with a cache owns its buffers (generate's prompt and step passes are alive together).
struct PassPool {
  std::vector<DevBuf> dev;
  std::vector<PinnedBytes> pinned;
};
PassPool& pass_pool() {
  static PassPool p;
  return p;
}

inline size_t view_size(const DevBuf& b) {
  return b.bytes();
}
inline size_t view_size(const PinnedBytes& b) {
  return b.size();
}

template <typename Buf>
Buf pooled_buffer(std::vector<Buf>& pool, size_t slot, size_t bytes) {
  if (pool.size() <= slot) pool.resize(slot + 1);
  Buf& b = pool[slot];
  if (b.get() == nullptr || view_size(b) < bytes) {
    // A quarter more than the last: hidden's batches differ by a few tokens each, and a
    // growing buffer was a new cudaMalloc / cudaMallocHost at every slightly larger batch.
    const size_t grown = b.get() == nullptr ? bytes : std::max(bytes, view_size(b) / 4 * 5);
    b = Buf();  // the old memory first
    b = Buf(grown);
  }
  return b.view(bytes);
}

// Host-to-device copies of weights through two page-locked buffers: the OpenMP workers copy the
// mapping's pages into one while the other's DMA runs. A cudaMemcpy from the pageable mapping
// moved 6.6 GB/s on the H200 machine (1.2 s of an 8 GB model's first pass).
class Uploader {
 public:
  Uploader() {
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream");
    for (int b = 0; b < 2; ++b) {
      buf_[b] = PinnedBytes(kChunk);
      check(cudaEventCreateWithFlags(&done_[b], cudaEventDisableTiming), "event");
    }
  }
  ~Uploader() {
    for (cudaEvent_t e : done_) cudaEventDestroy(e);
    cudaStreamDestroy(stream_);
  }
  Uploader(const Uploader&) = delete;
  Uploader& operator=(const Uploader&) = delete;

  // dst (device) holds the bytes when this returns.
  void copy(void* dst, const void* src, size_t bytes) {
    for (size_t off = 0, i = 0; off < bytes; off += kChunk, ++i) {
      const size_t n = std::min(kChunk, bytes - off), b = i % 2;
      check(cudaEventSynchronize(done_[b]), "weights upload");  // this buffer's last DMA is done
      char* to = static_cast<char*>(buf_[b].get());
      const char* from = static_cast<const char*>(src) + off;
      parallel_for(int64_t(n), int64_t(1) << 20, [&](int64_t lo, int64_t hi) {
        std::memcpy(to + lo, from + lo, size_t(hi - lo));
      });
      check(cudaMemcpyAsync(static_cast<char*>(dst) + off, to, n, cudaMemcpyHostToDevice, stream_),
            "weights upload");
      check(cudaEventRecord(done_[b], stream_), "weights upload");
    }
    check(cudaStreamSynchronize(stream_), "weights upload");
  }

 private:
  static constexpr size_t kChunk = size_t(64) << 20;
  PinnedBytes buf_[2];
  cudaEvent_t done_[2] = {};
  cudaStream_t stream_ = nullptr;
};

Uploader& uploader() {
  static Uploader u;
  return u;
}

struct DevMat {
  DevBuf buf;  // [rows, cols] in the run dtype's storage
  int64_t rows = 0, cols = 0;
};
struct DevVec {
  DevBuf buf;  // fp32 values in the run dtype
  int64_t n = 0;
  const float* data() const { return n > 0 ? buf.f() : nullptr; }
  bool empty() const { return n == 0; }
};

struct DevLayer {
  DevVec input_norm, attn_out_norm, mlp_in_norm, mlp_out_norm, q_norm, k_norm;
  DevMat q, k, v, o, gate, up, down;
  DevVec q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias;
  // q, k, v and gate, up as one matrix each where they lie end to end (joined; else empty): one
  // product of their input instead of three or two (pass_layer).
  DevMat qkv, gate_up;
  DevBuf block;  // a resident layer's matrices (views of it), one allocation (upload_layer)
};

// The matrices ms as one [sum of rows, cols] view where each starts where the one before ends
// (a layer's block puts them so when their sizes are multiples of its alignment); else empty.
DevMat joined(std::initializer_list<const DevMat*> ms, size_t eb) {
  DevMat j;
  const DevMat& first = **ms.begin();
  const char* at = static_cast<const char*>(first.buf.get());
  for (const DevMat* m : ms) {
    if (m->buf.get() != at || m->cols != first.cols || m->rows == 0) return DevMat{};
    at += size_t(m->rows * m->cols) * eb;
    j.rows += m->rows;
  }
  j.cols = first.cols;
  j.buf = first.buf.view(size_t(j.rows * j.cols) * eb);
  return j;
}
void join_layer(DevLayer& d, size_t eb) {
  d.qkv = joined({&d.q, &d.k, &d.v}, eb);
  d.gate_up = joined({&d.gate, &d.up}, eb);
}

// An adapter's LoRA branch on one product, applied unmerged as PeftModel computes it (fp32 weights,
// autocast_adapter_dtype): out = round(out + ((x A^T) B^T) * scale), x the product's input in fp32.
// B holds the rows of this product (a fused qkv_proj / gate_up_proj hands out row ranges).
struct DevLora {
  DevBuf A, B;  // [r, in], [rows, r], fp32
  DevBuf bias;  // lora_B's bias [rows] (lora_bias), or none
  DevBuf m;     // DoRA: magnitude / ||W + scale B A|| per row [rows], or none
  int64_t r = 0, in = 0, rows = 0;
  float scale = 1.0f;
  bool empty() const { return r == 0; }
};
// An embedding LoRA for the rows a decode step gathers on the GPU: A^T [vocab, r] (the rows
// F.embedding picks), B [H, r], fp32.
struct DevEmbedLora {
  DevBuf At, B;
  int64_t r = 0;
  float scale = 1.0f;
};
struct LayerLora {
  DevLora q, k, v, o, gate, up, down;
};

// A layer's matrices on the GPU beside the host weights they come from, in the order of a
// streamed layer's block (host and slot alike); its vectors (norms, biases) likewise.
struct MatPair {
  DevMat DevLayer::*dev;
  WeightView LayerWeights::*host;
};
constexpr MatPair kMats[] = {
    {&DevLayer::q, &LayerWeights::q},       {&DevLayer::k, &LayerWeights::k},
    {&DevLayer::v, &LayerWeights::v},       {&DevLayer::o, &LayerWeights::o},
    {&DevLayer::gate, &LayerWeights::gate}, {&DevLayer::up, &LayerWeights::up},
    {&DevLayer::down, &LayerWeights::down}};
struct VecPair {
  DevVec DevLayer::*dev;
  Activations LayerWeights::*host;
};
constexpr VecPair kVecs[] = {{&DevLayer::input_norm, &LayerWeights::input_norm},
                             {&DevLayer::attn_out_norm, &LayerWeights::attn_out_norm},
                             {&DevLayer::mlp_in_norm, &LayerWeights::mlp_in_norm},
                             {&DevLayer::mlp_out_norm, &LayerWeights::mlp_out_norm},
                             {&DevLayer::q_norm, &LayerWeights::q_norm},
                             {&DevLayer::k_norm, &LayerWeights::k_norm},
                             {&DevLayer::q_bias, &LayerWeights::q_bias},
                             {&DevLayer::k_bias, &LayerWeights::k_bias},
                             {&DevLayer::v_bias, &LayerWeights::v_bias},
                             {&DevLayer::o_bias, &LayerWeights::o_bias},
                             {&DevLayer::gate_bias, &LayerWeights::gate_bias},
                             {&DevLayer::up_bias, &LayerWeights::up_bias},
                             {&DevLayer::down_bias, &LayerWeights::down_bias}};

// --gpu-memory (weight_plan.hpp): the streamed layers' matrices in page-locked host memory and
// the two slots on the GPU they are copied into, on a stream of their own. A slot is filled only
// after the compute stream has passed its `free` event (recorded once its layer's launches are
// queued), and the compute stream waits for its `ready` event before the layer that reads it:
// the copies of the next streamed layer run while the layers before it compute.
class Streamer {
 public:
  struct HostLayer {
    PinnedBytes bytes;                  // the matrices at kSlotAlign offsets
    size_t off[std::size(kMats)] = {};  // each matrix's offset in the block
    int64_t rows[std::size(kMats)] = {}, cols[std::size(kMats)] = {};
    size_t used = 0;
    size_t eb = 2;  // the run dtype's bytes per element
  };
  Streamer(const GpuWeightPlan& plan, size_t layers) : plan_(plan), host_(layers) {
    check(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking), "stream");
    for (Slot& s : slot_) {
      s.buf = DevBuf(size_t(plan.slot_bytes));
      check(cudaEventCreateWithFlags(&s.ready, cudaEventDisableTiming), "event");
      check(cudaEventCreateWithFlags(&s.free, cudaEventDisableTiming), "event");
    }
  }
  ~Streamer() {
    cudaStreamSynchronize(copy_);
    for (Slot& s : slot_) {
      cudaEventDestroy(s.ready);
      cudaEventDestroy(s.free);
    }
    cudaStreamDestroy(copy_);
  }
  Streamer(const Streamer&) = delete;
  Streamer& operator=(const Streamer&) = delete;

  bool streamed(int64_t l) const { return plan_.streamed[size_t(l)]; }
  const GpuWeightPlan& plan() const { return plan_; }
  HostLayer& host(int64_t l) { return host_[size_t(l)]; }

  // Layer l's weights for launches queued on the compute stream `cs` from now on: `resident` (its
  // vectors, and its matrices where it is not streamed) or its slot's view. Releases the slot of
  // the streamed layer acquired before (every launch of it is queued by now).
  const DevLayer& acquire(int64_t l, const DevLayer& resident, cudaStream_t cs,
                          const std::vector<DevLayer>& layers) {
    release(cs, layers);
    if (!streamed(l)) return resident;
    int s = slot_[0].layer == l ? 0 : slot_[1].layer == l ? 1 : -1;
    if (s < 0) {  // the first pass, or one after a pass that stopped early
      s = 0;
      fill(0, l, layers);
    }
    const int64_t n = next(l);
    if (n != l && slot_[1 - s].layer != n) fill(1 - s, n, layers);
    check(cudaStreamWaitEvent(cs, slot_[s].ready), "weights stream");
    pending_ = s;
    return slot_[s].view;
  }
  // The pass's launches are queued: the last streamed layer's slot may be refilled (with the
  // layers the next pass needs first).
  void release(cudaStream_t cs, const std::vector<DevLayer>& layers) {
    if (pending_ < 0) return;
    const int p = pending_;
    pending_ = -1;
    check(cudaEventRecord(slot_[p].free, cs), "weights stream");
    const int64_t upcoming = slot_[1 - p].layer;
    if (upcoming < 0) return;
    const int64_t n = next(upcoming);
    if (n != upcoming && slot_[p].layer != n) fill(p, n, layers);
  }

 private:
  struct Slot {
    DevBuf buf;
    int64_t layer = -1;  // the layer whose matrices it holds, or is being filled with
    DevLayer view;       // that layer's vectors (resident) and its matrices here
    cudaEvent_t ready = nullptr, free = nullptr;
  };

  // The streamed layer after l, wrapping to the first (the next pass's).
  int64_t next(int64_t l) const {
    const int64_t n = int64_t(plan_.streamed.size());
    for (int64_t i = 1; i <= n; ++i)
      if (streamed((l + i) % n)) return (l + i) % n;
    return l;
  }

  void fill(int s, int64_t l, const std::vector<DevLayer>& layers) {
    Slot& slot = slot_[s];
    const HostLayer& h = host_[size_t(l)];
    check(cudaStreamWaitEvent(copy_, slot.free), "weights stream");
    check(cudaMemcpyAsync(slot.buf.get(), h.bytes.get(), h.used, cudaMemcpyHostToDevice, copy_),
          "weights stream");
    check(cudaEventRecord(slot.ready, copy_), "weights stream");
    slot.layer = l;
    const DevLayer& r = layers[size_t(l)];
    DevLayer& v = slot.view;
    for (const VecPair& p : kVecs) {
      (v.*p.dev).buf = (r.*p.dev).buf.view((r.*p.dev).buf.bytes());
      (v.*p.dev).n = (r.*p.dev).n;
    }
    for (size_t m = 0; m < std::size(kMats); ++m) {
      DevMat& d = v.*kMats[m].dev;
      d.rows = h.rows[m], d.cols = h.cols[m];
      d.buf = slot.buf.view(h.used).offset(h.off[m]);
    }
    join_layer(v, h.eb);
  }

  GpuWeightPlan plan_;
  std::vector<HostLayer> host_;  // empty blocks for the resident layers
  Slot slot_[2];
  int pending_ = -1;  // the slot whose layer's launches are being queued
  cudaStream_t copy_ = nullptr;
};

// A checkpoint's weights on the GPU in one run dtype. Kept between passes (hidden runs one
// pass per batch; trace's fp32 shadow pass replaces them).
struct DevModel {
  std::string key;
  std::vector<DevLayer> layers;  // a streamed layer: its vectors only (Streamer has its matrices)
  DevVec final_norm;
  DevMat lm_head;
  DevMat embed;  // decoding of an untied model only (device_embed); tied: lm_head is the table
  uint64_t weight_bytes = 0;
  std::unique_ptr<Streamer> stream;  // under --gpu-memory, when some layers do not fit
  std::vector<LayerLora> lora;       // per layer with an adapter (ForwardOptions::adapter)
  DevLora lm_head_lora;
  DevEmbedLora embed_lora;               // decoding (device_embed)
  bool embed_adapted = false;            // embed holds a DoRA-adapted table (device_embed)
  int64_t lora_rank = 0, lora_rows = 0;  // the largest r and output rows (the passes' scratch)
  bool own_head = false;               // a tied model whose adapter saved lm_head (modules_to_save)
  std::set<std::string> lora_modules;  // the adapter's modules applied here

  // Layer l's weights for the launches queued on `cs` from now on (Streamer::acquire).
  const DevLayer& layer(int64_t l, cudaStream_t cs = nullptr) {
    return stream ? stream->acquire(l, layers[size_t(l)], cs, layers) : layers[size_t(l)];
  }
  // After a pass's last layer: its slot may be refilled for the next pass.
  void layers_done(cudaStream_t cs = nullptr) {
    if (stream) stream->release(cs, layers);
  }
};

// Staging for weights that need converting (storage dtype other than the run dtype). into: the
// memory it goes to (a view, at least its bytes), else its own allocation.
DevMat upload(const WeightView& w, DType run, const DevBuf* into = nullptr) {
  const Dt dt = dt_of(run);
  DevMat m;
  m.rows = w.rows, m.cols = w.cols;
  const size_t n = size_t(w.rows * w.cols), eb = size_t(cuda::dt_bytes(dt));
  m.buf = into != nullptr ? into->view(n * eb) : DevBuf(n * eb);
  if (n == 0) return m;
  if (w.storage == run) {  // already in the run dtype: the bytes as they are
    uploader().copy(m.buf.get(), w.data, n * eb);
    return m;
  }
  // The stored bytes go up as they are and are cast on the GPU (transformers' cast at load, round
  // to nearest even as the CPU pass's weight_rows): a bf16 checkpoint's fp32 or fp16 run moves
  // 2 bytes per weight over the bus instead of the 4 of a host-side cast.
  const Dt sdt = dt_of(w.storage);
  DevBuf raw(n * size_t(cuda::dt_bytes(sdt)));
  uploader().copy(raw.get(), w.data, raw.bytes());
  cuda::convert(raw.get(), sdt, m.buf.get(), dt, int64_t(n));
  check(cudaDeviceSynchronize(), "weights upload");
  return m;
}

DevVec upload(const Activations& v) {
  DevVec d;
  d.n = int64_t(v.size());
  d.buf = DevBuf(v.size() * sizeof(float));
  if (!v.empty())
    check(cudaMemcpy(d.buf.get(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice),
          "upload");
  return d;
}

// Shared: a decoder's key/value cache (forward_cuda_step) keeps its model alive.
std::shared_ptr<DevModel>& model_cache() {
  static std::shared_ptr<DevModel> cached;
  return cached;
}

// A streamed layer's matrices into its page-locked block, in the run dtype: the bytes as they
// are, or cast on the GPU as upload() casts them and copied back (the same bits either way).
void stage_streamed(const LayerWeights& w, DType run, Streamer::HostLayer& h) {
  const size_t eb = size_t(cuda::dt_bytes(dt_of(run)));
  size_t at = 0;
  for (size_t m = 0; m < std::size(kMats); ++m) {
    const WeightView& v = w.*kMats[m].host;
    h.off[m] = at;
    h.rows[m] = v.rows, h.cols[m] = v.cols;
    at += (size_t(v.rows * v.cols) * eb + kSlotAlign - 1) / kSlotAlign * kSlotAlign;
  }
  h.used = at;
  h.eb = eb;
  h.bytes = PinnedBytes(at);
  for (size_t m = 0; m < std::size(kMats); ++m) {
    const WeightView& v = w.*kMats[m].host;
    const size_t n = size_t(v.rows * v.cols) * eb;
    char* to = static_cast<char*>(h.bytes.get()) + h.off[m];
    if (v.storage == run) {
      const char* from = reinterpret_cast<const char*>(v.data);
      parallel_for(int64_t(n), int64_t(1) << 20, [&](int64_t lo, int64_t hi) {
        std::memcpy(to + lo, from + lo, size_t(hi - lo));
      });
    } else {
      const DevMat d = upload(v, run);
      check(cudaMemcpy(to, d.buf.get(), n, cudaMemcpyDeviceToHost), "weights staging");
    }
  }
}

// A resident layer's matrices into one allocation at kSlotAlign offsets, as a streamed layer's
// slot has them (joined finds q/k/v and gate/up end to end there too).
void upload_layer(const LayerWeights& w, DType run, DevLayer& d) {
  const size_t eb = size_t(cuda::dt_bytes(dt_of(run)));
  size_t off[std::size(kMats)], at = 0;
  for (size_t m = 0; m < std::size(kMats); ++m) {
    const WeightView& v = w.*kMats[m].host;
    off[m] = at;
    at += (size_t(v.rows * v.cols) * eb + kSlotAlign - 1) / kSlotAlign * kSlotAlign;
  }
  d.block = DevBuf(at);
  for (size_t m = 0; m < std::size(kMats); ++m) {
    const DevBuf to = d.block.offset(off[m]);
    d.*kMats[m].dev = upload(w.*kMats[m].host, run, &to);
  }
  join_layer(d, eb);
}

// The adapter's weights file, for messages.
std::string adapter_file(const AdapterOverlay& ov) {
  return (ov.adapter().dir() / "adapter_model.safetensors").string();
}

// decode: the passes of generate (an untied model's embedding table joins the weights).
std::shared_ptr<DevModel> device_model(const Checkpoint& ck, const ModelSpec& spec,
                                       const ForwardOptions& opt, bool decode) {
  const uint64_t cap = backend().cuda_weight_cap;
  const std::string key = fmt::format(
      "{}|{}|{}|{}|{}|{}", ck.dir().string(), dtype_name(opt.dtype), static_cast<const void*>(&ck),
      cap, cap > 0 && decode && !spec.tied, static_cast<const void*>(opt.adapter));
  std::shared_ptr<DevModel>& cached = model_cache();
  if (cached && cached->key == key) return cached;
  cached.reset();  // free the previous model's memory first
  auto m = std::make_shared<DevModel>();
  m->key = key;
  const int64_t H = spec.hidden;
  const GpuWeightPlan plan = plan_gpu_weights(spec, opt.dtype, decode, cap);
  if (plan.streamed_layers() > 0) {
    m->stream = std::make_unique<Streamer>(plan, spec.layers.size());
    std::fprintf(stderr,
                 "nanscope: --gpu-memory %s: %lld of %zu layers streamed from host memory through "
                 "two slots of %s; %s of weights stay on the GPU\n",
                 format_bytes(cap).c_str(), static_cast<long long>(plan.streamed_layers()),
                 spec.layers.size(), format_bytes(plan.slot_bytes).c_str(),
                 format_bytes(plan.resident_bytes).c_str());
  }
  WeightSource ws(ck, opt.dtype, opt.release_pages, opt.adapter);
  const AdapterOverlay* ov = opt.adapter;
  // count: a decoder layer's (the passes size their scratch for those; lm_head's is apart).
  // w_full: the module's whole base weight as the run dtype reads it (DoRA's norms).
  const auto lora = [&](const std::string& module, const WeightView& w_full, int64_t row0,
                        int64_t rows, bool count = true) {
    DevLora d;
    const LoraBranch* b = ov != nullptr ? ov->lora(module) : nullptr;
    if (b == nullptr) return d;
    m->lora_modules.insert(module);
    const auto rows_up = [&](const float* v) {
      DevBuf x(size_t(rows) * sizeof(float));
      check(cudaMemcpy(x.get(), v + row0, x.bytes(), cudaMemcpyHostToDevice), "upload");
      return x;
    };
    if (!b->magnitude.empty()) d.m = rows_up(ov->dora_scale(*b, w_full, opt.dtype).data());
    if (!b->bias.empty()) d.bias = rows_up(b->bias.data());
    d.r = b->r, d.in = b->in, d.rows = rows, d.scale = b->scale;
    d.A = DevBuf(b->A.size() * sizeof(float));
    d.B = DevBuf(size_t(rows * b->r) * sizeof(float));
    check(cudaMemcpy(d.A.get(), b->A.data(), d.A.bytes(), cudaMemcpyHostToDevice), "upload");
    check(cudaMemcpy(d.B.get(), b->B.data() + row0 * b->r, d.B.bytes(), cudaMemcpyHostToDevice),
          "upload");
    if (count) {
      m->lora_rank = std::max(m->lora_rank, d.r);
      m->lora_rows = std::max(m->lora_rows, rows);
    }
    return d;
  };
  for (const LayerSpec& s : spec.layers) {
    const LayerWeights w = ws.layer(s, H);
    if (ov != nullptr) {
      const LayerNames& n = s.names;
      const std::string& p = n.prefix;
      const int64_t qd = s.attn.heads * s.attn.head_dim, kvd = s.attn.kv_heads * s.attn.head_dim,
                    I = s.mlp.intermediate;
      const bool fq = s.attn.fused_qkv, fg = s.mlp.fused_gate_up;
      LayerLora L;
      L.q = lora(fq ? n.qkv_proj : p + "self_attn.q_proj", fq ? w.qkv : w.q, 0, qd);
      L.k = lora(fq ? n.qkv_proj : p + "self_attn.k_proj", fq ? w.qkv : w.k, fq ? qd : 0, kvd);
      L.v =
          lora(fq ? n.qkv_proj : p + "self_attn.v_proj", fq ? w.qkv : w.v, fq ? qd + kvd : 0, kvd);
      L.o = lora(n.o_proj, w.o, 0, H);
      L.gate = lora(fg ? n.gate_up_proj : n.gate(), fg ? w.gate_up : w.gate, 0, I);
      L.up = lora(fg ? n.gate_up_proj : n.up(), fg ? w.gate_up : w.up, fg ? I : 0, I);
      L.down = lora(n.down(), w.down, 0, H);
      m->lora.push_back(std::move(L));
    }
    DevLayer d;
    for (const VecPair& p : kVecs) d.*p.dev = upload(w.*p.host);
    if (plan.streamed[size_t(s.index)])
      stage_streamed(w, opt.dtype, m->stream->host(s.index));
    else
      upload_layer(w, opt.dtype, d);
    m->layers.push_back(std::move(d));
    ws.release_all();
  }
  m->final_norm = upload(ws.vector(spec.final_norm, "weight", H));
  // A tied model's lm_head is the embedding, unless the adapter saved a trained copy of it
  // (modules_to_save), which PeftModel then uses instead (as model/forward.cpp).
  m->own_head = ov != nullptr && ov->replacement(spec.lm_head + ".weight").has_value();
  const WeightView lm =
      ws.matrix(spec.tied && !m->own_head ? spec.embed : spec.lm_head, spec.vocab, H);
  m->lm_head = upload(lm, opt.dtype);
  m->lm_head_lora = lora(spec.lm_head, lm, 0, spec.vocab, false);
  // Every LoRA of the adapter must be one this path applies (the embedding's: the host's, or
  // device_embed's for decoding): another would give the bare model's numbers under its name.
  if (ov != nullptr)
    for (const auto& [module, unused] : ov->plan().lora)
      if (ov->lora(module) != nullptr && module != spec.embed && !m->lora_modules.contains(module))
        fail(
            "{}: module {} has a LoRA that --device cuda does not apply unmerged; use --device "
            "cpu, or merge it with `nanscope merge`",
            adapter_file(*ov), module);
  ws.release_all();
  m->weight_bytes = ws.bytes_read();
  cached = std::move(m);
  return cached;
}

// The embedding table in the run dtype for decoding on the GPU (forward_cuda_step gathers its
// rows there): lm_head's for a tied model, else uploaded once beside it.
const DevMat& device_embed(DevModel& m, const Checkpoint& ck, const ModelSpec& spec,
                           const ForwardOptions& opt) {
  const AdapterOverlay* ov = opt.adapter;
  if (m.embed_adapted) return m.embed;
  if (ov != nullptr && m.embed_lora.r == 0)
    if (const LoraBranch* b = ov->lora(spec.embed)) {
      if (spec.embed_scale)  // the host refuses it too (Model::check_adapter_modules)
        fail(
            "{}: generate --device cuda does not apply a LoRA on Gemma's scaled embedding "
            "unmerged; merge the adapter with `nanscope merge`",
            adapter_file(*ov));
      if (!b->magnitude.empty()) {
        // DoRA: a row is a function of its id alone, through norms over the whole table, so the
        // table PeftModel reads rows from is made once, by the host pass's own embedding
        // (trainable tokens, then the DoRA), and uploaded in the run dtype (tied or not).
        const int64_t V = spec.vocab, H = spec.hidden, kChunk = 4096;
        const Dt dt = dt_of(opt.dtype);
        const size_t eb = size_t(cuda::dt_bytes(dt));
        m.embed.buf = DevBuf(size_t(V * H) * eb);
        m.embed.rows = V, m.embed.cols = H;
        ForwardOptions host = opt;
        host.device = Device::Cpu;
        DevBuf f(size_t(std::min(V, kChunk) * H) * sizeof(float));
        std::vector<int64_t> ids;
        for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
          const int64_t n = std::min(kChunk, V - v0);
          ids.resize(size_t(n));
          std::iota(ids.begin(), ids.end(), v0);
          const std::vector<float> rows = embed_ids(ck, ids, host);
          check(
              cudaMemcpy(f.get(), rows.data(), rows.size() * sizeof(float), cudaMemcpyHostToDevice),
              "upload");
          cuda::to_storage(f.f(), static_cast<char*>(m.embed.buf.get()) + size_t(v0 * H) * eb,
                           n * H, dt);
        }
        check(cudaDeviceSynchronize(), "upload");
        m.embed_adapted = true;
        return m.embed;
      }
      const int64_t V = b->in, r = b->r;
      std::vector<float> at(size_t(V * r));  // A [r, V] -> A^T [V, r]
      for (int64_t k = 0; k < r; ++k)
        for (int64_t v = 0; v < V; ++v) at[size_t(v * r + k)] = b->A[size_t(k * V + v)];
      DevEmbedLora& e = m.embed_lora;
      e.At = DevBuf(at.size() * sizeof(float));
      e.B = DevBuf(b->B.size() * sizeof(float));
      check(cudaMemcpy(e.At.get(), at.data(), e.At.bytes(), cudaMemcpyHostToDevice), "upload");
      check(cudaMemcpy(e.B.get(), b->B.data(), e.B.bytes(), cudaMemcpyHostToDevice), "upload");
      e.r = r, e.scale = b->scale;
    }
  const TokenRows* tr = ov != nullptr ? ov->token_rows(spec.embed + ".weight") : nullptr;
  if (spec.tied && !m.own_head) {
    if (tr != nullptr)  // AdapterOverlay::open refuses these; the shared table must stay as it is
      throw std::logic_error("device_embed: trainable tokens on a tied table");
    return m.lm_head;
  }
  if (m.embed.buf.get() == nullptr) {
    WeightSource ws(ck, opt.dtype, opt.release_pages, opt.adapter);
    m.embed = upload(ws.matrix(spec.embed, spec.vocab, spec.hidden), opt.dtype);
    ws.release_all();
    if (tr != nullptr) {  // the trained rows replace theirs, in the run dtype (as on the host)
      const TensorRef vals = *ov->token_values(spec.embed + ".weight");
      const WeightView vw{vals.bytes().data(), vals.info->dtype, vals.info->shape[0],
                          vals.info->shape[1]};
      const int64_t H = spec.hidden;
      const size_t eb = size_t(cuda::dt_bytes(dt_of(opt.dtype)));
      std::vector<float> row(static_cast<size_t>(H));
      DevBuf f(size_t(H) * sizeof(float));
      for (size_t i = 0; i < tr->rows.size(); ++i) {
        weight_rows(vw, int64_t(i), 1, opt.dtype, row.data());
        check(cudaMemcpy(f.get(), row.data(), f.bytes(), cudaMemcpyHostToDevice), "upload");
        cuda::to_storage(f.f(),
                         static_cast<char*>(m.embed.buf.get()) + size_t(tr->rows[i] * H) * eb, H,
                         dt_of(opt.dtype));
      }
      check(cudaDeviceSynchronize(), "upload");
    }
  }
  return m.embed;
}

cublasHandle_t blas() {
  static cublasHandle_t h = [] {
    cublasHandle_t x = nullptr;
    check(cublasCreate(&x), "cublasCreate");
    return x;
  }();
  return h;
}

// Two more streams, each with a cuBLAS handle of its own (one handle's workspace must not be
// used by two streams at once), for a decode step's independent products: k and v beside q, up
// beside gate. Alone, each of these matrix-vector products leaves most of the GPU idle; the
// same calls on other streams compute the same bits.
struct SideStreams {
  cudaStream_t s[2] = {};
  cublasHandle_t h[2] = {};
  SideStreams() {
    for (int i = 0; i < 2; ++i) {
      check(cudaStreamCreateWithFlags(&s[i], cudaStreamNonBlocking), "stream");
      check(cublasCreate(&h[i]), "cublasCreate");
      check(cublasSetStream(h[i], s[i]), "cublasSetStream");
    }
  }
};
SideStreams& side_streams() {
  static SideStreams s;
  return s;
}

void require_device() {
  static const bool ok = [] {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
      fail(
          "--device cuda: no usable CUDA device ({}); run on a machine with an NVIDIA GPU and "
          "its driver, or use --device cpu",
          e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    return true;
  }();
  (void)ok;
}

struct Stop {};

// The keys (after RoPE) and values of the positions run so far, per layer, on the GPU: rows
// [0, cap) of [cap, kv_heads * head_dim]. Every position is kept; a sliding-window layer reads
// only the last window - 1 before the new tokens, which is what transformers' cache keeps.
struct DevCache {
  int64_t cap = 0;
  int64_t past = 0;          // positions written
  std::vector<DevBuf> k, v;  // the run dtype's storage (the products' inputs)
  std::vector<DevBuf> vf;    // v in fp32 (the fused kernel reads it so)
};

// One sequence of a batch: rows [off, off + len).
struct Seg {
  int64_t off = 0, len = 0;
};

class Pass {
 public:
  // cache: one sequence whose keys and values go to (and are read from) the GPU cache; the
  // logits are then the last row's only (generate's logits_to_keep = 1).
  Pass(const Checkpoint& ck, const ModelSpec& spec, std::span<const int64_t> lengths,
       const ForwardOptions& opt, Observer* obs, bool sites, DevCache* cache = nullptr)
      : c_(ck.config()),
        spec_(spec),
        dtype_(opt.dtype),
        dt_(dt_of(opt.dtype)),
        att_(opt.attention),
        obs_(obs),
        sites_(sites && obs != nullptr),
        f32_out_(backend().cuda_gemm_f32_out || opt.dtype == DType::F32),
        dm_keep_(device_model(ck, spec, opt, cache != nullptr)),
        dm_(*dm_keep_),
        cache_(cache) {
    host_ = pinned(static_cast<size_t>(std::accumulate(lengths.begin(), lengths.end(), int64_t(0)) *
                                       spec.hidden) *
                   sizeof(float));
    for (int64_t len : lengths) {
      segs_.push_back({T_, len});
      T_ += len;
      maxT_ = std::max(maxT_, len);
    }
    H_ = spec.hidden;
    V_ = spec.vocab;
    int64_t qd = 0, kvd = 0, I = 0;
    for (const LayerSpec& s : spec.layers) {
      qd = std::max(qd, s.attn.heads * s.attn.head_dim);
      kvd = std::max(kvd, s.attn.kv_heads * s.attn.head_dim);
      I = std::max(I, s.mlp.intermediate);
      maxH_ = std::max(maxH_, s.attn.heads);
    }
    const int64_t widest = std::max({H_, qd, kvd, I});  // the lm_head's buffers: run()
    const size_t f = sizeof(float), eb = size_t(cuda::dt_bytes(dt_));
    h_ = dev(size_t(T_ * H_) * f);
    x_ = dev(size_t(T_ * H_) * f);
    y_ = dev(size_t(T_ * H_) * f);
    q_ = dev(size_t(T_ * qd) * f);
    k_ = dev(size_t(T_ * kvd) * f);
    v_ = dev(size_t(T_ * kvd) * f);
    ctx_ = dev(size_t(T_ * qd) * f);
    g_ = dev(size_t(T_ * I) * f);
    u_ = dev(size_t(T_ * I) * f);
    act_ = dev(size_t(T_ * I) * f);
    xs_ = dev(size_t(T_ * widest) * eb);
    cs_ = dev(size_t(T_ * std::max(widest, std::max(qd + 2 * kvd, 2 * I))) * eb);  // linear_many
    qs_ = dev(size_t(T_ * qd) * eb);
    ks_ = dev(size_t(T_ * kvd) * eb);
    vs_ = dev(size_t(T_ * kvd) * eb);
    stats_ = dev(sizeof(cuda::SiteStats));
    if (dm_.lora_rank > 0 || !dm_.lm_head_lora.empty()) {
      const int64_t r = std::max(dm_.lora_rank, dm_.lm_head_lora.r);
      lora_mid_ = DevBuf(size_t(T_ * r) * f);
      // Rows of every layer product; lm_head's [T, vocab] only where it is a step's one row.
      const int64_t rows = std::max(dm_.lora_rows, cache_ ? dm_.lm_head_lora.rows : int64_t(0));
      lora_out_ = DevBuf(size_t(T_ * rows) * f);
    }
    if (cache_) {
      if (segs_.size() != 1) fail("forward: a key/value cache holds one sequence");
      // Allocated once: a decode step allocates nothing and waits for the GPU only at the end.
      logits_ = DevBuf(size_t(V_) * sizeof(float));
      const size_t lm_c = size_t(V_) * eb;
      if (!f32_out_ && cs_.bytes() < lm_c) cs_ = DevBuf(lm_c);
      logits_host_ = PinnedBytes(size_t(V_) * sizeof(float));
      ids_ = DevBuf(size_t(T_) * sizeof(int64_t));
      ids_host_ = PinnedBytes(size_t(T_) * sizeof(int64_t));
      pick_ = DevBuf(2 * sizeof(int64_t));
      pick_scratch_ = DevBuf(cuda::argmax_scratch_bytes());
      pick_host_ = PinnedBytes(2 * sizeof(int64_t));
      want_logits_ = opt.step_logits;
      use_embedding_table(ck, spec, opt);
      if (dm_.embed_lora.r > 0) {
        emb_mid_ = DevBuf(size_t(T_ * dm_.embed_lora.r) * sizeof(float));
        emb_out_ = DevBuf(size_t(T_ * H_) * sizeof(float));
      }
      // A 1-token step reads its position from a device scalar and attends with
      // decode_attention, graph or not, so that NANSCOPE_CUDA_GRAPH=1 (the step replayed as one
      // CUDA graph) changes the launches only, never the numbers.
      step_ = T_ == 1 && !sites_;
      // Streamed weights (--gpu-memory) alternate between two slots: launched one by one.
      graph_ = step_ && backend().cuda_graph && !dm_.stream;
      // The fused kernels cover the layers without norms after attention or the MLP (Gemma's).
      fuse_ = step_ && backend().cuda_fuse;
      for (const LayerSpec& s : spec.layers)
        if (!s.names.attn_out_norm.empty() || !s.names.mlp_out_norm.empty()) fuse_ = false;
      // A LoRA joins its product after the rounding that the fused kernels fold in.
      if (dm_.lora_rank > 0 || !dm_.lm_head_lora.empty()) fuse_ = false;
      streams_ = fuse_ && backend().cuda_step_streams;
      // One-row products by warps (cuda::gemv) in every launch of a step, fused or not, so that
      // NANSCOPE_CUDA_FUSE=0 still gives the same bits.
      gemv_ = step_ && backend().cuda_gemv;
      // gemv_act reads its input from xs_ while it writes: its output's storage goes apart.
      if (gemv_) as_ = dev(size_t(I) * size_t(cuda::dt_bytes(dt_)));
      if (streams_) {
        check(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming), "event");
        for (cudaEvent_t& e : join_)
          check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
      }
      if (step_) {
        pos_ = DevBuf(sizeof(int64_t));
        pos_host_ = PinnedBytes(sizeof(int64_t));
      }
      if (graph_) check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream");
    }
    build_rope();
    plan_attention();
    // cudaMemcpy from pageable memory returns before its DMA has landed, on the legacy stream,
    // which a graph pass's non-blocking stream does not wait for: the RoPE tables must be there.
    if (graph_) check(cudaStreamSynchronize(nullptr), "set-up");
  }

  ~Pass() {
    if (fork_ != nullptr) cudaEventDestroy(fork_);
    for (cudaEvent_t e : join_)
      if (e != nullptr) cudaEventDestroy(e);
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  Pass(const Pass&) = delete;
  Pass& operator=(const Pass&) = delete;

  // A pass with the cache: the tokens sit at positions [past, past + T).
  CudaStep run_cached(std::span<const int64_t> ids) {
    const auto started = std::chrono::steady_clock::now();
    past_ = cache_->past;
    if (past_ + T_ > cache_->cap)
      fail("generate --device cuda: the key/value cache holds {} positions, {} asked for",
           cache_->cap, past_ + T_);
    if (past_ + T_ > max_keys_)
      fail(
          "forward: a --device cuda pass of {} tokens after {} cached ones (only the first "
          "pass may hold more than one)",
          T_, past_);
    if (int64_t(ids.size()) != T_) throw std::logic_error("run_cached: token count");
    std::memcpy(ids_host_.get(), ids.data(), ids.size() * sizeof(int64_t));
    std::chrono::steady_clock::time_point queued;
    if (step_) *static_cast<int64_t*>(pos_host_.get()) = past_;
    if (graph_) {
      if (graph_runs_++ == 0) {
        // The first step runs as it is (cuBLAS's first calls of these shapes set up outside a
        // capture); the second is captured, and every later one replays it.
        const StreamScope on(stream_);
        step_body();
      } else {
        if (exec_ == nullptr) capture();
        check(cudaGraphLaunch(exec_, stream_), "graph launch");
      }
      queued = std::chrono::steady_clock::now();
      check(cudaStreamSynchronize(stream_), "decode step");
    } else {
      Profile::get().begin();  // launched one by one on the legacy stream: its phases are timed
      step_body();
      queued = std::chrono::steady_clock::now();
      check(cudaStreamSynchronize(nullptr), "decode step");
      Profile::get().end();
    }
    // NANSCOPE_CUDA_STEP_TIMES=1: the host's time to queue a step against the step's whole time
    // (the benchmark's question: are the launches or the GPU the bottleneck?).
    if (backend().cuda_step_times) {
      const auto done = std::chrono::steady_clock::now();
      std::fprintf(stderr, "step T=%lld past=%lld queue_ms %.3f total_ms %.3f\n",
                   static_cast<long long>(T_), static_cast<long long>(past_),
                   std::chrono::duration<double, std::milli>(queued - started).count(),
                   std::chrono::duration<double, std::milli>(done - started).count());
    }
    CudaStep r;
    r.weight_bytes = dm_.weight_bytes;
    if (want_logits_) {
      const float* lh = static_cast<const float*>(logits_host_.get());
      r.logits.assign(lh, lh + V_);
    } else {
      const auto* pick = static_cast<const int64_t*>(pick_host_.get());
      r.argmax = pick[0];
      r.finite = pick[1] == 0;
    }
    return r;
  }

  uint64_t weight_bytes() const { return dm_.weight_bytes; }

 private:
  // The kernels, cuBLAS and the copies of this thread on `s` while it lives (legacy default
  // stream again after).
  struct StreamScope {
    explicit StreamScope(cudaStream_t s) {
      cuda::set_stream(s);
      check(cublasSetStream(blas(), s), "cublasSetStream");
    }
    ~StreamScope() {
      cuda::set_stream(nullptr);
      cublasSetStream(blas(), nullptr);
    }
    StreamScope(const StreamScope&) = delete;
    StreamScope& operator=(const StreamScope&) = delete;
  };

  // A cached pass's work, queued on the current stream: the ids up and their embedding rows, the
  // layers, the final norm of every row (a row's norm does not depend on the others), lm_head on
  // the last one (as transformers' generate computes it), the logits row down to page-locked
  // memory, or only its argmax and finiteness (step_logits = false).
  void step_body() {
    const cudaStream_t st = graph_ ? stream_ : nullptr;
    check(cudaMemcpyAsync(ids_.get(), ids_host_.get(), size_t(T_) * sizeof(int64_t),
                          cudaMemcpyHostToDevice, st),
          "upload");
    cuda::embed_rows(embed_->buf.get(), dt_, static_cast<const int64_t*>(ids_.get()), T_, H_,
                     embed_scale_, h_.f());
    if (const DevEmbedLora& e = dm_.embed_lora; e.r > 0) {  // PeftModel's Embedding.forward
      cuda::embed_rows(e.At.get(), Dt::F32, static_cast<const int64_t*>(ids_.get()), T_, e.r, 0.0f,
                       emb_mid_.f());
      const float one = 1.0f, zero = 0.0f;
      check(cublasGemmEx(blas(), CUBLAS_OP_T, CUBLAS_OP_N, int(H_), int(T_), int(e.r), &one,
                         e.B.get(), CUDA_R_32F, int(e.r), emb_mid_.get(), CUDA_R_32F, int(e.r),
                         &zero, emb_out_.get(), CUDA_R_32F, int(H_), CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            "lora_embedding_B");
      cuda::lora_add(h_.f(), emb_out_.f(), T_ * H_, H_, e.scale, dt_);
    }
    if (step_)
      check(
          cudaMemcpyAsync(pos_.get(), pos_host_.get(), sizeof(int64_t), cudaMemcpyHostToDevice, st),
          "upload");
    mark("step embeddings");
    if (fuse_) {
      fused_layers();
      linear(-1, spec_.lm_head, product_input(x_), 1, dm_.lm_head, DevVec{}, logits_.f());
      mark("step lm_head");
    } else {
      const int64_t N = int64_t(spec_.layers.size());
      for (int64_t l = 0; l < N; ++l) layer(spec_.layers[size_t(l)], dm_.layer(l, st));
      dm_.layers_done(st);
      norm(-1, spec_.final_norm, h_.f(), dm_.final_norm, H_, T_, x_.f());
      linear(-1, spec_.lm_head, stage(x_.f() + (T_ - 1) * H_, H_), 1, dm_.lm_head, DevVec{},
             logits_.f(), &dm_.lm_head_lora, x_.f() + (T_ - 1) * H_);
    }
    if (spec_.final_softcap) cuda::softcap(logits_.f(), V_, *spec_.final_softcap, dt_);
    if (want_logits_) {
      check(cudaMemcpyAsync(logits_host_.get(), logits_.get(), size_t(V_) * sizeof(float),
                            cudaMemcpyDeviceToHost, st),
            "logits download");
    } else {
      cuda::argmax_finite(logits_.f(), V_, static_cast<int64_t*>(pick_.get()), pick_scratch_.get());
      check(cudaMemcpyAsync(pick_host_.get(), pick_.get(), 2 * sizeof(int64_t),
                            cudaMemcpyDeviceToHost, st),
            "argmax download");
    }
    mark("step pick / logits out");
  }

  // A 1-token step's layers with the fused kernels: layer()'s recipe, each product's rounding
  // (and bias) done by the kernel that reads its output, the residual joined with the norm after
  // it. Leaves the final norm's output in x_ (and in storage for lm_head). A step is a few
  // hundred launches of a few microseconds: fewer launches is most of what a step can still gain
  // beyond reading the weights once.
  void fused_layers() {
    const int64_t N = int64_t(spec_.layers.size());
    const float eps = float(spec_.eps);
    const bool off = spec_.norm == NormKind::RmsOffset;
    const auto* dpos = static_cast<const int64_t*>(pos_.get());
    const DevVec& first = N > 0 ? dm_.layers[0].input_norm : dm_.final_norm;
    cuda::rmsnorm(h_.f(), 1, H_, first.data(), eps, off, dt_, x_.f(), staged_out());
    for (int64_t l = 0; l < N; ++l) {
      const LayerSpec& s = spec_.layers[size_t(l)];
      const DevLayer& w = dm_.layer(l, graph_ ? stream_ : nullptr);
      const AttentionSpec& a = s.attn;
      const Rope& r = ropes_.at(a.rope);
      cuda::StepQkv q;
      q.proj = products(
          product_input(x_), 1,
          {{{}, w.q, w.q_bias, q_.f()}, {{}, w.k, w.k_bias, k_.f()}, {{}, w.v, w.v_bias, v_.f()}},
          streams_);
      mark("step q/k/v products");
      if (a.qk_norm) q.q_norm = w.q_norm.data(), q.k_norm = w.k_norm.data();
      q.eps = eps;
      q.offset = off;
      q.cos = r.cos.f();
      q.sin = r.sin.f();
      q.rowoff = static_cast<const int64_t*>(r.rowoff.get());
      q.rot = r.dim;
      q.pos = dpos;
      q.heads = a.heads, q.kv_heads = a.kv_heads, q.head_dim = a.head_dim;
      q.q = q_.f();
      q.kst = cache_->k[size_t(l)].get();
      q.vst = cache_->v[size_t(l)].get();
      q.vf = cache_->vf[size_t(l)].f();
      q.dt = dt_;
      cuda::step_qkv(q);
      mark("step q/k/v norm rope cache");
      cuda::decode_attention(q_.f(), q.kst, q.vst, q.vf, dpos, a.heads, a.kv_heads, a.head_dim,
                             a.scaling, a.softcap.value_or(0.0f), a.window,
                             att_ == AttentionProfile::Fused, dt_, S_.f(), max_keys_, ctx_.f(),
                             staged_out());
      mark("step attention");
      const cuda::RoundSegments o = products(product_input(ctx_), 1, {{{}, w.o, w.o_bias, y_.f()}});
      mark("step o product");
      cuda::residual_norm(h_.f(), o.seg[0], 1, H_, w.mlp_in_norm.data(), eps, off, dt_, x_.f(),
                          staged_out());
      mark("step residual + norm");
      const int act = s.mlp.act == Activation::Silu ? 0 : 1;
      const void* down_in = product_input(act_);
      if (gemv_ && w.gate_bias.empty() && w.up_bias.empty() && !f32_out_) {  // bf16/fp16 only
        cuda::gemv_act(product_input(x_), H_, w.gate.buf.get(), w.up.buf.get(), w.gate.rows, act,
                       dt_, act_.f(), as_.get());
        down_in = as_.get();
        mark("step gate/up products + act");
      } else {
        const cuda::RoundSegments gu =
            products(product_input(x_), 1,
                     {{{}, w.gate, w.gate_bias, g_.f()}, {{}, w.up, w.up_bias, u_.f()}}, streams_);
        mark("step gate/up products");
        cuda::step_act(gu.seg[0], gu.seg[1], w.gate.rows, act, dt_, act_.f(), staged_out());
        mark("step act");
      }
      const cuda::RoundSegments d = products(down_in, 1, {{{}, w.down, w.down_bias, y_.f()}});
      mark("step down product");
      const DevVec& next = l + 1 < N ? dm_.layers[size_t(l + 1)].input_norm : dm_.final_norm;
      cuda::residual_norm(h_.f(), d.seg[0], 1, H_, next.data(), eps, off, dt_, x_.f(),
                          staged_out());
      mark("step residual + norm");
    }
    dm_.layers_done(graph_ ? stream_ : nullptr);
  }

  // step_body captured once into a graph (the host buffers and the position scalar are read
  // when it replays). A failure ends the capture before it is reported.
  void capture() {
    Profile::get().reset();
    const StreamScope on(stream_);
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "graph capture");
    cudaGraph_t g = nullptr;
    try {
      step_body();
    } catch (...) {
      cudaStreamEndCapture(stream_, &g);
      if (g != nullptr) cudaGraphDestroy(g);
      throw;
    }
    check(cudaStreamEndCapture(stream_, &g), "graph capture");
    const cudaError_t e = cudaGraphInstantiate(&exec_, g, 0);
    cudaGraphDestroy(g);
    check(e, "graph instantiate");
  }

 public:
  // The pass's token ids, [T]: run() then gathers its embedding rows on the GPU from the table
  // the weights hold (forward_cuda_step's gather), instead of copying the host's up.
  void gather_from(const Checkpoint& ck, const ModelSpec& spec, const ForwardOptions& opt,
                   std::span<const int64_t> ids) {
    if (int64_t(ids.size()) != T_) throw std::logic_error("gather_from: one id per row");
    use_embedding_table(ck, spec, opt);
    ids_ = dev(ids.size() * sizeof(int64_t));
    check(cudaMemcpy(ids_.get(), ids.data(), ids.size() * sizeof(int64_t), cudaMemcpyHostToDevice),
          "upload");
  }

  // The table embed_rows gathers from, and Gemma's sqrt(H) in the run dtype (else 0).
  void use_embedding_table(const Checkpoint& ck, const ModelSpec& spec, const ForwardOptions& opt) {
    embed_ = &device_embed(dm_, ck, spec, opt);
    if (spec.embed_scale) embed_scale_ = round_to(float(std::sqrt(double(H_))), dtype_);
  }

  std::vector<float> run(std::span<const float> h0) {
    Profile::get().begin();
    input_normed_ = false;
    if (h0.empty()) {
      if (embed_ == nullptr) throw std::logic_error("forward_cuda: no embeddings, no ids");
      cuda::embed_rows(embed_->buf.get(), dt_, static_cast<const int64_t*>(ids_.get()), T_, H_,
                       embed_scale_, h_.f());
    } else {
      // Through the page-locked state buffer (the same size): a pageable copy moved ~8 GB/s.
      const size_t hb = h0.size() * sizeof(float);
      if (hb > host_.size()) throw std::logic_error("forward_cuda: embeddings larger than [T, H]");
      const char* from = reinterpret_cast<const char*>(h0.data());
      char* to = static_cast<char*>(host_.get());
      parallel_for(int64_t(hb), int64_t(1) << 20, [&](int64_t lo, int64_t hi) {
        std::memcpy(to + lo, from + lo, size_t(hi - lo));
      });
      check(cudaMemcpy(h_.get(), host_.get(), hb, cudaMemcpyHostToDevice), "upload");
    }
    mark("embeddings up");
    hidden(0, h_.f());
    mark("states out");
    const int64_t N = int64_t(spec_.layers.size());
    for (int64_t l = 0; l < N; ++l) {
      check_interrupt();
      layer(spec_.layers[size_t(l)], dm_.layer(l));
      if (l + 1 < N) hidden(l + 1, h_.f());
      mark("states out");
    }
    dm_.layers_done();
    norm(-1, spec_.final_norm, h_.f(), dm_.final_norm, H_, T_, x_.f());
    mark("norm");
    hidden(N, x_.f());
    mark("states out");
    // Only now: hidden's observer stops after the last state it keeps, and [T, V] is large.
    logits_ = dev(size_t(T_ * V_) * sizeof(float));
    const size_t lm_c = size_t(T_ * V_) * size_t(cuda::dt_bytes(dt_));
    if (!f32_out_ && cs_.bytes() < lm_c) cs_ = dev(lm_c);
    linear(-1, spec_.lm_head, stage(x_.f(), T_ * H_), T_, dm_.lm_head, DevVec{}, logits_.f(),
           &dm_.lm_head_lora, x_.f());
    if (spec_.final_softcap) {
      cuda::softcap(logits_.f(), T_ * V_, *spec_.final_softcap, dt_);
      site(-1, "final_logit_softcapping", logits_.f(), {T_, V_});
    }
    mark("lm_head");
    std::vector<float> out(size_t(T_ * V_));
    check(cudaMemcpy(out.data(), logits_.get(), out.size() * sizeof(float), cudaMemcpyDeviceToHost),
          "logits download");
    mark("logits out");
    return out;
  }

 private:
  // Sequences of one length whose attention is computed together (plan_attention).
  struct Chunk {
    int64_t len = 0;
    std::vector<int64_t> segs;
  };

  // ---- one decoder layer: the recipe of forward.cpp ----
  void layer(const LayerSpec& s, const DevLayer& w) {
    if (pass_fusable(s)) {
      pass_layer(s, w);
      return;
    }
    const int64_t l = s.index;
    const LayerNames& n = s.names;
    attention(s, w, norm_staged(l, n.input_norm, h_.f(), w.input_norm, x_.f()), y_.f());
    const float* a = y_.f();
    if (!n.attn_out_norm.empty()) {
      norm(l, n.attn_out_norm, y_.f(), w.attn_out_norm, H_, T_, x_.f());
      a = x_.f();
    }
    cuda::add_round(h_.f(), a, T_ * H_, dt_, h_.f());
    site(l, n.prefix + "residual_attn", h_.f(), {T_, H_});
    mark("norm");

    mlp(s, w, norm_staged(l, n.mlp_in_norm, h_.f(), w.mlp_in_norm, x_.f()), y_.f());
    const float* m = y_.f();
    if (!n.mlp_out_norm.empty()) {
      norm(l, n.mlp_out_norm, y_.f(), w.mlp_out_norm, H_, T_, x_.f());
      m = x_.f();
    }
    cuda::add_round(h_.f(), m, T_ * H_, dt_, h_.f());
    site(l, n.prefix + "residual_mlp", h_.f(), {T_, H_});
    mark("norm");
  }

  // Whether layer s of this pass runs as pass_layer: hidden's passes (flash attention, so no
  // sites and no cache; bf16/fp16), no adapter on the layer, the norms around the blocks only
  // before them (Gemma's after-norms read the products whole).
  bool pass_fusable(const LayerSpec& s) const {
    return fuse_pass_ && !step_ && dt_ != Dt::F32 && lora_of(s.index) == nullptr &&
           s.names.attn_out_norm.empty() && s.names.mlp_out_norm.empty() && s.attn.head_dim <= 256;
  }

  // layer()'s recipe where nothing but the next kernel reads a product, as a decode step has it
  // (fused_layers): each product's rounding (and bias) done by the kernel that reads it, q/k
  // norm, RoPE and the copies in storage in one launch (pass_qkv), the context written in
  // storage by the attention, each residual joined with the norm after it. The same numbers;
  // the fp32 round trips between them were a third of a Qwen3-4B pass's GPU time.
  void pass_layer(const LayerSpec& s, const DevLayer& w) {
    const int64_t l = s.index, N = int64_t(spec_.layers.size());
    const LayerNames& n = s.names;
    const AttentionSpec& a = s.attn;
    const float eps = float(spec_.eps);
    const bool off = spec_.norm == NormKind::RmsOffset, eager = att_ == AttentionProfile::Eager;
    if (!input_normed_) norm_staged(l, n.input_norm, h_.f(), w.input_norm, x_.f());
    input_normed_ = false;
    cuda::PassQkv q;
    const int64_t qd = a.heads * a.head_dim, kvd = a.kv_heads * a.head_dim;
    const DevVec none;
    if (joinable(w.qkv, {&w.q_bias, &w.k_bias, &w.v_bias}))
      q.proj = columns(products(xs_.get(), T_, {{{}, w.qkv, none, q_.f()}}).seg[0], {qd, kvd, kvd});
    else
      q.proj = products(
          xs_.get(), T_,
          {{{}, w.q, w.q_bias, q_.f()}, {{}, w.k, w.k_bias, k_.f()}, {{}, w.v, w.v_bias, v_.f()}});
    mark("q/k/v products");
    const Rope& r = ropes_.at(a.rope);
    if (a.qk_norm) q.q_norm = w.q_norm.data(), q.k_norm = w.k_norm.data();
    q.eps = eps;
    q.offset = off;
    q.cos = r.cos.f();
    q.sin = r.sin.f();
    q.rowoff = static_cast<const int64_t*>(r.rowoff.get());
    q.rot = r.dim;
    q.tokens = T_, q.heads = a.heads, q.kv_heads = a.kv_heads, q.head_dim = a.head_dim;
    q.q = qs_.get(), q.k = ks_.get(), q.v = vs_.get();
    q.dt = dt_;
    if (eager) {
      q.stats = static_cast<cuda::SiteStats*>(bound_.get());
      check(cudaMemsetAsync(q.stats, 0, 2 * sizeof(cuda::SiteStats), nullptr), "memset");
    }
    cuda::pass_qkv(q);
    mark("q/k norm, rope");
    flash(a, eager, true, xs_.get());
    const cuda::RoundSegments o = products(xs_.get(), T_, {{{}, w.o, w.o_bias, y_.f()}});
    mark("o product");
    cuda::residual_norm(h_.f(), o.seg[0], T_, H_, w.mlp_in_norm.data(), eps, off, dt_, nullptr,
                        xs_.get());
    mark("norm");
    const int64_t I = w.gate.rows;
    const cuda::RoundSegments gu =
        joinable(w.gate_up, {&w.gate_bias, &w.up_bias})
            ? columns(products(xs_.get(), T_, {{{}, w.gate_up, none, g_.f()}}).seg[0], {I, I})
            : products(xs_.get(), T_,
                       {{{}, w.gate, w.gate_bias, g_.f()}, {{}, w.up, w.up_bias, u_.f()}});
    mark("gate/up products");
    cuda::step_act(gu.seg[0], gu.seg[1], T_ * w.gate.rows, s.mlp.act == Activation::Silu ? 0 : 1,
                   dt_, nullptr, xs_.get());
    mark("act");
    const cuda::RoundSegments d = products(xs_.get(), T_, {{{}, w.down, w.down_bias, y_.f()}});
    mark("down product");
    if (l + 1 < N && pass_fusable(spec_.layers[size_t(l + 1)])) {
      cuda::residual_norm(h_.f(), d.seg[0], T_, H_, dm_.layers[size_t(l + 1)].input_norm.data(),
                          eps, off, dt_, nullptr, xs_.get());
      input_normed_ = true;
    } else {
      cuda::bias_round_many(d, T_, dt_);
      cuda::add_round(h_.f(), y_.f(), T_ * H_, dt_, h_.f());
    }
    mark("norm");
  }

  // Whether pass_layer runs the joined matrix m as one product: there is one (DevLayer::qkv,
  // gate_up), no bias, and its output stays in storage (columns splits it there).
  bool joinable(const DevMat& m, std::initializer_list<const DevVec*> biases) const {
    if (m.rows == 0 || f32_out_ || !join_products_) return false;
    for (const DevVec* b : biases)
      if (!b->empty()) return false;
    return true;
  }
  // The column ranges of one product's output rows (widths from column 0 on), each a segment as
  // products() gives a matrix of its own, through the row stride (RoundSegment::ld).
  cuda::RoundSegments columns(const cuda::RoundSegment& s, std::initializer_list<int64_t> widths) {
    cuda::RoundSegments out;
    const size_t eb = size_t(cuda::dt_bytes(s.ctype));
    int64_t c0 = 0;
    for (const int64_t w : widths) {
      out.seg[out.n++] = {
          static_cast<const char*>(s.c_in) + size_t(c0) * eb, s.ctype, nullptr, nullptr, w, s.cols};
      c0 += w;
    }
    if (c0 != s.cols) throw std::logic_error("columns: widths of the product");
    return out;
  }

  // xs: the input [T, H] in the run dtype's storage (norm_staged).
  void mlp(const LayerSpec& s, const DevLayer& w, const void* xs, float* out) {
    const int64_t l = s.index, I = w.gate.rows;
    const LayerNames& n = s.names;
    const LayerLora* L = lora_of(l);
    const int act = s.mlp.act == Activation::Silu ? 0 : 1;
    if (!sites_ && (L == nullptr || (L->gate.empty() && L->up.empty()))) {
      // Nothing reads gate and up but the activation: it rounds the products where it reads
      // them (step_act, the same numbers), so their fp32 copies are never written.
      const cuda::RoundSegments segs = products(
          xs, T_,
          {{n.gate(), w.gate, w.gate_bias, g_.f(), nullptr}, {n.up(), w.up, w.up_bias, u_.f()}});
      mark("gate/up products");
      cuda::step_act(segs.seg[0], segs.seg[1], T_ * I, act, dt_, act_.f(), staged_out());
    } else {
      linear_many(l, xs, T_,
                  {{n.gate(), w.gate, w.gate_bias, g_.f(), L ? &L->gate : nullptr},
                   {n.up(), w.up, w.up_bias, u_.f(), L ? &L->up : nullptr}},
                  x_.f());
      mark("gate/up products");
      cuda::act_mul(g_.f(), u_.f(), T_ * I, act, dt_, act_.f(), staged_out());
      site(l, n.prefix + "mlp.act", act_.f(), {T_, I});
    }
    mark("act");
    linear(l, n.down(), product_input(act_), T_, w.down, w.down_bias, out, L ? &L->down : nullptr,
           act_.f());
    mark("down product");
  }

  // xs: the input [T, H] in the run dtype's storage (norm_staged).
  void attention(const LayerSpec& s, const DevLayer& w, const void* xs, float* out) {
    const int64_t l = s.index;
    const LayerNames& n = s.names;
    const AttentionSpec& a = s.attn;
    const int64_t D = a.head_dim, qd = a.heads * D, kvd = a.kv_heads * D;
    const std::string& p = n.prefix;
    const LayerLora* L = lora_of(l);
    linear_many(l, xs, T_,
                {{p + "self_attn.q_proj", w.q, w.q_bias, q_.f(), L ? &L->q : nullptr},
                 {p + "self_attn.k_proj", w.k, w.k_bias, k_.f(), L ? &L->k : nullptr},
                 {p + "self_attn.v_proj", w.v, w.v_bias, v_.f(), L ? &L->v : nullptr}},
                x_.f());
    mark("q/k/v products");
    if (a.qk_norm) {  // per head, in place (rmsnorm_k reads a row whole before it writes it)
      norm(l, n.q_norm, q_.f(), w.q_norm, D, T_ * a.heads, q_.f(), {T_, a.heads, D});
      norm(l, n.k_norm, k_.f(), w.k_norm, D, T_ * a.kv_heads, k_.f(), {T_, a.kv_heads, D});
    }
    const Rope& r = ropes_.at(a.rope);
    const auto* dpos = step_ ? static_cast<const int64_t*>(pos_.get()) : nullptr;
    cuda::rope(q_.f(), T_, a.heads, D, r.dim, r.cos.f(), r.sin.f(),
               static_cast<const int64_t*>(r.rowoff.get()), dt_, past_ * r.dim, dpos);
    cuda::rope(k_.f(), T_, a.kv_heads, D, r.dim, r.cos.f(), r.sin.f(),
               static_cast<const int64_t*>(r.rowoff.get()), dt_, past_ * r.dim, dpos);
    mark("q/k norm, rope");
    if (step_) {  // nothing here may depend on the step's position but through dpos (graphs)
      cuda::cache_append(k_.f(), v_.f(), kvd, dpos, cache_->k[size_t(l)].get(),
                         cache_->v[size_t(l)].get(), cache_->vf[size_t(l)].f(), dt_);
      cuda::decode_attention(q_.f(), cache_->k[size_t(l)].get(), cache_->v[size_t(l)].get(),
                             cache_->vf[size_t(l)].f(), dpos, a.heads, a.kv_heads, D, a.scaling,
                             a.softcap.value_or(0.0f), a.window, att_ == AttentionProfile::Fused,
                             dt_, S_.f(), max_keys_, ctx_.f(), staged_out());
      linear(l, n.o_proj, product_input(ctx_), T_, w.o, w.o_bias, out, L ? &L->o : nullptr,
             ctx_.f());
      return;
    }
    if (cache_) {  // this pass's keys and values join the cache at rows [P, P + T)
      const size_t eb = size_t(cuda::dt_bytes(dt_)), at = size_t(past_ * kvd);
      cuda::to_storage(k_.f(), static_cast<char*>(cache_->k[size_t(l)].get()) + at * eb, T_ * kvd,
                       dt_);
      cuda::to_storage(v_.f(), static_cast<char*>(cache_->v[size_t(l)].get()) + at * eb, T_ * kvd,
                       dt_);
      check(cudaMemcpyAsync(cache_->vf[size_t(l)].f() + at, v_.get(),
                            size_t(T_ * kvd) * sizeof(float), cudaMemcpyDeviceToDevice),
            "cache");
    }
    if (sites_) {
      std::vector<float> qk(size_t(T_ * (qd + kvd))), qh(size_t(T_ * qd)), kh(size_t(T_ * kvd));
      download(q_.f(), qh);
      download(k_.f(), kh);
      for (int64_t t = 0; t < T_; ++t) {
        std::copy_n(qh.data() + t * qd, qd, qk.data() + t * (qd + kvd));
        std::copy_n(kh.data() + t * kvd, kvd, qk.data() + t * (qd + kvd) + qd);
      }
      emit_host(l, p + "self_attn.rope", qk, {T_, a.heads + a.kv_heads, D});
    }
    if (att_ == AttentionProfile::Eager)
      eager(s);
    else
      fused(s);
    linear(l, n.o_proj, stage(ctx_.f(), T_ * qd), T_, w.o, w.o_bias, out, L ? &L->o : nullptr,
           ctx_.f());
    mark("o product");
  }

  // q.k^T of one chunk into S (fp32, [nmat, Tq, Tk]) as a batched tensor-core product: one
  // matrix per sequence and head, k read at head h / (nH / nKV) as repeat_kv gives it. Without a
  // cache Tq = Tk = the chunk's length; with one, the keys are the cache's rows [lo, P + T)
  // (key_lo). The pointer arrays of the p.v product (eager) and the sequences' first rows go up
  // with it. Returns the device arrays: [A1, B1, C1, A2, B2, C2] pointers, then the offsets.
  const void* const* chunk_scores(const Chunk& c, const AttentionSpec& a, int64_t l) {
    const int64_t D = a.head_dim, qd = a.heads * D, kvd = a.kv_heads * D,
                  rep = a.heads / a.kv_heads;
    const int64_t Tq = c.len, Tk = cache_ ? keys(a) : c.len,
                  nmat = int64_t(c.segs.size()) * a.heads;
    const size_t eb = size_t(cuda::dt_bytes(dt_));
    const char* qb = static_cast<const char*>(qs_.get());
    const size_t lo = size_t(cache_ ? key_lo(a) * kvd : 0) * eb;
    const char* kb = static_cast<const char*>(cache_ ? cache_->k[size_t(l)].get() : ks_.get()) + lo;
    const char* vb = static_cast<const char*>(cache_ ? cache_->v[size_t(l)].get() : vs_.get()) + lo;
    const auto arrays = [&](std::vector<const void*>& ptrs, std::vector<int64_t>& offs) {
      ptrs.resize(size_t(6 * nmat));
      for (size_t si = 0; si < c.segs.size(); ++si) {
        const Seg& g = segs_[size_t(c.segs[si])];
        const int64_t koff = cache_ ? 0 : g.off;  // the cache holds this one sequence only
        offs.push_back(g.off);
        for (int64_t h = 0; h < a.heads; ++h) {
          const size_t mat = si * size_t(a.heads) + size_t(h), n = size_t(nmat);
          const int64_t kvh = h / rep;
          ptrs[mat] = kb + size_t(koff * kvd + kvh * D) * eb;
          ptrs[n + mat] = qb + size_t(g.off * qd + h * D) * eb;
          ptrs[2 * n + mat] = S_.f() + int64_t(mat) * Tq * Tk;
          ptrs[3 * n + mat] = vb + size_t(koff * kvd + kvh * D) * eb;
          ptrs[4 * n + mat] =
              Ps_.get() == nullptr  // eager only
                  ? nullptr
                  : static_cast<const char*>(Ps_.get()) + mat * size_t(Tq * Tk) * eb;
          ptrs[5 * n + mat] = ctx_.f() + g.off * qd + h * D;
        }
      }
    };
    std::vector<const void*> ptrs;
    std::vector<int64_t> offs;
    char* dev = nullptr;
    if (cache_) {
      // One region per layer, copied from page-locked memory without waiting for the GPU: the
      // host region is rewritten only at the next pass, after this one's final download.
      arrays(ptrs, offs);
      const size_t pbytes = ptrs.size() * sizeof(void*), obytes = offs.size() * sizeof(int64_t);
      dev = static_cast<char*>(ptrs_.get()) + size_t(l) * ptr_region_;
      char* host = static_cast<char*>(ptrs_host_.get()) + size_t(l) * ptr_region_;
      std::memcpy(host, ptrs.data(), pbytes);
      std::memcpy(host + pbytes, offs.data(), obytes);
      check(cudaMemcpyAsync(dev, host, pbytes + obytes, cudaMemcpyHostToDevice), "upload");
    } else {
      // Without a cache they depend on the chunk and the layer's head counts only (the buffers
      // are the pass's): uploaded at the first layer, not at each (a pass of many lengths
      // waited for a synchronous copy per chunk and layer).
      const auto key = std::make_tuple(size_t(&c - chunks_.data()), a.heads, a.kv_heads, D);
      auto it = chunk_ptrs_.find(key);
      if (it == chunk_ptrs_.end()) {
        arrays(ptrs, offs);
        const size_t pbytes = ptrs.size() * sizeof(void*), obytes = offs.size() * sizeof(int64_t);
        DevBuf b(pbytes + obytes);
        check(cudaMemcpy(b.get(), ptrs.data(), pbytes, cudaMemcpyHostToDevice), "upload");
        check(cudaMemcpy(static_cast<char*>(b.get()) + pbytes, offs.data(), obytes,
                         cudaMemcpyHostToDevice),
              "upload");
        it = chunk_ptrs_.emplace(key, std::move(b)).first;
      }
      dev = static_cast<char*>(it->second.get());
    }
    const void* const* dp = reinterpret_cast<const void* const*>(dev);
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t t = cuda_type(dt_);
    // Column-major: S^T[j, i] = sum_d k[j, d] q[i, d]  ->  S row-major [i, j].
    check(cublasGemmBatchedEx(blas(), CUBLAS_OP_T, CUBLAS_OP_N, int(Tk), int(Tq), int(D), &one, dp,
                              t, int(kvd), dp + nmat, t, int(qd), &zero,
                              const_cast<void* const*>(dp + 2 * nmat), CUDA_R_32F, int(Tk),
                              int(nmat), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "q.k^T");
    return dp;
  }

  // With a cache: the first cache row the attention reads (a sliding-window layer's cache holds
  // the last window - 1 positions before these tokens, as transformers' DynamicCache keeps
  // them), and the number of keys; without one, the chunk's own rows.
  int64_t key_lo(const AttentionSpec& a) const {
    return a.window > 0 ? std::max<int64_t>(0, past_ - (a.window - 1)) : 0;
  }
  int64_t keys(const AttentionSpec& a) const { return cache_ ? past_ + T_ - key_lo(a) : maxT_; }
  int64_t query_col(const AttentionSpec& a) const { return cache_ ? past_ - key_lo(a) : 0; }

  void qkv_storage(const AttentionSpec& a) {
    const int64_t qd = a.heads * a.head_dim, kvd = a.kv_heads * a.head_dim;
    cuda::to_storage(q_.f(), qs_.get(), T_ * qd, dt_);
    if (cache_) return;  // k and v are read from the cache
    cuda::to_storage(k_.f(), ks_.get(), T_ * kvd, dt_);
    cuda::to_storage(v_.f(), vs_.get(), T_ * kvd, dt_);
  }

  // transformers' eager_attention_forward on the GPU: s = round(q @ k^T) (kept in fp32 until
  // eager_softmax rounds it), round(s * scaling), soft-capping, round(s + mask),
  // p = round(softmax_fp32(s)), ctx = round(p @ v).
  void eager(const LayerSpec& s) {
    const AttentionSpec& a = s.attn;
    const int64_t D = a.head_dim, qd = a.heads * D, kvd = a.kv_heads * D;
    qkv_storage(a);
    if (flash_) {
      flash(a, true);
      return;
    }
    const float mask = dtype_lowest(dtype_);
    cuda::SiteStats* st = sites_ ? reset_stats() : nullptr;
    for (const Chunk& c : chunks_) {
      const int64_t Tq = c.len, Tk = cache_ ? keys(a) : c.len,
                    nmat = int64_t(c.segs.size()) * a.heads;
      const void* const* dp = chunk_scores(c, a, s.index);
      mark("attention q.k");
      cuda::eager_softmax(S_.f(), P_.f(), Ps_.get(), nmat, Tq, Tk, query_col(a), a.scaling,
                          a.softcap.value_or(0.0f), a.window, mask, dt_, st);
      mark("attention softmax");
      const float one = 1.0f, zero = 0.0f;
      const cudaDataType_t t = cuda_type(dt_);
      // ctx^T[d, i] = sum_j v[j, d] p[i, j].
      check(cublasGemmBatchedEx(blas(), CUBLAS_OP_N, CUBLAS_OP_N, int(D), int(Tq), int(Tk), &one,
                                dp + 3 * nmat, t, int(kvd), dp + 4 * nmat, t, int(Tk), &zero,
                                const_cast<void* const*>(dp + 5 * nmat), CUDA_R_32F, int(qd),
                                int(nmat), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "p.v");
      mark("attention p.v");
    }
    cuda::bias_round(ctx_.get(), Dt::F32, nullptr, T_, qd, dt_, ctx_.f());
    report_attention(s, qd);
  }

  // The fused profile: q.k^T on tensor cores as above, then the flash-style softmax and p.v.
  void fused(const LayerSpec& s) {
    const AttentionSpec& a = s.attn;
    const int64_t qd = a.heads * a.head_dim;
    qkv_storage(a);
    if (flash_) {
      flash(a, false);
      return;
    }
    cuda::SiteStats* st = sites_ ? reset_stats() : nullptr;
    for (const Chunk& c : chunks_) {
      const int64_t nmat = int64_t(c.segs.size()) * a.heads;
      const void* const* dp = chunk_scores(c, a, s.index);
      mark("attention q.k");
      const auto* offs = reinterpret_cast<const int64_t*>(dp + 6 * nmat);
      const float* v =
          cache_ ? cache_->vf[size_t(s.index)].f() + key_lo(a) * a.kv_heads * a.head_dim : v_.f();
      cuda::fused_softmax_pv(S_.f(), v, nmat, c.len, cache_ ? keys(a) : c.len, query_col(a),
                             a.heads, a.kv_heads, a.head_dim, offs, a.scaling, a.window, dt_,
                             ctx_.f(), sites_ ? P_.f() : nullptr, st);
      mark("attention softmax+p.v");
    }
    report_attention(s, qd);
  }

  // stats_ready: pass_qkv has written q's and k's statistics (bound_); ctx_storage: the context
  // in storage there instead of ctx_ (pass_layer).
  void flash(const AttentionSpec& a, bool eager, bool stats_ready = false,
             void* ctx_storage = nullptr) {
    cuda::SiteStats* bound = nullptr;
    if (eager) {  // q's and k's statistics: whether eager's scores can overflow (flash_attention)
      bound = static_cast<cuda::SiteStats*>(bound_.get());
      if (!stats_ready) {
        check(cudaMemsetAsync(bound, 0, 2 * sizeof(cuda::SiteStats), nullptr), "memset");
        cuda::site_stats(q_.f(), T_ * a.heads * a.head_dim, bound);
        cuda::site_stats(k_.f(), T_ * a.kv_heads * a.head_dim, bound + 1);
      }
    }
    cuda::flash_attention(qs_.get(), ks_.get(), vs_.get(),
                          static_cast<const int32_t*>(flash_tiles_.get()), flash_ntiles_, a.heads,
                          a.kv_heads, a.head_dim, eager, a.scaling,
                          eager ? a.softcap.value_or(0.0f) : 0.0f, dtype_lowest(dtype_), a.window,
                          dt_, bound, ctx_.f(), ctx_storage);
    mark(eager ? "attention flash (eager)" : "attention flash");
  }

  void report_attention(const LayerSpec& s, int64_t qd) {
    if (!sites_) return;
    const AttentionSpec& a = s.attn;
    const std::string& p = s.names.prefix;
    const cuda::SiteStats sc = read_stats();
    emit_device(s.index, p + "self_attn.scores", S_.f(), {a.heads, T_, T_}, sc);
    site(s.index, p + "self_attn.probs", P_.f(), {a.heads, T_, T_});
    site(s.index, p + "self_attn.context", ctx_.f(), {T_, qd});
  }

  // ---- building blocks ----
  // x (fp32, rounded) in the run dtype's storage for a product's input (fp32 runs: as it is).
  const void* stage(const float* x, int64_t n) {
    if (dt_ == Dt::F32) return x;
    cuda::to_storage(x, xs_.get(), n, dt_);
    return xs_.get();
  }

  // Products of one input x (in storage) [rows, cols]: out_i = round(x @ W_i^T (+ bias_i)), the
  // same cuBLAS calls as linear(), their outputs rounded by one launch.
  struct LinearSpec {
    std::string module;
    const DevMat& w;
    const DevVec& bias;
    float* out;
    const DevLora* lora = nullptr;  // an adapter's branch on this product (x32 its input)
  };
  void linear_many(int64_t l, const void* x, int64_t rows, std::initializer_list<LinearSpec> specs,
                   const float* x32 = nullptr) {
    cuda::bias_round_many(products(x, rows, specs), rows, dt_);
    for (const LinearSpec& sp : specs)
      if (sp.lora != nullptr && !sp.lora->empty())
        apply_lora(*sp.lora, x32, rows, sp.out, sp.bias.data());
    for (const LinearSpec& sp : specs) site(l, sp.module, sp.out, {rows, sp.w.rows});
  }

  // out [rows, b.rows] (the base product, rounded) += its LoRA branch, as PeftModel adds it: the
  // two fp32 products as torch's F.linear computes them on fp32 (cuBLAS, no TF32), then
  // lora_add's one rounding. x32: the product's input [rows, b.in] in fp32.
  // base_bias: the base layer's bias (DoRA subtracts it), nullable.
  void apply_lora(const DevLora& b, const float* x32, int64_t rows, float* out,
                  const float* base_bias) {
    if (x32 == nullptr) throw std::logic_error("apply_lora: the product's fp32 input");
    float* lo = lora_out_.f();
    if (size_t(rows * b.rows) * sizeof(float) > lora_out_.bytes()) {
      lora_big_ = dev(size_t(rows * b.rows) * sizeof(float));  // lm_head over every row
      lo = lora_big_.f();
    }
    const float one = 1.0f, zero = 0.0f;
    check(cublasGemmEx(blas(), CUBLAS_OP_T, CUBLAS_OP_N, int(b.r), int(rows), int(b.in), &one,
                       b.A.get(), CUDA_R_32F, int(b.in), x32, CUDA_R_32F, int(b.in), &zero,
                       lora_mid_.get(), CUDA_R_32F, int(b.r), CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT),
          "lora_A");
    // lora_bias: the product adds to the bias rows (beta = 1), one rounding as torch's
    // cuBLASLt bias epilogue of F.linear.
    if (b.bias.get() != nullptr) cuda::fill_rows(b.bias.f(), b.rows, rows, lo);
    const float* beta = b.bias.get() != nullptr ? &one : &zero;
    check(cublasGemmEx(blas(), CUBLAS_OP_T, CUBLAS_OP_N, int(b.rows), int(rows), int(b.r), &one,
                       b.B.get(), CUDA_R_32F, int(b.r), lora_mid_.get(), CUDA_R_32F, int(b.r), beta,
                       lo, CUDA_R_32F, int(b.rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "lora_B");
    cuda::lora_add(out, lo, rows * b.rows, b.rows, b.scale, dt_,
                   b.m.get() != nullptr ? b.m.f() : nullptr, base_bias);
  }
  const LayerLora* lora_of(int64_t l) const {
    return dm_.lora.empty() ? nullptr : &dm_.lora[size_t(l)];
  }

  // linear_many's products alone (cuBLAS, or cuda::gemv for a step's one row): the outputs as a
  // kernel reads them before their rounding
  // (bias_round_many, or a fused decode kernel that rounds them where it reads them).
  // concurrent (a decode step's fused path): product i > 0 on side stream i - 1, forked from
  // and joined back into the current stream.
  cuda::RoundSegments products(const void* x, int64_t rows, std::initializer_list<LinearSpec> specs,
                               bool concurrent = false) {
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t t = cuda_type(dt_);
    cuda::RoundSegments segs;
    if (specs.size() > std::size(segs.seg)) throw std::logic_error("products: three at most");
    void* c[std::size(segs.seg)] = {};  // where each product goes, as linear() calls it
    const size_t eb = size_t(cuda::dt_bytes(dt_));
    size_t at = 0;  // bytes into cs_
    for (const LinearSpec& sp : specs) {
      const bool f32 = f32_out_ || !sp.bias.empty();
      c[segs.n] = f32 ? static_cast<void*>(sp.out) : static_cast<char*>(cs_.get()) + at;
      at += size_t(rows * sp.w.rows) * eb;
      if (!f32 && at > cs_.bytes()) throw std::logic_error("linear_many: the products' scratch");
      segs.seg[segs.n] = {c[segs.n], f32 ? Dt::F32 : dt_, sp.bias.data(), sp.out, sp.w.rows};
      ++segs.n;
    }
    if (gemv_ && rows == 1) {  // one launch for all of them
      cuda::GemvJobs jobs;
      for (const LinearSpec& sp : specs) {
        if (sp.w.cols != specs.begin()->w.cols)
          throw std::logic_error("products: one input, one width");
        jobs.job[jobs.n] = {sp.w.buf.get(), sp.w.rows, c[jobs.n], segs.seg[jobs.n].ctype};
        ++jobs.n;
      }
      cuda::gemv(x, specs.begin()->w.cols, jobs, dt_);
      return segs;
    }
    SideStreams* side = concurrent ? &side_streams() : nullptr;
    const cudaStream_t cur = graph_ ? stream_ : nullptr;
    if (side != nullptr) {
      check(cudaEventRecord(fork_, cur), "fork");
      for (size_t i = 1; i < specs.size(); ++i)
        check(cudaStreamWaitEvent(side->s[i - 1], fork_, 0), "fork");
    }
    size_t i = 0;  // the product's index
    for (const LinearSpec& sp : specs) {
      const cublasHandle_t h = side != nullptr && i > 0 ? side->h[i - 1] : blas();
      const bool f32 = segs.seg[i].ctype == Dt::F32;
      check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(sp.w.rows), int(rows), int(sp.w.cols),
                         &one, sp.w.buf.get(), t, int(sp.w.cols), x, t, int(sp.w.cols), &zero, c[i],
                         f32 ? CUDA_R_32F : t, int(sp.w.rows), CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            "linear");
      ++i;
    }
    if (side != nullptr)
      for (size_t k = 1; k < specs.size(); ++k) {
        check(cudaEventRecord(join_[k - 1], side->s[k - 1]), "join");
        check(cudaStreamWaitEvent(cur, join_[k - 1], 0), "join");
      }
    return segs;
  }

  // out[rows, W.rows] = round(x @ W^T (+ bias)); x in storage (stage).
  void linear(int64_t l, const std::string& module, const void* x, int64_t rows, const DevMat& w,
              const DevVec& bias, float* out, const DevLora* lora = nullptr,
              const float* x32 = nullptr) {
    linear_many(l, x, rows, {{module, w, bias, out, lora}}, x32);
  }

  // Where a kernel also writes its output in the run dtype's storage for the next product (xs_);
  // null in fp32 runs, whose products read the fp32 output itself (product_input).
  void* staged_out() const { return dt_ == Dt::F32 ? nullptr : xs_.get(); }
  const void* product_input(const DevBuf& f32) const {
    return dt_ == Dt::F32 ? f32.get() : xs_.get();
  }

  // A norm over rows of H whose output is a product's input: out, and its copy in the run
  // dtype's storage (xs_) from the same launch. Returns the product's input (out itself in fp32).
  const void* norm_staged(int64_t l, const std::string& module, const float* x, const DevVec& w,
                          float* out) {
    cuda::rmsnorm(x, T_, H_, w.data(), float(spec_.eps), spec_.norm == NormKind::RmsOffset, dt_,
                  out, staged_out());
    site(l, module, out, {T_, H_});
    return dt_ == Dt::F32 ? static_cast<const void*>(out) : xs_.get();
  }

  void norm(int64_t l, const std::string& module, const float* x, const DevVec& w, int64_t n,
            int64_t rows, float* out, std::initializer_list<int64_t> shape = {}) {
    cuda::rmsnorm(x, rows, n, w.data(), float(spec_.eps), spec_.norm == NormKind::RmsOffset, dt_,
                  out);
    if (shape.size() == 0)
      site(l, module, out, {T_, n});
    else
      site(l, module, out, shape);
  }

  cuda::SiteStats* reset_stats() {
    check(cudaMemset(stats_.get(), 0, sizeof(cuda::SiteStats)), "memset");
    return static_cast<cuda::SiteStats*>(stats_.get());
  }
  cuda::SiteStats read_stats() {
    cuda::SiteStats s;
    check(cudaMemcpy(&s, stats_.get(), sizeof(s), cudaMemcpyDeviceToHost), "stats download");
    return s;
  }

  void download(const float* d, std::vector<float>& out) {
    check(cudaMemcpy(out.data(), d, out.size() * sizeof(float), cudaMemcpyDeviceToHost),
          "download");
  }

  // A site computed on the GPU: statistics there, values to the host for the observer.
  void site(int64_t l, const std::string& name, const float* d,
            std::initializer_list<int64_t> shape) {
    if (!sites_) return;
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    cuda::SiteStats* st = reset_stats();
    cuda::site_stats(d, n, st);
    emit_device(l, name, d, shape, read_stats());
  }

  void emit_device(int64_t l, const std::string& name, const float* d,
                   std::initializer_list<int64_t> shape, const cuda::SiteStats& st) {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    std::vector<float> v(static_cast<size_t>(n));
    download(d, v);
    float peak;
    std::memcpy(&peak, &st.peak_bits, sizeof(peak));
    emit(l, name, v, shape, st.nonfinite == 0, peak);
  }

  void emit_host(int64_t l, const std::string& name, const std::vector<float>& v,
                 std::initializer_list<int64_t> shape) {
    bool finite = true;
    double peak = 0;
    for (float x : v) {
      if (std::isfinite(x))
        peak = std::max(peak, double(std::fabs(x)));
      else
        finite = false;
    }
    emit(l, name, v, shape, finite, peak);
  }

  void emit(int64_t l, const std::string& name, const std::vector<float>& v,
            std::initializer_list<int64_t> shape, bool finite, double peak) {
    const std::vector<int64_t> sh(shape);
    SiteView sv;
    sv.layer = l;
    sv.name = name;
    sv.values = v;
    sv.shape = sh;
    sv.finite = finite;
    sv.peak_abs = peak;
    obs_->site(sv);
    if (obs_->done()) throw Stop{};
  }

  // State `index` to the observer: only if it wants it, and reduced here per sequence where it
  // asks for pools (then [sequences, H] per pool comes back instead of [T, H]).
  void hidden(int64_t index, const float* d) {
    if (obs_ == nullptr) return;
    if (obs_->wants_state(index)) {
      const std::span<const Pool> pools = obs_->pools();
      if (pools.empty()) {
        check(cudaMemcpy(host_.f(), d, size_t(T_ * H_) * sizeof(float), cudaMemcpyDeviceToHost),
              "hidden state download");
        obs_->hidden_state(index, std::span<const float>(host_.f(), size_t(T_ * H_)), T_, H_);
      } else {
        pooled(index, d, pools);
      }
    }
    if (obs_->done()) throw Stop{};
  }

  // A state's pooled rows (GPU, pool_states) go down to page-locked memory on the compute stream
  // without waiting for them: the observer gets every pooled state of the pass at once, after
  // the last one it wants (a synchronous copy per state and pool stalled the launches 74 times
  // per Qwen3-4B pass).
  void pooled(int64_t index, const float* d, std::span<const Pool> pools) {
    const size_t S = segs_.size(), H = size_t(H_), rb = S * H * sizeof(float);
    // A slot per state: the last rows, the mean rows (those asked for), then the finite flags.
    bool want[2] = {false, false};  // Last, Mean
    for (const Pool p : pools) {
      if (p == Pool::None) throw std::logic_error("forward_cuda: Pool::None");
      want[p == Pool::Mean ? 1 : 0] = true;
    }
    const size_t region[2] = {0, want[0] ? rb : 0};
    const size_t flags = (size_t(want[0]) + size_t(want[1])) * rb,
                 slot = flags + S * sizeof(unsigned);
    if (pool_seg_.get() == nullptr) {  // the sequences' rows, and the slots
      std::vector<int64_t> ol(2 * S);
      for (size_t i = 0; i < S; ++i) ol[i] = segs_[i].off, ol[S + i] = segs_[i].len;
      pool_seg_ = dev(ol.size() * sizeof(int64_t));
      check(cudaMemcpy(pool_seg_.get(), ol.data(), ol.size() * sizeof(int64_t),
                       cudaMemcpyHostToDevice),
            "upload");
      size_t states = 0;
      for (int64_t i = 0; i <= int64_t(spec_.layers.size()); ++i)
        if (obs_->wants_state(i)) ++states, last_pooled_ = i;
      pool_out_ = dev(states * slot);
      pool_host_ = pinned(states * slot);
    }
    const auto* seg = static_cast<const int64_t*>(pool_seg_.get());
    const size_t at = pool_pending_.size() * slot;
    char* out = static_cast<char*>(pool_out_.get()) + at;
    auto* bad = reinterpret_cast<unsigned*>(out + flags);
    check(cudaMemsetAsync(bad, 0, S * sizeof(unsigned), nullptr), "memset");
    cuda::pool_states(d, seg, seg + S, int64_t(S), H_,
                      want[0] ? reinterpret_cast<float*>(out + region[0]) : nullptr,
                      want[1] ? reinterpret_cast<float*>(out + region[1]) : nullptr, bad);
    check(cudaMemcpyAsync(static_cast<char*>(pool_host_.get()) + at, out, slot,
                          cudaMemcpyDeviceToHost, nullptr),
          "pooled state download");
    pool_pending_.push_back(index);
    if (index < last_pooled_) return;
    check(cudaStreamSynchronize(nullptr), "pooled state download");
    std::vector<uint8_t> finite(S);
    for (size_t p = 0; p < pool_pending_.size(); ++p) {
      const char* h = static_cast<const char*>(pool_host_.get()) + p * slot;
      const auto* hb = reinterpret_cast<const unsigned*>(h + flags);
      for (size_t i = 0; i < S; ++i) finite[i] = hb[i] == 0 ? 1 : 0;
      for (const Pool k : pools) {
        const float* rows = reinterpret_cast<const float*>(h + region[k == Pool::Mean ? 1 : 0]);
        obs_->hidden_state_pooled(pool_pending_[p], k, std::span<const float>(rows, S * H), finite,
                                  H_);
      }
    }
    pool_pending_.clear();
  }

  // ---- set-up ----
  // Device and page-locked buffers: pass_pool's for a pass without a cache, else its own.
  DevBuf dev(size_t bytes) {
    if (cache_ != nullptr) return DevBuf(bytes);
    return pooled_buffer(pass_pool().dev, dev_slot_++, bytes);
  }
  PinnedBytes pinned(size_t bytes) {
    if (cache_ != nullptr) return PinnedBytes(bytes);
    return pooled_buffer(pass_pool().pinned, pin_slot_++, bytes);
  }

  // cos/sin tables per rope of the model, concatenated over the lengths that need their own
  // (dynamic, longrope), and each row's offset into them.
  struct Rope {
    int64_t dim = 0;
    DevBuf cos, sin, rowoff;
  };
  void build_rope() {
    std::map<int, int64_t> dims;
    for (const LayerSpec& s : spec_.layers) dims[s.attn.rope] = s.attn.rotary_dim;
    for (const auto& [ri, dim] : dims) {
      const RopeConfig& rc = spec_.ropes[size_t(ri)];
      std::map<int64_t, int64_t> base;  // table length -> offset (floats)
      std::vector<float> cos, sin;
      std::vector<int64_t> rowoff(static_cast<size_t>(T_));
      for (const Seg& g : segs_) {
        // With a cache the table covers every position it can hold; rows are shifted by the
        // pass's first position at each call (rope's shift).
        const int64_t key = cache_ ? cache_->cap : rope_depends_on_length(rc) ? g.len : maxT_;
        if (!base.contains(key)) {
          const RopeTables tab = rope_tables(c_, rc, dim, key, dtype_);
          base[key] = int64_t(cos.size());
          cos.insert(cos.end(), tab.cos.begin(), tab.cos.end());
          sin.insert(sin.end(), tab.sin.begin(), tab.sin.end());
        }
        for (int64_t t = 0; t < g.len; ++t) rowoff[size_t(g.off + t)] = base[key] + t * dim;
      }
      Rope r;
      r.dim = dim;
      r.cos = DevBuf(cos.size() * sizeof(float));
      r.sin = DevBuf(sin.size() * sizeof(float));
      r.rowoff = DevBuf(rowoff.size() * sizeof(int64_t));
      check(cudaMemcpy(r.cos.get(), cos.data(), cos.size() * sizeof(float), cudaMemcpyHostToDevice),
            "upload");
      check(cudaMemcpy(r.sin.get(), sin.data(), sin.size() * sizeof(float), cudaMemcpyHostToDevice),
            "upload");
      check(cudaMemcpy(r.rowoff.get(), rowoff.data(), rowoff.size() * sizeof(int64_t),
                       cudaMemcpyHostToDevice),
            "upload");
      ropes_.emplace(ri, std::move(r));
    }
  }

  // Eager attention computes sequences of one length together, in chunks whose score matrices
  // fit a budget; trace's single sequence is one chunk (its sites are the whole [nH, T, T]).
  void plan_attention() {
    // Attention without sites or a cache in one launch per layer (flash_attention): a list of
    // the query tiles of every sequence, those with the most keys first so that the short ones
    // fill the GPU at the end. No score buffers then.
    flash_ = !sites_ && cache_ == nullptr && backend().cuda_flash && T_ < (int64_t(1) << 31);
    for (const LayerSpec& s : spec_.layers)
      if (!cuda::flash_attention_supports(s.attn.head_dim, dt_)) flash_ = false;
    fuse_pass_ = flash_ && backend().cuda_fuse;  // NANSCOPE_CUDA_FUSE=0: layer() (same numbers)
    join_products_ = backend().cuda_join;
    if (flash_) {
      std::vector<std::array<int32_t, 4>> tiles;
      for (const Seg& g : segs_)
        for (int64_t q0 = 0; q0 < g.len; q0 += cuda::kFlashQueries)
          tiles.push_back({int32_t(g.off), int32_t(g.len), int32_t(q0), 0});
      std::stable_sort(tiles.begin(), tiles.end(),
                       [](const auto& a, const auto& b) { return a[2] > b[2]; });
      flash_tiles_ = dev(tiles.size() * sizeof(tiles[0]));
      check(cudaMemcpy(flash_tiles_.get(), tiles.data(), tiles.size() * sizeof(tiles[0]),
                       cudaMemcpyHostToDevice),
            "upload");
      flash_ntiles_ = int64_t(tiles.size());
      bound_ = dev(2 * sizeof(cuda::SiteStats));
      return;
    }
    const int64_t budget = int64_t(1) << 27;  // score elements per chunk (512 MB of fp32)
    std::map<int64_t, std::vector<int64_t>> by_len;
    for (size_t i = 0; i < segs_.size(); ++i) by_len[segs_[i].len].push_back(int64_t(i));
    int64_t most = 0, most_mats = 0;
    for (auto& [len, idx] : by_len) {
      const int64_t per = std::max<int64_t>(1, budget / std::max<int64_t>(1, maxH_ * len * len));
      for (size_t i = 0; i < idx.size(); i += size_t(per)) {
        Chunk c;
        c.len = len;
        for (size_t j = i; j < std::min(idx.size(), i + size_t(per)); ++j) c.segs.push_back(idx[j]);
        most = std::max(most, int64_t(c.segs.size()) * maxH_ * len * len);
        most_mats = std::max(most_mats, int64_t(c.segs.size()) * maxH_);
        chunks_.push_back(std::move(c));
      }
    }
    // Scores for both profiles (q.k^T on tensor cores); probabilities in fp32 for eager or the
    // sites, in the run dtype for eager's p.v.
    // With a cache: a 1-token step reads up to cap keys; a longer pass (the prompt) runs first,
    // against its own keys only (run_cached checks), so that its scores stay [T, T] as trace's.
    if (cache_) {
      max_keys_ = T_ == 1 ? cache_->cap : T_;
      most = maxH_ * T_ * max_keys_;
    }
    S_ = dev(size_t(most) * sizeof(float));
    if (att_ == AttentionProfile::Eager || sites_) P_ = dev(size_t(most) * sizeof(float));
    if (att_ == AttentionProfile::Eager) Ps_ = dev(size_t(most) * size_t(cuda::dt_bytes(dt_)));
    ptr_region_ = size_t(6 * most_mats) * sizeof(void*) + size_t(most_mats) * sizeof(int64_t);
    if (cache_) {  // a region per layer (chunk_scores)
      const size_t layers = spec_.layers.size();
      ptrs_ = DevBuf(layers * ptr_region_);
      ptrs_host_ = PinnedBytes(layers * ptr_region_);
    }
  }

  const ModelConfig& c_;
  const ModelSpec& spec_;
  DType dtype_;
  Dt dt_;
  AttentionProfile att_;
  Observer* obs_;
  bool sites_;
  bool f32_out_;  // products write fp32 and round in bias_round (always for fp32 runs)
  std::shared_ptr<DevModel> dm_keep_;
  DevModel& dm_;
  DevCache* cache_;                     // null: no key/value cache
  size_t dev_slot_ = 0, pin_slot_ = 0;  // the next of pass_pool's buffers (dev, pinned)
  int64_t past_ = 0;                    // with a cache: positions before this pass's tokens
  size_t ptr_region_ = 0;
  int64_t max_keys_ = 0;    // with a cache: the keys the score buffers hold
  bool step_ = false;       // a 1-token pass with the cache: position on the GPU, decode_attention
  bool graph_ = false;      // a step replayed as a CUDA graph (NANSCOPE_CUDA_GRAPH=1)
  bool fuse_ = false;       // a step through fused_layers (NANSCOPE_CUDA_FUSE=0: layer())
  bool streams_ = false;    // fused_layers' independent products on side streams
  bool gemv_ = false;       // a step's one-row products by cuda::gemv instead of cuBLAS
  bool flash_ = false;      // attention by flash_attention (plan_attention)
  bool fuse_pass_ = false;  // layers through pass_layer where they allow it
  bool join_products_ = true;  // pass_layer: one product of q/k/v and of gate/up (DevLayer::qkv)
  bool input_normed_ = false;  // xs_ holds the next layer's input norm (pass_layer)
  DevBuf flash_tiles_;         // its query tiles
  DevBuf bound_;               // eager's site_stats of q and k (flash)
  int64_t flash_ntiles_ = 0;
  cudaEvent_t fork_ = nullptr, join_[2] = {};  // (NANSCOPE_CUDA_STREAMS=1)
  cudaStream_t stream_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  int64_t graph_runs_ = 0;
  DevBuf pos_;  // the step's position, on the GPU
  PinnedBytes pos_host_;
  PinnedBytes ptrs_host_, logits_host_;
  DevBuf ids_, pick_;    // a cached pass's token ids; [argmax, any non-finite] of its logits
  DevBuf pick_scratch_;  // argmax_finite's partials
  DevBuf lora_mid_, lora_out_, lora_big_;  // apply_lora: x A^T [T, r]; its B product [T, rows]
  DevBuf emb_mid_, emb_out_;               // a step's embedding LoRA: A^T rows [T, r]; [T, H]
  PinnedBytes ids_host_, pick_host_;
  bool want_logits_ = true;        // ForwardOptions::step_logits
  const DevMat* embed_ = nullptr;  // the embedding table (device_embed)
  float embed_scale_ = 0.0f;       // Gemma's sqrt(H) in the run dtype, else 0
  std::vector<Seg> segs_;
  int64_t T_ = 0, maxT_ = 0, H_ = 0, V_ = 0, maxH_ = 0;
  DevBuf h_, x_, y_, q_, k_, v_, ctx_, g_, u_, act_, logits_;  // fp32 activations
  DevBuf xs_, cs_, qs_, ks_, vs_;                              // run-dtype storage
  DevBuf as_;  // a step's activation in storage from gemv_act (its input is in xs_)
  DevBuf S_, P_, Ps_, ptrs_, stats_;
  std::vector<Chunk> chunks_;
  std::map<std::tuple<size_t, int64_t, int64_t, int64_t>, DevBuf> chunk_ptrs_;  // chunk_scores
  std::map<int, Rope> ropes_;
  PinnedBytes host_;                   // one hidden state [T, H]
  DevBuf pool_seg_, pool_out_;         // pooled(): the sequences' offsets and lengths; rows + flags
  PinnedBytes pool_host_;              // their copies, a slot per state
  std::vector<int64_t> pool_pending_;  // the states of the slots not yet handed over
  int64_t last_pooled_ = -1;           // the last state the observer wants
};

void check_supported(const ModelSpec& spec) {
  for (const LayerSpec& s : spec.layers)
    if (s.mlp.moe)
      fail(
          "--device cuda: {} has mixture-of-experts layers, which the GPU path does not compute "
          "yet; use --device cpu",
          spec.arch->model_type);
  for (const LayerSpec& s : spec.layers)
    if (s.attn.head_dim > 256 || s.attn.head_dim % 2 != 0)
      fail(
          "--device cuda: head_dim {} is not supported on the GPU (even, up to 256); use "
          "--device cpu",
          s.attn.head_dim);
}

}  // namespace

bool cuda_gathers_embeddings(const ModelSpec& spec, const ForwardOptions& opt) {
  return opt.adapter == nullptr && (spec.tied || backend().cuda_weight_cap == 0);
}

CudaPass forward_cuda(const Checkpoint& ck, const ModelSpec& spec, std::span<const int64_t> lengths,
                      std::span<const float> h, const ForwardOptions& opt, Observer* obs,
                      bool sites, std::span<const int64_t> ids) {
  require_device();
  check_supported(spec);
  if (h.empty() && !cuda_gathers_embeddings(spec, opt))
    throw std::logic_error("forward_cuda: ids where the GPU does not hold the embedding table");
  CudaPass res;
  Profile::get().between();
  const auto t0 = std::chrono::steady_clock::now();
  Pass p(ck, spec, lengths, opt, obs, sites);
  if (h.empty()) p.gather_from(ck, spec, opt, ids);
  Profile::get().host(
      "pass set-up (host)",
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  res.weight_bytes = p.weight_bytes();
  try {
    res.logits = p.run(h);
  } catch (const Stop&) {
    res.stopped_early = true;
  }
  Profile::get().end();
  check(cudaDeviceSynchronize(), "forward");
  return res;
}

namespace {

// KvCache::device for --device cuda: the GPU cache, the model description it was made for (the
// passes refer to it) and one pass per token count (the prompt's, then 1), made once.
struct GpuDecoder {
  ModelSpec spec;
  std::string key;
  DevCache cache;
  std::map<int64_t, std::unique_ptr<Pass>> passes;
};

}  // namespace

std::vector<float> cuda_matvec(std::span<const float> w, std::span<const float> x, int64_t rows,
                               int64_t cols, DType dtype, bool gemv) {
  require_device();
  if (int64_t(w.size()) != rows * cols || int64_t(x.size()) != cols)
    throw std::invalid_argument("cuda_matvec: w is [rows, cols], x [cols]");
  const Dt dt = dt_of(dtype);
  const size_t eb = size_t(cuda::dt_bytes(dt));
  DevBuf wf(w.size() * sizeof(float)), xf(x.size() * sizeof(float)), ws(w.size() * eb),
      xs(x.size() * eb), out(size_t(rows) * eb), of(size_t(rows) * sizeof(float));
  check(cudaMemcpy(wf.get(), w.data(), wf.bytes(), cudaMemcpyHostToDevice), "upload");
  check(cudaMemcpy(xf.get(), x.data(), xf.bytes(), cudaMemcpyHostToDevice), "upload");
  cuda::set_stream(nullptr);
  cuda::to_storage(wf.f(), ws.get(), int64_t(w.size()), dt);
  cuda::to_storage(xf.f(), xs.get(), int64_t(x.size()), dt);
  if (gemv) {
    cuda::GemvJobs jobs;
    jobs.job[jobs.n++] = {ws.get(), rows, out.get(), dt};
    cuda::gemv(xs.get(), cols, jobs, dt);
  } else {
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t t = cuda_type(dt);
    check(cublasGemmEx(blas(), CUBLAS_OP_T, CUBLAS_OP_N, int(rows), 1, int(cols), &one, ws.get(), t,
                       int(cols), xs.get(), t, int(cols), &zero, out.get(), t, int(rows),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "linear");
  }
  cuda::convert(out.get(), dt, of.get(), Dt::F32, rows);
  std::vector<float> r(static_cast<size_t>(rows));
  check(cudaMemcpy(r.data(), of.get(), of.bytes(), cudaMemcpyDeviceToHost), "download");
  return r;
}

CudaStep forward_cuda_step(const Checkpoint& ck, std::span<const int64_t> ids, KvCache& cache,
                           const ForwardOptions& opt) {
  require_device();
  const int64_t T = int64_t(ids.size());
  const std::string key = fmt::format("{}|{}|{}|{}|{}|{}", ck.dir().string(), dtype_name(opt.dtype),
                                      attention_name(opt.attention), static_cast<const void*>(&ck),
                                      opt.step_logits, static_cast<const void*>(opt.adapter));
  auto dec = std::static_pointer_cast<GpuDecoder>(cache.device);
  if (dec && dec->key != key)
    fail("forward: this key/value cache was made for another model, dtype or attention");
  if (!dec) {
    if (cache.past != 0) fail("forward: a --device cuda step after CPU steps on one cache");
    ModelSpec spec = model_spec(ck.config());
    check_supported(spec);
    dec = std::make_shared<GpuDecoder>();
    dec->spec = std::move(spec);
    dec->key = key;
    DevCache& c = dec->cache;
    c.cap = cache.capacity > 0 ? cache.capacity : T + 4096;
    for (const LayerSpec& s : dec->spec.layers) {
      const size_t n = size_t(c.cap * s.attn.kv_heads * s.attn.head_dim);
      c.k.emplace_back(n * size_t(cuda::dt_bytes(dt_of(opt.dtype))));
      c.v.emplace_back(n * size_t(cuda::dt_bytes(dt_of(opt.dtype))));
      c.vf.emplace_back(n * sizeof(float));
    }
    cache.device = dec;
  }
  DevCache& c = dec->cache;
  c.past = cache.past;
  std::unique_ptr<Pass>& p = dec->passes[T];
  if (!p)
    p = std::make_unique<Pass>(ck, dec->spec, std::span<const int64_t>(&T, 1), opt, nullptr, false,
                               &c);
  return p->run_cached(ids);
}

}  // namespace nanscope
