#include "tools/check.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <map>
#include <set>

#include "common/version.hpp"
#include "formats/adapter.hpp"
#include "formats/checkpoint.hpp"
#include "formats/peft_names.hpp"
#include "tokenizer/bpe.hpp"
#include "tools/compare.hpp"
#include "tools/html_report.hpp"

namespace nanscope {

const char* cause_kind_name(CauseKind k) {
  switch (k) {
    case CauseKind::AdapterNonfinite:
      return "adapter_nonfinite";
    case CauseKind::AdapterDiverged:
      return "adapter_diverged";
    case CauseKind::WeightsNonfinite:
      return "weights_nonfinite";
    case CauseKind::MergeOverflow:
      return "merge_overflow";
    case CauseKind::ActivationOverflow:
      return "activation_overflow";
    case CauseKind::EmbeddingRows:
      return "embedding_rows";
    case CauseKind::Structure:
      return "structure";
  }
  return "?";
}

namespace {

// The module an adapter tensor belongs to:
// "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" ->
// "model.layers.0.self_attn.q_proj".
std::string adapter_module(const std::string& key) {
  const std::optional<PeftName> p = parse_peft_name(key);
  return p ? p->module : key;
}

std::string module_of_tensor(const std::string& t) {
  for (std::string_view suffix : {".weight", ".bias"})
    if (t.ends_with(suffix)) return t.substr(0, t.size() - suffix.size());
  return t;
}

bool is_attention_site(const std::string& site) {
  return site.ends_with(".scores") || site.ends_with(".probs") || site.ends_with(".context");
}

std::string g(double v) {
  return fmt::format("{:.4g}", v);
}

// Rows of the embedding that hold a non-finite value.
std::vector<int64_t> nonfinite_rows(const TensorRef& ref) {
  std::vector<int64_t> rows;
  const auto& info = *ref.info;
  if (info.shape.size() != 2 || !is_float_computable(info.dtype)) return rows;
  const int64_t V = info.shape[0], H = info.shape[1];
  const size_t esz = size_t(dtype_bits(info.dtype) / 8);
  const std::byte* p = ref.bytes().data();
  for (int64_t r = 0; r < V; ++r)
    if (value_stats(p + size_t(r * H) * esz, size_t(H), info.dtype).nonfinite()) rows.push_back(r);
  ref.release();
  return rows;
}

std::string list_rows(const std::vector<int64_t>& rows, size_t most = 20) {
  std::vector<int64_t> head(rows.begin(), rows.begin() + std::min(rows.size(), most));
  return fmt::format("{}{}", fmt::join(head, ", "),
                     rows.size() > most ? fmt::format(" and {} more", rows.size() - most) : "");
}

std::string structure_fix(FindingKind kind) {
  if (kind == FindingKind::AdapterKeys)
    return "The model was saved with PEFT wrapping: call merge_and_unload() before "
           "save_pretrained, or merge with `nanscope merge`; transformers would initialise the "
           "wrapped weights at random.";
  if (kind == FindingKind::TiedEmbeddings)
    return "Make config.json agree with the tensors: tie_word_embeddings false when "
           "lm_head.weight is its own tensor (`nanscope merge` writes it right).";
  if (kind == FindingKind::ShapeMismatch)
    return "config.json does not describe these tensors: use the config.json of the model the "
           "weights came from.";
  return "Re-download or re-save the checkpoint: transformers would initialise a missing tensor "
         "at random and only warn.";
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", &tm);
  return buf;
}

}  // namespace

CheckInput default_check_input(const std::filesystem::path& model,
                               const std::filesystem::path& tokenizer) {
  // Plain English, long enough to exercise attention across positions; the short one fits the
  // small vocabularies of test models cut from a real tokenizer.
  static constexpr const char* kPrompts[] = {
      "Hello, world! The quick brown fox jumps over the lazy dog.", "Hello, world!"};
  const int64_t vocab = Checkpoint::open(model).config().vocab_size;  // says what a bad MODEL is
  const std::filesystem::path tok = tokenizer.empty() ? model / "tokenizer.json" : tokenizer;
  std::string why = "no tokenizer.json";
  std::error_code ec;
  if (std::filesystem::exists(tok, ec)) {
    const Tokenizer tk = Tokenizer::load(tok);
    for (const char* text : kPrompts) {
      CheckInput in;
      for (int32_t id : tk.encode(text)) in.ids.push_back(id);
      const auto top = std::max_element(in.ids.begin(), in.ids.end());
      if (!in.ids.empty() && *top < vocab) {
        in.prompt = text == kPrompts[0] ? fmt::format("the default prompt \"{}\"", text)
                                        : fmt::format("the short prompt \"{}\" ({})", text, why);
        return in;
      }
      if (text == kPrompts[0])
        why = fmt::format("the default prompt \"{}\" needs token id {}, beyond vocab_size {}", text,
                          in.ids.empty() ? 0 : *top, vocab);
    }
    why = fmt::format("no prompt's ids fit vocab_size {}", vocab);
  }
  CheckInput in;
  for (int64_t id = 1; id <= 8 && id < vocab; ++id) in.ids.push_back(id);
  if (in.ids.empty()) in.ids = {0};
  in.prompt = fmt::format("ids {}..{} ({})", in.ids.front(), in.ids.back(), why);
  return in;
}

CheckResult check(const std::filesystem::path& model, const CheckOptions& opt) {
  CheckResult r;
  r.model = model;
  r.tokens = opt.ids;
  r.report.base = opt.base;
  r.report.adapter = opt.adapter;
  r.report.prompt = opt.prompt;
  r.report.version = version();
  r.report.date = utc_now();
  r.prompt = opt.prompt;
  ScanOptions so;
  so.threads = opt.threads;
  r.scan = scan(model, so);
  Checkpoint ck = Checkpoint::open(model);
  for (int64_t id : opt.ids)
    if (id < 0 || id >= ck.config().vocab_size)
      fail("token id {} is outside the vocabulary of {} (vocab_size {})", id, model.string(),
           ck.config().vocab_size);

  // Provenance inputs: the adapter's own tensors, and the base's version of each bad tensor.
  std::optional<Adapter> adapter;
  std::map<std::string, std::vector<const TensorReport*>> adapter_bad_by_module;
  std::vector<TensorReport> adapter_reports;
  if (opt.adapter) {
    adapter.emplace(Adapter::open(*opt.adapter));
    std::vector<std::pair<const SafetensorsFile*, const TensorInfo*>> list;
    for (const auto& t : adapter->file().tensors()) list.emplace_back(&adapter->file(), &t);
    adapter_reports = scan_values(list, "adapter", opt.threads);
    for (const auto& a : adapter_reports) {
      if (!a.computed || !a.stats.nonfinite()) continue;
      adapter_bad_by_module[adapter_module(a.name)].push_back(&a);
      r.causes.push_back(
          {CauseKind::AdapterNonfinite,
           {},
           {},
           {},
           "",
           a.name,
           fmt::format("the adapter itself holds {} NaN and {} inf in {} ({} values): the training "
                       "diverged, and every merge of this adapter is poisoned",
                       a.stats.nan, a.stats.inf, a.name, a.stats.count),
           "Re-train from the last finite checkpoint (lower learning rate, gradient clipping, bf16 "
           "instead of fp16 autocast) or drop this adapter; no merge of it can be healthy."});
    }
  }
  std::optional<Checkpoint> base;
  if (opt.base) base.emplace(Checkpoint::open(*opt.base));
  // Without --base, MODEL is the base and the adapter is applied unmerged (as PeftModel) in
  // every run; with --base, MODEL is the merge and base + adapter unmerged is run beside it.
  std::shared_ptr<const AdapterOverlay> overlay;
  if (opt.adapter) overlay = AdapterOverlay::open(*opt.adapter, base ? *base : ck);
  r.adapter_unmerged = overlay && !base;

  // Structure.
  for (const auto& f : r.scan.findings)
    if (f.severity == Severity::Error && f.kind != FindingKind::Nonfinite)
      r.causes.push_back({CauseKind::Structure,
                          {},
                          {},
                          {},
                          "",
                          f.tensor,
                          fmt::format("{}: {}", finding_kind_name(f.kind), f.detail),
                          structure_fix(f.kind),
                          f.kind});

  // Non-finite weights, with where they were born.
  for (const auto& t : r.scan.tensor_reports) {
    if (t.source != "model" || !t.computed || !t.stats.nonfinite()) continue;
    const std::string module = module_of_tensor(t.name);
    std::string origin;
    CauseKind kind = CauseKind::WeightsNonfinite;
    std::string fix =
        "If this model came from a merge, run check with --base and --adapter to see whether the "
        "adapter or the merge is to blame; re-merge with `nanscope merge`, which refuses to write "
        "non-finite weights.";
    auto ab = adapter_bad_by_module.find(module);
    std::optional<ValueStats> base_stats;
    if (base) {
      if (auto bt = base->find(t.name); bt && is_float_computable(bt->info->dtype)) {
        base_stats = value_stats(bt->bytes().data(), bt->info->numel(), bt->info->dtype);
        bt->release();
      }
    }
    if (ab != adapter_bad_by_module.end() && !r.adapter_unmerged) {
      origin = fmt::format("inherited from the adapter ({})", ab->second.front()->name);
      fix = "Fix the adapter (see above); the model is only as good as the adapter merged in.";
    } else if (base_stats && base_stats->nonfinite()) {
      origin = "already non-finite in the base model";
      fix = "The base checkpoint itself is damaged: re-download it, then merge again.";
    } else if (base_stats && adapter) {
      kind = CauseKind::MergeOverflow;
      origin = fmt::format(
          "the base ({}) and the adapter are finite here: the merge arithmetic overflowed the "
          "output dtype {} (W + dW beyond its range)",
          base_stats->any_finite ? fmt::format("abs max {}", g(base_stats->abs_max)) : "finite",
          run_dtype_name(t.dtype));
      fix =
          "Re-merge into bf16 or fp32 (`nanscope merge --dtype bf16`): W + dW does not fit the "
          "fp16 range.";
    } else {
      origin = adapter || base ? "origin unknown (pass both --base and --adapter)"
                               : "origin unknown (pass --base and --adapter to trace it)";
    }
    if (t.name == "model.embed_tokens.weight") {
      r.bad_embedding_rows = nonfinite_rows(ck.get(t.name));
      std::set<int64_t> bad(r.bad_embedding_rows.begin(), r.bad_embedding_rows.end());
      std::vector<int64_t> hit;
      for (int64_t id : opt.ids)
        if (bad.count(id)) hit.push_back(id);
      r.causes.push_back(
          {CauseKind::EmbeddingRows,
           {},
           {},
           {},
           "model.embed_tokens",
           t.name,
           fmt::format("{} rows of the embedding are non-finite: {} ({}); any input containing "
                       "these token ids turns NaN from the first layer on{}",
                       r.bad_embedding_rows.size(), list_rows(r.bad_embedding_rows), origin,
                       hit.empty() ? "; this input contains none of them"
                                   : fmt::format("; this input contains {}", fmt::join(hit, ", "))),
           kind == CauseKind::WeightsNonfinite && !adapter
               ? "Restore these rows from the base model (or re-merge); until then avoid these "
                 "token ids."
               : fix});
      continue;
    }
    r.causes.push_back({kind,
                        {},
                        {},
                        {},
                        "",
                        t.name,
                        fmt::format("{} NaN and {} inf among {} values; {}", t.stats.nan,
                                    t.stats.inf, t.stats.count, origin),
                        fix});
  }

  // Traces: fp32 first (the reference), then each dtype and attention profile.
  const bool runnable = std::none_of(r.causes.begin(), r.causes.end(), [](const Cause& c) {
    return c.kind == CauseKind::Structure && c.finding != FindingKind::TiedEmbeddings;
  });
  auto run = [&](DType dt, AttentionProfile at) -> const CheckRun& {
    CheckRun cr{dt, at, std::nullopt, ""};
    if (!runnable) {
      cr.error = "the checkpoint is structurally broken";
    } else {
      TraceOptions to;
      to.ids = opt.ids;
      to.dtype = dt;
      to.attention = at;
      to.device = opt.device;
      if (r.adapter_unmerged) to.adapter = overlay;
      to.site_peaks = r.runs.empty();  // the fp32 reference: the report's heat map
      try {
        cr.trace = trace(ck, to);
        if (to.site_peaks) r.report.fp32_sites = std::move(cr.trace->sites);
      } catch (const InputError& e) {
        // No GPU, or a model the GPU path does not compute: no verdict can come from the
        // runs asked for, so the command fails (exit 2) instead of judging none of them.
        if (opt.device == Device::Cuda) throw;
        cr.error = e.what();
      }
    }
    r.runs.push_back(std::move(cr));
    return r.runs.back();
  };
  const bool weights_finite = std::none_of(r.causes.begin(), r.causes.end(), [](const Cause& c) {
    return c.kind == CauseKind::WeightsNonfinite || c.kind == CauseKind::MergeOverflow ||
           c.kind == CauseKind::EmbeddingRows;
  });
  run(DType::F32, AttentionProfile::Eager);
  for (DType dt : opt.dtypes) {
    std::vector<AttentionProfile> ats = opt.attentions;
    for (size_t k = 0; k < ats.size(); ++k) {
      if (dt == DType::F32 && ats[k] == AttentionProfile::Eager) continue;  // the reference
      const CheckRun& cr = run(dt, ats[k]);
      const bool fused_asked = std::count(ats.begin(), ats.end(), AttentionProfile::Fused) > 0;
      if (!fused_asked && cr.trace && cr.trace->first_nonfinite &&
          cr.trace->first_nonfinite->finite_in_fp32 &&
          is_attention_site(cr.trace->first_nonfinite->site))
        ats.push_back(AttentionProfile::Fused);  // would SDPA / flash / SGLang survive it?
    }
  }
  if (base && overlay)
    for (DType dt : opt.dtypes) {
      CheckRun cr{dt, AttentionProfile::Eager, std::nullopt, ""};
      TraceOptions to;
      to.ids = opt.ids;
      to.dtype = dt;
      to.adapter = overlay;
      try {
        cr.trace = trace(*base, to);
      } catch (const InputError& e) {
        cr.error = e.what();
      }
      r.unmerged_runs.push_back(std::move(cr));
    }

  // Did the fine-tune diverge? Measured against the base on the same input, in fp32.
  if (runnable && weights_finite && (overlay || base)) {
    try {
      std::vector<UpdateNorm> updates = overlay ? adapter_update_norms(*overlay, base ? *base : ck)
                                                : weight_update_norms(ck, *base);
      RunFigures tuned = fp32_figures(ck, r.adapter_unmerged ? overlay.get() : nullptr, opt.ids);
      RunFigures bare = fp32_figures(base ? *base : ck, nullptr, opt.ids);
      r.divergence = judge_divergence(updates, std::move(tuned), std::move(bare));
    } catch (const InputError&) {
      // The base cannot be run on this input (another vocabulary): no divergence evidence.
    }
  }
  const bool diverged = r.divergence && r.divergence->diverged;
  if (diverged)
    r.causes.insert(
        r.causes.begin(),
        {CauseKind::AdapterDiverged,
         {},
         {},
         {},
         "",
         r.divergence->worst.tensor,
         "the adapter is finite, but the fine-tune diverged: " + r.divergence->detail +
             ". The model is broken in every dtype; overflows of fp16 runs are a consequence",
         "Go back to an earlier checkpoint of the fine-tune (before the loss rose) and re-train "
         "from it with a lower learning rate and gradient clipping; no dtype, attention kind or "
         "merge setting repairs this adapter."});

  for (const auto& cr : r.runs) {
    if (!cr.trace || !cr.trace->first_nonfinite) continue;
    if (diverged) break;  // "run in bf16" would be the wrong advice: the fine-tune is broken
    const auto& f = *cr.trace->first_nonfinite;
    if (!f.finite_in_fp32 && !(weights_finite && cr.dtype == DType::F32)) continue;  // weights
    std::string detail;
    if (cr.dtype == DType::F32) {
      detail = fmt::format("{} overflows even in fp32", f.site);
    } else {
      detail = fmt::format(
          "{} reaches |x| = {} in fp32, beyond {}'s largest finite value {}: it "
          "becomes inf in {}, then NaN",
          f.site, f.value_fp32 ? g(*f.value_fp32) : "?", run_dtype_name(cr.dtype),
          dtype_max(cr.dtype), run_dtype_name(cr.dtype));
    }
    std::string fix;
    if (is_attention_site(f.site) && cr.attention == AttentionProfile::Eager) {
      bool fused_ok = false;
      for (const auto& o : r.runs)
        if (o.dtype == cr.dtype && o.attention == AttentionProfile::Fused && o.trace &&
            o.trace->finite())
          fused_ok = true;
      if (fused_ok)
        detail += fmt::format(
            ". With fused attention (SDPA, flash attention, SGLang, vLLM: scores and softmax in "
            "fp32) the same {} run is finite: that is why another runtime works on these files",
            run_dtype_name(cr.dtype));
      fix = fmt::format(
          "Run in bf16 (the dtype Qwen models are trained in), or keep {} with "
          "attn_implementation=\"sdpa\" instead of \"eager\".",
          run_dtype_name(cr.dtype));
    } else {
      fix = fmt::format(
          "Run in bf16 or fp32: {} cannot hold this model's activations (models "
          "trained in bf16 often exceed 65504).",
          run_dtype_name(cr.dtype));
    }
    for (const CheckRun& u : r.unmerged_runs)
      if (u.dtype == cr.dtype && u.trace && u.trace->finite())
        fix += fmt::format(
            " Loading the adapter unmerged on the base (PeftModel.from_pretrained) is finite in "
            "{}, so that works too.",
            run_dtype_name(cr.dtype));
    r.causes.push_back({CauseKind::ActivationOverflow, cr.dtype, cr.attention,
                        f.layer >= 0 ? std::optional<int64_t>(f.layer) : std::nullopt, f.site, "",
                        detail, fix});
  }
  return r;
}

namespace {

nlohmann::json cause_json(const Cause& c) {
  nlohmann::json j = {{"kind", cause_kind_name(c.kind)}, {"detail", c.detail}, {"fix", c.fix}};
  j["dtype"] = c.dtype ? nlohmann::json(run_dtype_name(*c.dtype)) : nlohmann::json(nullptr);
  j["attention"] =
      c.attention ? nlohmann::json(attention_name(*c.attention)) : nlohmann::json(nullptr);
  j["layer"] = c.layer ? nlohmann::json(*c.layer) : nlohmann::json(nullptr);
  j["site"] = c.site.empty() ? nlohmann::json(nullptr) : nlohmann::json(c.site);
  j["tensor"] = c.tensor.empty() ? nlohmann::json(nullptr) : nlohmann::json(c.tensor);
  return j;
}

std::string run_label(const CheckRun& cr) {
  return fmt::format("{} {}", run_dtype_name(cr.dtype), attention_name(cr.attention));
}

std::string run_summary(const CheckRun& cr) {
  if (!cr.trace) return fmt::format("{:<11} not run: {}", run_label(cr), cr.error);
  const auto& t = *cr.trace;
  if (t.finite()) {
    double peak = 0;
    for (const auto& h : t.hidden) peak = std::max(peak, double(h.stats.abs_max));
    return fmt::format("{:<11} all {} hidden states and the logits finite (max |h| = {})",
                       run_label(cr), t.hidden.size(), g(peak));
  }
  int64_t first_bad = -1;
  for (const auto& h : t.hidden)
    if (!h.stats.finite()) {
      first_bad = h.index;
      break;
    }
  std::string where = t.first_nonfinite ? t.first_nonfinite->site : "?";
  return fmt::format("{:<11} NaN/inf from hidden state {} on; first non-finite op: {}",
                     run_label(cr), first_bad, where);
}

}  // namespace

nlohmann::json check_json(const CheckResult& r) {
  nlohmann::json j;
  j["verdict"] = r.pass() ? "PASS" : "FAIL";
  j["model"] = r.model.string();
  j["tokens"] = r.tokens;
  if (!r.prompt.empty()) j["prompt"] = r.prompt;
  j["causes"] = nlohmann::json::array();
  for (const auto& c : r.causes) j["causes"].push_back(cause_json(c));
  j["runs"] = nlohmann::json::array();
  for (const auto& cr : r.runs) {
    nlohmann::json e;
    if (cr.trace) {
      e = trace_json(*cr.trace);
      e["finite"] = cr.trace->finite();
    } else {
      e = {{"dtype", run_dtype_name(cr.dtype)},
           {"attention", attention_name(cr.attention)},
           {"error", cr.error}};
    }
    j["runs"].push_back(std::move(e));
  }
  j["adapter_unmerged"] = r.adapter_unmerged;
  j["unmerged_runs"] = nlohmann::json::array();
  for (const auto& cr : r.unmerged_runs) {
    nlohmann::json e =
        cr.trace ? trace_json(*cr.trace)
                 : nlohmann::json{{"dtype", run_dtype_name(cr.dtype)}, {"error", cr.error}};
    if (cr.trace) e["finite"] = cr.trace->finite();
    j["unmerged_runs"].push_back(std::move(e));
  }
  if (r.divergence) {
    const Divergence& d = *r.divergence;
    auto fin = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(); };
    j["divergence"] = {{"diverged", d.diverged},
                       {"growth", fin(d.growth)},
                       {"worst_tensor", d.worst.tensor},
                       {"worst_rel_update", fin(d.worst.rel)},
                       {"max_abs_tuned", fin(d.tuned.max_abs)},
                       {"max_abs_base", fin(d.base.max_abs)},
                       {"nll_tuned", fin(d.tuned.nll)},
                       {"nll_base", fin(d.base.nll)}};
  } else {
    j["divergence"] = nullptr;
  }
  nlohmann::json s = scan_to_json(r.scan);
  s.erase("tensor_stats");
  j["scan"] = s;
  j["bad_embedding_rows"] = r.bad_embedding_rows;
  return j;
}

