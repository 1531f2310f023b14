// Whether a fine-tune diverged: the evidence `check` weighs for the `adapter_diverged` cause.
// An adapter can stay finite and still have wrecked the model (a far too high learning rate,
// no clipping): its update overwhelms the base weights, and the activations grow orders of
// magnitude past the base model's on the same input. Both are measured against the base.
//
// The thresholds come from real fine-tunes (tools/fixtures/train_adapters.py, facts in
// tests/fixtures/goldens/trained/facts.json; docs/check.md explains them): healthy adapters at
// learning rates 2e-4..5e-3 and ranks 4..64 reach a relative update norm of at most 1.4 and grow
// the largest hidden state by at most 2x; the diverged ones (5e-2, 3e-1) reach 52..621 and
// 3e4..4e8x. The limits sit between, a factor of 7 to 50 from either side.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/checkpoint.hpp"
#include "model/adapter_overlay.hpp"
#include "model/forward.hpp"

namespace nanscope {

inline constexpr double kDivergedGrowth = 100.0;  // largest |hidden| vs the base's, times
inline constexpr double kDivergedUpdate = 10.0;   // ||dW|| / ||W|| of the worst tensor

struct UpdateNorm {
  std::string tensor;
  double rel = 0;  // ||dW||_F / ||W||_F
};

// Each LoRA module's ||scale * B @ A||_F / ||W||_F, W as the base stores it (DoRA: the LoRA part).
std::vector<UpdateNorm> adapter_update_norms(const AdapterOverlay& ov, const Checkpoint& base);
// ||W_tuned - W_base||_F / ||W_base||_F of every tensor the two share (same name and shape)
// that differs.
std::vector<UpdateNorm> weight_update_norms(const Checkpoint& tuned, const Checkpoint& base);

// One fp32 eager run's figures on the input.
struct RunFigures {
  bool finite = true;
  std::vector<double> state_abs_max;  // per hidden state (NaN where not finite)
  double max_abs = 0;                 // over the decoder's states (0..N-1; the normed one left out)
  double nll = 0;                     // mean next-token NLL of the input (nats)
  std::vector<std::vector<float>> states;  // every hidden state [T, H] (the report's chart)
};
RunFigures fp32_figures(const Checkpoint& ck, const AdapterOverlay* adapter,
                        std::span<const int64_t> ids);

struct Divergence {
  bool diverged = false;
  double growth = 0;  // tuned.max_abs / base.max_abs
  UpdateNorm worst;   // the largest relative update
  RunFigures tuned, base;
  std::string detail;  // the figures in words
};
Divergence judge_divergence(const std::vector<UpdateNorm>& updates, RunFigures tuned,
                            RunFigures base);

}  // namespace nanscope
