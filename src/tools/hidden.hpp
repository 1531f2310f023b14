// `nanscope hidden`: hidden states of many inputs (discrete prompts, soft inputs as in Soft
// Thinking, or both mixed), written to safetensors shards with an index, resumable.
// docs/hidden.md is the user-facing description of the input lines, the soft-token semantics
// and the output layout.
//
// API for the CLI (src/cli/cmd_hidden.cpp), the Python bindings (python/) and the bench:
//   Checkpoint ck = Checkpoint::open(dir);
//   HiddenInput in;  in.ids = {...};  in.soft[3] = {{17, 0.7f}, {42, 0.3f}};
//   HiddenStates s = hidden_states(ck, in, fwd);        // N+1 states [T, H], float32
//   HiddenRunSummary r = run_hidden(opt);               // the whole jsonl -> DIR
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "formats/checkpoint.hpp"
#include "model/forward.hpp"

namespace nanscope {

// One soft position: (token id, probability) pairs, summed in this order.
using Mixture = std::vector<std::pair<int64_t, float>>;

struct HiddenInput {
  std::string id;
  // Discrete token ids, one per position. For a pure soft input, empty (then soft holds every
  // position 0..T-1). Positions in `soft` replace the id at that position.
  std::vector<int64_t> ids;
  std::map<int64_t, Mixture> soft;
  int64_t line = 0;  // 1-based line of the jsonl, 0 when not read from a file

