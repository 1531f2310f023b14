// The Python module `nanscope`: hidden states of discrete and soft inputs as numpy arrays, and
// scan / check / trace as dicts (the JSON documents of docs/interface.md).
//
//   m = nanscope.Model("path/to/checkpoint")
//   hs = m.hidden_states([1, 2, 3], dtype="bf16")             # N+1 arrays [T, H] float32
//   soft = m.hidden_states_soft([[(17, 0.7), (42, 0.3)], ...])  # one mixture per position
//
// InputError becomes ValueError, OutputError OSError. The GIL is released during the forward
// pass; state arrays own their std::vector through a capsule (no copy).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "formats/checkpoint.hpp"
#include "formats/hub.hpp"
#include "tokenizer/bpe.hpp"
#include "tools/check.hpp"
#include "tools/hidden.hpp"
#include "tools/scan.hpp"
#include "tools/trace.hpp"

namespace py = pybind11;
using namespace nanscope;

namespace {

using PyMixture = std::vector<std::pair<int64_t, double>>;

py::object to_py(const nlohmann::json& j) {
  return py::module_::import("json").attr("loads")(j.dump());
}

py::array_t<float> to_numpy(std::vector<float>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<float>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<float>*>(p); });
  return py::array_t<float>(shape, owned->data(), owner);
}

ForwardOptions fwd_options(const std::string& dtype, const std::string& attention) {
  ForwardOptions f;
  // A Model object is run many times: weight pages stay mapped between calls.
  f.release_pages = false;
  auto dt = parse_run_dtype(dtype);
  if (!dt) fail("dtype \"{}\": expected fp32, bf16 or fp16", dtype);
  auto at = parse_attention(attention);
  if (!at) fail("attention \"{}\": expected eager or fused", attention);
  f.dtype = *dt;
  f.attention = *at;
  return f;
}

Mixture to_mixture(const PyMixture& m) {
  Mixture out;
  for (const auto& [t, p] : m) out.emplace_back(t, float(p));
  return out;
}

py::list states_to_list(HiddenStates&& s) {
  py::list out;
  for (auto& st : s.states) {
    if (st.empty())
      out.append(py::none());
    else
      out.append(to_numpy(std::move(st), {s.T, s.H}));
  }
  return out;
}