std::string check_text(const CheckResult& r) {
  // The verdict first, then the evidence (causes with their numbers, the runs, the quick-test
  // table of the first failing run), then what to do.
  std::string s = fmt::format("{}  {}  ({} tokens: [{}])\n", r.pass() ? "PASS" : "FAIL",
                              r.model.string(), r.tokens.size(), fmt::join(r.tokens, ", "));
  if (!r.prompt.empty()) s += fmt::format("Input: {}\n", r.prompt);
  if (r.pass())
    s += "No cause found: structure matches config.json, every weight is finite, and every run "
         "stayed finite.\n";
  for (size_t i = 0; i < r.causes.size(); ++i) {
    const Cause& c = r.causes[i];
    std::string where;
    if (c.dtype)
      where += fmt::format(" [{} {}]", run_dtype_name(*c.dtype),
                           c.attention ? attention_name(*c.attention) : "");
    if (!c.tensor.empty())
      where += " " + c.tensor;
    else if (!c.site.empty())
      where += " " + c.site;
    s += fmt::format("\nCause {}: {}{}\n  {}\n", i + 1, cause_kind_name(c.kind), where, c.detail);
  }
  if (r.adapter_unmerged)
    s += "\nThe adapter was applied unmerged to the model in every run (as peft's PeftModel "
         "computes it). To check a merged model, pass it as MODEL with --base and --adapter.\n";
  s += "\nEvidence (traces on the CPU, as transformers computes):\n";
  for (const auto& cr : r.runs)
    s += "  " + std::string(r.adapter_unmerged ? "base + adapter unmerged " : "") +
         run_summary(cr) + "\n";
  for (const auto& cr : r.unmerged_runs) s += "  base + adapter unmerged " + run_summary(cr) + "\n";
  if (r.divergence)
    s += fmt::format(
        "  against the base: largest |h| {}x the base's, largest relative update {} "
        "({}), next-token NLL {} vs {} nats\n",
        g(r.divergence->growth), g(r.divergence->worst.rel), r.divergence->worst.tensor,
        g(r.divergence->tuned.nll), g(r.divergence->base.nll));
  for (const auto& cr : r.runs)
    if (cr.trace && !cr.trace->finite()) {
      s += fmt::format("\nQuick test, {}:\n", run_label(cr));
      s += trace_text(*cr.trace);
      break;
    }
  if (!r.causes.empty()) {
    s += "\nFix:\n";
    std::set<std::string> said;
    for (size_t i = 0; i < r.causes.size(); ++i)
      if (said.insert(r.causes[i].fix).second)
        s += fmt::format("  ({}) {}\n", i + 1, r.causes[i].fix);
  }
  return s;
}