  int64_t tokens() const { return ids.empty() ? int64_t(soft.size()) : int64_t(ids.size()); }
  bool has_soft() const { return !soft.empty(); }
  std::string_view kind() const;  // "ids" | "soft" | "mixed"
};

struct InputRules {
  int64_t vocab_size = 0;  // ids and mixture tokens must lie in [0, vocab_size)
  // Probabilities of a position must sum to 1 within this tolerance (an InputError otherwise),
  // unless allow_unnormalized, which takes any finite non-negative weights as given.
  double sum_tolerance = 1e-3;
  bool allow_unnormalized = false;
};

// Checks one input against the rules: ids in range, soft positions inside the ids, mixtures not
// empty, probabilities finite, non-negative and summing to ~1. Throws InputError whose message
// starts with `where` ("inputs.jsonl:12").
void validate_input(const HiddenInput& in, const InputRules& rules, std::string_view where);

// Parses one jsonl line (already JSON-decoded). `tokenize` turns "text" into ids; it may be
// empty, and then a "text" line is an InputError. Throws InputError starting with `where`.
using TokenizeFn = std::function<std::vector<int64_t>(const std::string&)>;
HiddenInput parse_hidden_input(const nlohmann::json& j, const TokenizeFn& tokenize,
                               std::string_view where);

// Reads and validates every line of a jsonl file (blank lines skipped). The tokenizer is
// loaded from `tokenizer` (a tokenizer.json or a model directory) on the first "text" line.
// Duplicate ids are an error naming both lines. Throws InputError "FILE:LINE: what".
std::vector<HiddenInput> read_hidden_inputs(const std::filesystem::path& jsonl,
                                            const std::filesystem::path& tokenizer,
                                            const InputRules& rules);
// The same from the text of a jsonl file; `what` names it in messages ("what:LINE: ...").
std::vector<HiddenInput> parse_hidden_jsonl(std::string_view text, std::string_view what,
                                            const TokenizeFn& tokenize, const InputRules& rules);

// The input embeddings [T, H] of an input: every position's row of model.embed_tokens as the
// run dtype holds it (the stored value cast to dt, as transformers casts at load), widened to
// fp32; a soft position is sum_k p_k * row(tok_k) in fp32, in list order, without fused
// multiply-add; then every value rounded once to dt. A discrete position is thus exactly
// embed_tokens' output, and a one-hot mixture equals its token.
std::vector<float> input_embeddings(const Checkpoint& ck, const HiddenInput& in, DType dt);

struct HiddenStates {
  int64_t T = 0, H = 0;
  // states[k] for k in 0..N: [T * H] float32 (values in the run dtype), or empty for a layer
  // not asked for.
  std::vector<std::vector<float>> states;
};

// Runs one input. `layers` (sorted, each in 0..N) limits which states are kept; empty = all. The
// pass stops after the last state asked for (no lm_head). Throws InputError.
HiddenStates hidden_states(const Checkpoint& ck, const HiddenInput& in, const ForwardOptions& fwd,
                           std::span<const int64_t> layers = {});
// Same from input embeddings [T, H] (rounded to the run dtype first, as forward_embeddings).
HiddenStates hidden_states_embeddings(const Checkpoint& ck, std::span<const float> embeddings,
                                      int64_t T, const ForwardOptions& fwd,
                                      std::span<const int64_t> layers = {});

// Runs several inputs through one batched forward pass (forward_batch): each is computed as it
// would be alone. sink(i, k, state) receives state k ([T_i, H], float32 values in the run dtype)
// of inputs[i] as soon as the pass has computed it, for each k of `layers` (sorted; empty = all);
// the pass stops after the last one. Memory: the activations of all rows, not the states.
using StateSink = std::function<void(size_t input, int64_t layer, std::span<const float> state)>;
void hidden_states_batch(const Checkpoint& ck, std::span<const HiddenInput* const> inputs,
                         const ForwardOptions& fwd, std::span<const int64_t> layers,
                         const StateSink& sink);
// The same with each state reduced per input (pool_state) for each of `pools` (Last, Mean):
// sink(i, k, pool, values [H], state_finite) where state_finite says whether the whole state
// [T_i, H] was finite. With --device cuda the reductions happen on the GPU and only [inputs, H]
// per state and pool comes back; on the CPU they are pool_state of the whole state.
using PooledSink = std::function<void(size_t input, int64_t layer, Pool pool,
                                      std::span<const float> values, bool state_finite)>;
void hidden_states_pooled(const Checkpoint& ck, std::span<const HiddenInput* const> inputs,
                          const ForwardOptions& fwd, std::span<const int64_t> layers,
                          std::span<const Pool> pools, const PooledSink& sink);

// Inputs of these token counts, in order, grouped into batches of at most batch_tokens tokens
// (an input longer than that is a batch alone): the [begin, end) index range of each batch.
std::vector<std::pair<size_t, size_t>> batch_ranges(std::span<const int64_t> tokens,
                                                    int64_t batch_tokens);

std::optional<Pool> parse_pool(std::string_view s);  // "none" | "last" | "mean"
std::string_view pool_name(Pool p);

// Pooling as transformers users write it on float32-cast states: last = h[T-1]; mean =
// h.float().mean(dim=1): an fp32 sum over positions, divided by T. None returns the state.
std::vector<float> pool_state(std::span<const float> state, int64_t T, int64_t H, Pool p);

// "0,5,36" or "all" against N+1 states -> sorted, unique indices. Negative indices count from
// the end (-1 = N). Throws InputError for an index out of range.
std::vector<int64_t> parse_layers(std::string_view s, int64_t num_states);

struct HiddenRunSummary;

// One of N deterministic slices of the input (--shard K/N): the inputs at positions i (0-based,
// in file order) with i % N == K. Round robin rather than contiguous blocks, so that lines
// appended to the file later leave every earlier input in its slice (resuming stays valid) and
// a file sorted by length spreads evenly.
struct Slice {
  int64_t index = 0, count = 1;
};
// "K/N" with 0 <= K < N. Throws InputError naming --shard otherwise.
Slice parse_slice(std::string_view s);
// The directory a slice writes under --out: "slice-00002-of-00008".
std::string slice_dir_name(Slice s);

struct HiddenRunOptions {
  std::filesystem::path model, input, out;
  std::filesystem::path tokenizer;  // empty: MODEL/tokenizer.json
  std::string layers = "all";
  Pool pool = Pool::None;
  ForwardOptions fwd;
  // A PEFT adapter applied unmerged (as PeftModel) to every input; recorded in the settings, so
  // that a resumed run cannot mix states with and without it.
  std::optional<std::filesystem::path> adapter;
  bool out_run_dtype = false;  // store tensors in the run dtype instead of float32
  // Inputs (in file order) are run through the model together up to this many tokens (an
  // input longer than that alone); each batch is written as one shard.
  int64_t batch_tokens = 4096;
  InputRules rules;  // vocab_size is taken from the model
  // Only this slice of the inputs, written to out / slice_dir_name(*shard) (so that slices
  // started at once never share a directory); its index records the slice in its settings.
  std::optional<Slice> shard;
  // Called after each batch with (inputs done, inputs to do, tokens done, tokens to do).
  std::function<void(int64_t, int64_t, int64_t, int64_t)> progress;
  // Called once a shard and the index naming it are in place: the summary so far (its last
  // shard is that one) and how many inputs the shard holds.
  std::function<void(const HiddenRunSummary&, int64_t)> on_shard;
};

struct NonfiniteInput {
  std::string id;
  std::vector<int64_t> layers;  // states (of those written) holding NaN/inf
};

struct HiddenRunSummary {
  std::filesystem::path out, index;
  int64_t inputs = 0;   // inputs of the input file (of its slice, with a shard)
  int64_t written = 0;  // inputs computed by this run
  int64_t skipped = 0;  // inputs already in the index
  int64_t tokens = 0;   // tokens computed by this run
  double seconds = 0;
  std::vector<std::string> shards;        // written by this run
  std::vector<NonfiniteInput> nonfinite;  // over the whole index, this run's and earlier ones
  bool clean() const { return nonfinite.empty(); }
};

// Reads and validates the whole input first (nothing is computed on a bad line), then runs the
// inputs not yet in OUT/index.json, writing each shard atomically and then the index
// atomically. An existing index written with other settings (model, dtype, attention, layers,
// pool, out dtype) is an InputError. Throws InputError / OutputError.
HiddenRunSummary run_hidden(const HiddenRunOptions& opt);

nlohmann::json hidden_summary_json(const HiddenRunSummary& r);
std::string hidden_summary_text(const HiddenRunSummary& r);

}  // namespace nanscope
