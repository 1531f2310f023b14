// Decoding (generate.hpp): a prefill of the prompt, then one token per step through the
// key/value cache of model/forward.hpp, as transformers' generate runs its DynamicCache.
#include "tools/generate.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "common/error.hpp"
#include "common/interrupt_check.hpp"
#include "model/weights.hpp"
#include "numerics/backend.hpp"
#include "numerics/profile.hpp"
#include "numerics/stats.hpp"
#include "tokenizer/bpe.hpp"
#include "tools/trace.hpp"

namespace nanscope {

namespace fs = std::filesystem;

namespace {

std::vector<int64_t> ids_of(const nlohmann::json& v) {
  std::vector<int64_t> out;
  if (v.is_number_integer()) out.push_back(v.get<int64_t>());
  if (v.is_array())
    for (const auto& e : v)
      if (e.is_number_integer()) out.push_back(e.get<int64_t>());
  return out;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  if (!f) return nullptr;
  try {
    return nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON ({})", p.string(), e.what());
  }
}

// argmax with the first index among equal values (torch.argmax).
int64_t argmax(const std::vector<float>& v) {
  int64_t best = 0;
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] > v[size_t(best)]) best = int64_t(i);
  return best;
}

// transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit divided by the penalty
// when positive, multiplied when negative.
void repetition_penalty(std::vector<float>& logits, const std::vector<int64_t>& seen, float p) {
  std::vector<bool> done(logits.size(), false);
  for (int64_t id : seen) {
    if (done[size_t(id)]) continue;
    done[size_t(id)] = true;
    float& x = logits[size_t(id)];
    x = x < 0 ? x * p : x / p;
  }
}

int64_t sample(std::vector<float> logits, const GenerateOptions& o, std::mt19937_64& rng) {
  const int64_t V = int64_t(logits.size());
  for (float& x : logits) x = float(double(x) / o.temperature);
  std::vector<int64_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
  int64_t keep = o.top_k > 0 ? std::min(o.top_k, V) : V;
  const double m = logits[size_t(order[0])];
  std::vector<double> p(static_cast<size_t>(keep));
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i)
    sum += p[size_t(i)] = std::exp(logits[size_t(order[size_t(i)])] - m);
  if (o.top_p < 1.0) {  // the smallest prefix whose mass reaches top_p (at least one token)
    double acc = 0;
    int64_t n = 0;
    while (n < keep && acc < o.top_p * sum) acc += p[size_t(n++)];
    keep = std::max<int64_t>(n, 1);
    sum = acc > 0 ? acc : p[0];
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(rng), acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += p[size_t(i)];
    if (r < acc) return order[size_t(i)];
  }
  return order[size_t(keep - 1)];
}

}  // namespace

std::vector<int64_t> eos_ids(const Checkpoint& ck) {
  const nlohmann::json g = read_json(ck.dir() / "generation_config.json");
  if (g.is_object() && g.contains("eos_token_id")) {
    auto v = ids_of(g["eos_token_id"]);
    if (!v.empty()) return v;
  }
  const nlohmann::json c = read_json(ck.dir() / "config.json");
  if (c.is_object() && c.contains("eos_token_id")) return ids_of(c["eos_token_id"]);
  return {};
}