std::string check_html(const CheckResult& r) {
  HtmlReport h;
  const std::string model = r.model.string();
  h.title = fmt::format("nanscope check {}: {}", r.pass() ? "PASS" : "FAIL", model);
  h.verdict = r.pass() ? "PASS" : "FAIL";
  h.subject = model;

  h.facts.push_back({"Model", model, true});
  if (r.report.base) h.facts.push_back({"Base", r.report.base->string(), true});
  if (r.report.adapter) h.facts.push_back({"Adapter", r.report.adapter->string(), true});
  // A long prompt (a whole document) would push the map off the first screens: its head only.
  std::string prompt = r.report.prompt.empty() ? "(given as token ids)" : r.report.prompt;
  if (prompt.size() > 400) {
    size_t cut = 400;
    while (cut > 0 && (static_cast<unsigned char>(prompt[cut]) & 0xC0) == 0x80) --cut;  // UTF-8
    prompt = prompt.substr(0, cut) + fmt::format(" ... ({} bytes in all)", r.report.prompt.size());
  }
  h.facts.push_back({"Prompt", prompt});
  std::vector<int64_t> head(r.tokens.begin(),
                            r.tokens.begin() + std::min<ptrdiff_t>(ptrdiff_t(r.tokens.size()), 64));
  h.facts.push_back({"Tokens",
                     fmt::format("{}: [{}{}]", r.tokens.size(), fmt::join(head, ", "),
                                 r.tokens.size() > head.size() ? ", ..." : ""),
                     true});
  std::vector<std::string> labels;
  for (const auto& cr : r.runs) labels.push_back(run_label(cr));
  h.facts.push_back({"Runs", fmt::format("{} (fp32 is the reference)", fmt::join(labels, ", "))});
  h.facts.push_back({"nanscope", r.report.version});
  h.facts.push_back({"Date", r.report.date});

  for (const auto& c : r.causes) {
    std::vector<std::string> where;
    if (c.dtype)
      where.push_back(
          fmt::format("{}{}", run_dtype_name(*c.dtype),
                      c.attention ? " " + std::string(attention_name(*c.attention)) : ""));
    if (c.layer) where.push_back(fmt::format("layer {}", *c.layer));
    if (!c.tensor.empty())
      where.push_back(c.tensor);
    else if (!c.site.empty())
      where.push_back(c.site);
    h.causes.push_back(
        {cause_kind_name(c.kind), fmt::format("{}", fmt::join(where, " · ")), c.detail, c.fix});
  }

  if (r.divergence) {  // the fine-tune against its base, state by state (fp32)
    DivergenceSeries ds{
        r.adapter_unmerged ? "base + adapter (unmerged) vs base, fp32" : "model vs base, fp32", {}};
    const auto& a = r.divergence->tuned.states;
    const auto& b = r.divergence->base.states;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      const StateDiff d = diff_states(a[i], b[i]);
      ds.rel_err.push_back(d.finite ? d.rel_err : std::nan(""));
    }
    h.divergence.push_back(std::move(ds));
  }

  for (const auto& cr : r.runs) {
    ReportRun rr;
    rr.label = run_label(cr);
    rr.dtype = std::string(run_dtype_name(cr.dtype));
    rr.limit = dtype_max(cr.dtype);
    // The fused profile keeps scores and softmax in fp32 (forward.md): fp16's limit is not theirs.
    if (cr.attention == AttentionProfile::Fused)
      rr.fp32_sites = {"self_attn.scores", "self_attn.probs"};
    rr.ran = cr.trace.has_value();
    rr.finite = rr.ran && cr.trace->finite();
    std::string line = run_summary(cr);
    rr.summary = line.substr(std::min(line.size(), rr.label.size()));
    while (!rr.summary.empty() && rr.summary.front() == ' ') rr.summary.erase(0, 1);
    if (rr.ran && cr.trace->first_nonfinite)
      rr.first_nonfinite = {cr.trace->first_nonfinite->layer, cr.trace->first_nonfinite->site};
    h.runs.push_back(std::move(rr));
  }
  h.fp32_sites = r.report.fp32_sites;

  ReportTable states{"Hidden states per run (max |value|; NaN/inf counted)", {"state"}, {}};
  size_t n = 0;
  for (const auto& cr : r.runs)
    if (cr.trace) {
      states.header.push_back(run_label(cr));
      n = std::max(n, cr.trace->hidden.size());
    }
  for (size_t i = 0; i < n; ++i) {
    std::vector<std::string> row{std::to_string(i)};
    for (const auto& cr : r.runs) {
      if (!cr.trace) continue;
      if (i >= cr.trace->hidden.size()) {
        row.push_back("");
        continue;
      }
      const auto& st = cr.trace->hidden[i].stats;
      row.push_back(st.finite() ? g(st.abs_max) : fmt::format("NaN x{} inf x{}", st.nan, st.inf));
    }
    states.rows.push_back(std::move(row));
  }
  h.tables.push_back(std::move(states));
  return render_html(h);
}

}  // namespace nanscope