std::vector<int64_t> layer_list(const std::optional<std::vector<int64_t>>& layers, int64_t S) {
  if (!layers) return {};
  std::vector<int64_t> out;
  for (int64_t l : *layers) {
    const int64_t v = l < 0 ? l + S : l;
    if (v < 0 || v >= S)
      fail("layers: state {} does not exist: the model has states 0..{}", l, S - 1);
    out.push_back(v);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

class Model {
 public:
  explicit Model(const std::string& path)
      : ck_(std::make_shared<Checkpoint>(Checkpoint::open(resolve_model_path(path)))) {}

  py::object config() const { return to_py(ck_->config().raw); }
  std::string path() const { return ck_->dir().string(); }
  int64_t num_states() const { return ck_->config().num_hidden_layers + 1; }

  std::vector<int64_t> tokenize(const std::string& text) {
    if (!tk_) {
      const auto p = ck_->dir() / "tokenizer.json";
      if (!std::filesystem::exists(p))
        fail("{}: no tokenizer.json to tokenize text; give token ids", ck_->dir().string());
      tk_ = std::make_shared<Tokenizer>(Tokenizer::load(p));
    }
    std::vector<int64_t> out;
    for (int32_t i : tk_->encode(text)) out.push_back(i);
    return out;
  }

  py::list hidden_states(const std::vector<int64_t>& ids, const std::string& dtype,
                         const std::string& attention,
                         const std::optional<std::vector<int64_t>>& layers) {
    HiddenInput in;
    in.id = "input";
    in.ids = ids;
    return run(std::move(in), dtype, attention, layers, false);
  }

  // Many prompts through the batched forward pass (up to batch_tokens tokens per pass), as
  // `nanscope hidden` runs them: one list of N+1 states per prompt.
  py::list hidden_states_batch(const std::vector<std::vector<int64_t>>& prompts,
                               const std::string& dtype, const std::string& attention,
                               const std::optional<std::vector<int64_t>>& layers,
                               int64_t batch_tokens) {
    if (batch_tokens <= 0) fail("batch_tokens {}: must be positive", batch_tokens);
    const ForwardOptions f = fwd_options(dtype, attention);
    const auto ls = layer_list(layers, num_states());
    std::vector<HiddenInput> inputs(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      inputs[i].id = std::to_string(i);
      inputs[i].ids = prompts[i];
      validate_input(inputs[i], rules(false), fmt::format("prompt {}", i));
    }
    const int64_t S = num_states(), H = ck_->config().hidden_size;
    std::vector<HiddenStates> out(prompts.size());
    for (auto& o : out) o.states.resize(size_t(S)), o.H = H;
    {
      py::gil_scoped_release nogil;
      std::vector<int64_t> lengths;
      for (const auto& in : inputs) lengths.push_back(in.tokens());
      for (const auto& [b0, b1] : batch_ranges(lengths, batch_tokens)) {
        std::vector<const HiddenInput*> batch;
        for (size_t i = b0; i < b1; ++i) batch.push_back(&inputs[i]);
        nanscope::hidden_states_batch(*ck_, batch, f, ls,
                                      [&](size_t b, int64_t k, std::span<const float> st) {
                                        HiddenStates& o = out[b0 + b];
                                        o.T = int64_t(st.size()) / H;
                                        o.states[size_t(k)].assign(st.begin(), st.end());
                                      });
      }
    }
    py::list result;
    for (auto& o : out) result.append(states_to_list(std::move(o)));
    return result;
  }

  // x: a float array [T, H] (input embeddings), a list of mixtures (one per position), or, with
  // ids, a dict {position: mixture} replacing those positions of ids.
  py::list hidden_states_soft(py::object x, std::optional<std::vector<int64_t>> ids,
                              const std::string& dtype, const std::string& attention,
                              const std::optional<std::vector<int64_t>>& layers,
                              bool allow_unnormalized) {
    if (py::isinstance<py::array>(x)) {
      if (ids) fail("hidden_states_soft: ids are given with an embedding array; pass mixtures");
      auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(x);
      if (!a || a.ndim() != 2 || a.shape(1) != ck_->config().hidden_size)
        fail("hidden_states_soft: embeddings must be a float array [T, {}]",
             ck_->config().hidden_size);
      const int64_t T = a.shape(0);
      std::vector<float> e(a.data(), a.data() + a.size());
      const ForwardOptions f = fwd_options(dtype, attention);
      const auto ls = layer_list(layers, num_states());
      HiddenStates s;
      {
        py::gil_scoped_release nogil;
        s = hidden_states_embeddings(*ck_, e, T, f, ls);
      }
      return states_to_list(std::move(s));
    }
    return run(input_of(x, std::move(ids)), dtype, attention, layers, allow_unnormalized);
  }

  py::array_t<float> embed(py::object x, std::optional<std::vector<int64_t>> ids,
                           const std::string& dtype, bool allow_unnormalized) {
    HiddenInput in = input_of(x, std::move(ids));
    validate_input(in, rules(allow_unnormalized), "embed");
    const ForwardOptions f = fwd_options(dtype, "eager");
    std::vector<float> e;
    {
      py::gil_scoped_release nogil;
      e = input_embeddings(*ck_, in, f.dtype);
    }
    return to_numpy(std::move(e), {in.tokens(), ck_->config().hidden_size});
  }

 private:
  InputRules rules(bool allow_unnormalized) const {
    InputRules r;
    r.vocab_size = ck_->config().vocab_size;
    r.allow_unnormalized = allow_unnormalized;
    return r;
  }

  HiddenInput input_of(py::object x, std::optional<std::vector<int64_t>> ids) const {
    HiddenInput in;
    in.id = "input";
    if (ids) {
      in.ids = std::move(*ids);
      for (const auto& [pos, m] : x.cast<std::map<int64_t, PyMixture>>())
        in.soft[pos] = to_mixture(m);
    } else {
      const auto mixes = x.cast<std::vector<PyMixture>>();
      for (size_t t = 0; t < mixes.size(); ++t) in.soft[int64_t(t)] = to_mixture(mixes[t]);
    }
    return in;
  }

  py::list run(HiddenInput in, const std::string& dtype, const std::string& attention,
               const std::optional<std::vector<int64_t>>& layers, bool allow_unnormalized) {
    validate_input(in, rules(allow_unnormalized), "input");
    const ForwardOptions f = fwd_options(dtype, attention);
    const auto ls = layer_list(layers, num_states());
    HiddenStates s;
    {
      py::gil_scoped_release nogil;
      s = nanscope::hidden_states(*ck_, in, f, ls);
    }
    return states_to_list(std::move(s));
  }

  std::shared_ptr<Checkpoint> ck_;
  std::shared_ptr<Tokenizer> tk_;
};

}  // namespace

PYBIND11_MODULE(nanscope, m) {
  m.doc() =
      "nanscope: run Hugging Face checkpoints on the CPU exactly as transformers does; "
      "hidden states of discrete and soft inputs, scan / check / trace";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InputError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const OutputError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });

  py::class_<Model>(m, "Model")
      .def(py::init<const std::string&>(), py::arg("path"),
           "Opens a checkpoint directory (config.json + safetensors).")
      .def_property_readonly("config", &Model::config, "config.json as a dict")
      .def_property_readonly("path", &Model::path)
      .def_property_readonly("num_states", &Model::num_states,
                             "N + 1: the number of hidden states (output_hidden_states)")
      .def("tokenize", &Model::tokenize, py::arg("text"),
           "Token ids of text with the model's tokenizer.json (no special tokens added).")
      .def("hidden_states", &Model::hidden_states, py::arg("ids"), py::arg("dtype") = "bf16",
           py::arg("attention") = "eager", py::arg("layers") = py::none(),
           "Hidden states 0..N of token ids: a list of float32 arrays [T, H] (None for states "
           "not in layers).")
      .def("hidden_states_batch", &Model::hidden_states_batch, py::arg("prompts"),
           py::arg("dtype") = "bf16", py::arg("attention") = "eager",
           py::arg("layers") = py::none(), py::arg("batch_tokens") = 4096,
           "Hidden states of many prompts (lists of token ids), run batch_tokens tokens at a "
           "time through the batched forward pass: one list of N+1 arrays per prompt. Much "
           "faster than a loop over hidden_states for many prompts.")
      .def("hidden_states_soft", &Model::hidden_states_soft, py::arg("inputs"),
           py::arg("ids") = py::none(), py::arg("dtype") = "bf16", py::arg("attention") = "eager",
           py::arg("layers") = py::none(), py::arg("allow_unnormalized") = false,
           "Hidden states of soft inputs: a list of mixtures [[(token, prob), ...], ...] (one "
           "per position), a dict {position: mixture} replacing positions of ids, or an input "
           "embedding array [T, H].")
      .def("embed", &Model::embed, py::arg("mixtures"), py::arg("ids") = py::none(),
           py::arg("dtype") = "bf16", py::arg("allow_unnormalized") = false,
           "The input embeddings [T, H] of mixtures (fp32 sum of p * row, rounded to dtype), as "
           "passed to the model.");

  m.def(
      "scan",
      [](const std::string& path, std::optional<std::string> adapter) {
        ScanOptions o;
        if (adapter) o.adapter = resolve_model_path(*adapter);
        const auto model = resolve_model_path(path);
        ScanResult r;
        {
          py::gil_scoped_release nogil;
          r = scan(model, o);
        }
        return to_py(scan_to_json(r));
      },
      py::arg("path"), py::arg("adapter") = py::none(),
      "nanscope scan: structure and values of every tensor, as the --json dict.");

  m.def(
      "check",
      [](const std::string& path, std::optional<std::vector<int64_t>> ids,
         std::optional<std::string> text, std::optional<std::string> base,
         std::optional<std::string> adapter, std::vector<std::string> dtypes,
         const std::string& attention) {
        CheckOptions o;
        if (ids && text) fail("check: pass ids or text, not both");
        if (text)
          o.ids = Model(path).tokenize(*text);
        else
          o.ids = ids ? *ids : std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8};
        if (base) o.base = resolve_model_path(*base);
        if (adapter) o.adapter = resolve_model_path(*adapter);
        o.dtypes.clear();
        for (const auto& d : dtypes) {
          auto dt = parse_run_dtype(d);
          if (!dt) fail("check: dtype \"{}\": expected fp32, bf16 or fp16", d);
          o.dtypes.push_back(*dt);
        }
        if (attention == "both") {
          o.attentions = {AttentionProfile::Eager, AttentionProfile::Fused};
        } else {
          auto at = parse_attention(attention);
          if (!at) fail("check: attention \"{}\": expected eager, fused or both", attention);
          o.attentions = {*at};
        }
        CheckResult r;
        {
          py::gil_scoped_release nogil;
          r = check(resolve_model_path(path), o);
        }
        return to_py(check_json(r));
      },
      py::arg("path"), py::arg("ids") = py::none(), py::arg("text") = py::none(),
      py::arg("base") = py::none(), py::arg("adapter") = py::none(),
      py::arg("dtypes") = std::vector<std::string>{"bf16", "fp16"}, py::arg("attention") = "eager",
      "nanscope check: the verdict (PASS / FAIL with causes), as the --json dict.");

  m.def(
      "trace",
      [](const std::string& path, std::vector<int64_t> ids, const std::string& dtype,
         const std::string& attention) {
        TraceOptions o;
        const ForwardOptions f = fwd_options(dtype, attention);
        o.ids = std::move(ids);
        o.dtype = f.dtype;
        o.attention = f.attention;
        TraceResult r;
        {
          py::gil_scoped_release nogil;
          r = trace(Checkpoint::open(resolve_model_path(path)), o);
        }
        return to_py(trace_json(r));
      },
      py::arg("path"), py::arg("ids"), py::arg("dtype") = "bf16", py::arg("attention") = "eager",
      "nanscope trace: every hidden state's statistics and the first non-finite site.");
}