GenerateResult generate(const Checkpoint& ck, const GenerateOptions& opt) {
  if (opt.prompt.empty()) fail("generate: no prompt (give --ids or --text)");
  if (opt.max_new_tokens < 0) fail("generate: --max-new-tokens {} is negative", opt.max_new_tokens);
  if (!(opt.temperature >= 0.0) || !std::isfinite(opt.temperature))
    fail("generate: --temperature {} must be 0 (greedy) or positive", opt.temperature);
  if (!(opt.top_p > 0.0 && opt.top_p <= 1.0))
    fail("generate: --top-p {} must be in (0, 1]", opt.top_p);
  if (opt.top_k < 0) fail("generate: --top-k {} is negative", opt.top_k);
  const bool sampling = opt.temperature > 0.0;
  if (!sampling && (opt.top_k > 0 || opt.top_p < 1.0))
    fail("generate: --top-k / --top-p need --temperature > 0 (temperature 0 is greedy)");

  GenerateResult r;
  r.prompt_ids = opt.prompt;
  const std::vector<int64_t> eos = opt.eos ? *opt.eos : eos_ids(ck);
  float penalty = 1.0f;
  const nlohmann::json g = read_json(ck.dir() / "generation_config.json");
  if (g.is_object()) {
    if (g.contains("repetition_penalty") && g["repetition_penalty"].is_number() &&
        g["repetition_penalty"].get<double>() != 1.0) {
      penalty = g["repetition_penalty"].get<float>();
      r.notes.push_back(
          fmt::format("repetition_penalty {} (generation_config.json) applied", penalty));
    }
    for (const char* k :
         {"no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
          "min_new_tokens", "min_length", "forced_bos_token_id", "forced_eos_token_id"})
      if (g.contains(k) && !g[k].is_null() && !(g[k].is_number() && g[k].get<double>() == 0))
        r.notes.push_back(fmt::format("{} in generation_config.json is not applied", k));
  }

  ForwardOptions fo;
  fo.dtype = opt.dtype;
  fo.attention = opt.attention;
  fo.adapter = opt.adapter.get();
  // Every step reads all weights again: from resident copies (the mapping's pages are handed
  // back once copied), or from the mapping kept whole.
  ResidentWeights resident;
  fo.resident = opt.resident ? &resident : nullptr;
  fo.release_pages = opt.resident;
  fo.device = opt.device;
  KvCache cache;
  if (opt.device == Device::Cuda) {
    // The weights live on the GPU; the host reads only embedding rows, from the mapping.
    fo.resident = nullptr;
    fo.release_pages = true;
    cache.capacity = int64_t(opt.prompt.size()) + opt.max_new_tokens;
    // Greedy decoding needs only the argmax and whether the row is finite: computed on the GPU,
    // the row stays there.
    fo.step_logits = sampling || penalty != 1.0f || opt.keep_logits;
  }
  std::mt19937_64 rng(opt.seed);
  std::vector<int64_t> seen = opt.prompt, input = opt.prompt;
  r.finish_reason = "length";
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    check_interrupt();
    const auto t0 = std::chrono::steady_clock::now();
    ForwardResult fr = forward_step(ck, input, cache, fo);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    (step == 0 ? r.prefill_s : r.decode_s) += dt;
    if (profile::enabled())  // beside the pass's own line: what the step cost beyond its parts
      std::fprintf(stderr, "nanscope profile (step %lld): %.4fs\n", static_cast<long long>(step),
                   dt);
    if (fr.logits.empty() ? !fr.logits_finite : !all_finite(fr.logits)) {
      // Name the first non-finite site: the whole sequence so far traced with sites.
      TraceOptions to;
      to.ids = seen;
      to.dtype = opt.dtype;
      to.attention = opt.attention;
      to.adapter = opt.adapter;
      to.shadow_fp32 = false;
      to.device = opt.device;
      const TraceResult tr = trace(ck, to);
      GenerateStep s;
      s.step = step;
      if (tr.first_nonfinite) {
        s.layer = tr.first_nonfinite->layer;
        s.site = tr.first_nonfinite->site;
      } else {
        s.site = "lm_head";
      }
      r.first_nonfinite = s;
      r.finish_reason = "nonfinite";
      break;
    }
    if (penalty != 1.0f) repetition_penalty(fr.logits, seen, penalty);
    if (opt.keep_logits) r.step_logits.push_back(fr.logits);
    const int64_t next = fr.logits.empty() ? fr.argmax
                         : sampling        ? sample(fr.logits, opt, rng)
                                           : argmax(fr.logits);
    r.ids.push_back(next);
    seen.push_back(next);
    input.assign(1, next);
    if (std::find(eos.begin(), eos.end(), next) != eos.end()) {
      r.finish_reason = "eos";
      break;
    }
  }
  if (fs::exists(ck.dir() / "tokenizer.json")) {
    const Tokenizer tok = Tokenizer::load(ck.dir());
    std::vector<int32_t> ids32;
    for (int64_t id : r.ids)
      if (id >= 0 && size_t(id) < tok.vocab_size()) ids32.push_back(int32_t(id));
    r.text = tok.decode(ids32, true);
  }
  return r;
}

nlohmann::json generate_json(const GenerateResult& r) {
  nlohmann::json j;
  j["prompt_ids"] = r.prompt_ids;
  j["ids"] = r.ids;
  j["text"] = r.text ? nlohmann::json(*r.text) : nlohmann::json(nullptr);
  j["finish_reason"] = r.finish_reason;
  if (r.first_nonfinite)
    j["first_nonfinite"] = {{"step", r.first_nonfinite->step},
                            {"layer", r.first_nonfinite->layer},
                            {"site", r.first_nonfinite->site}};
  else
    j["first_nonfinite"] = nullptr;
  j["notes"] = r.notes;
  j["prefill_s"] = r.prefill_s;
  j["decode_s"] = r.decode_s;
  const size_t decoded = r.ids.empty() ? 0 : r.ids.size() - 1;
  j["tokens_per_s"] = r.decode_s > 0 && decoded > 0 ? double(decoded) / r.decode_s : 0.0;
  return j;
}

std::string generate_text(const GenerateResult& r) {
  std::string out;
  if (r.text) out += *r.text + "\n";
  out += fmt::format("[{} new tokens: {}; finish: {}]\n", r.ids.size(), fmt::join(r.ids, ","),
                     r.finish_reason);
  if (r.first_nonfinite)
    out += fmt::format(
        "Step {}: the logits are not finite; first non-finite site {} (layer {}). An engine that "
        "samples from them prints token 0 (\"!!!!\" in many vocabularies); run `nanscope trace` "
        "on the prompt for the full picture.\n",
        r.first_nonfinite->step, r.first_nonfinite->site, r.first_nonfinite->layer);
  for (const auto& n : r.notes) out += "Note: " + n + "\n";
  return out;
}

}  // namespace nanscope
