// The Python module `nanscope`: hidden states of discrete and soft inputs as numpy arrays, and
// scan / check / trace as dicts (the JSON documents of docs/interface.md).
//
//   m = nanscope.Model("path/to/checkpoint")
//   hs = m.hidden_states([1, 2, 3], dtype="bf16")             # N+1 arrays [T, H] float32
//   soft = m.hidden_states_soft([[(17, 0.7), (42, 0.3)], ...])  # one mixture per position
//
//   nanscope.merge(base, adapter, out)                          # the merge command, as a dict
//   hs = nanscope.HiddenStates("out")                           # what `hidden` wrote, slices too
//
// Every path may be a str or an os.PathLike. InputError becomes ValueError, OutputError OSError,
// with the command line's flags in messages spelled as Python keywords. The GIL is released
// during the forward pass, and Ctrl-C stops a long call at the library's next safe point
// (common/interrupt_check.hpp) as KeyboardInterrupt; state arrays own their std::vector through
// a capsule (no copy).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "common/interrupt_check.hpp"
#include "common/strings.hpp"
#include "cuda/forward_cuda.hpp"
#include "formats/checkpoint.hpp"
#include "formats/hub.hpp"
#include "model/adapter_overlay.hpp"
#include "numerics/backend.hpp"
#include "tokenizer/bpe.hpp"
#include "tools/check.hpp"
#include "tools/compare.hpp"
#include "tools/generate.hpp"
#include "tools/hidden.hpp"
#include "tools/hidden_read.hpp"
#include "tools/merge.hpp"
#include "tools/scan.hpp"
#include "tools/trace.hpp"

namespace py = pybind11;
using namespace nanscope;
namespace fs = std::filesystem;

namespace {

// At the library's safe points: Python's signal handlers, which only the main thread runs (a
// call from another thread finds nothing to do). A raised KeyboardInterrupt travels through the
// library as py::error_already_set and is restored when the call returns.
void python_interrupt_check() {
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

// What every long call does around the library: the GIL released, Ctrl-C checked at safe points.
struct Released {
  py::gil_scoped_release nogil;
  ScopedInterruptCheck check{&python_interrupt_check};
};

// The library's messages name the command line's flags (`--dtype`, `--out X`); a Python user
// passes keywords, so they read `dtype=`, `out=X`, `allow_nonfinite=True`.
std::string python_message(const std::string& m) {
  static const std::vector<std::pair<std::string_view, std::string_view>> whole = {
      {"--allow-unnormalized", "allow_unnormalized=True"},
      {"--allow-nonfinite", "allow_nonfinite=True"},
      {"--peft-tied", "peft_tied=True"},
      {"--no-fsync", "fsync=False"},
      {"--tokenizer FILE", "tokenizer=PATH"}};
  // Words that follow a flag without being its value ("give --ids or --text").
  static const std::vector<std::string_view> words = {
      "or",    "and",  "is",     "are",   "was",   "to",     "with",  "for",     "of",
      "the",   "a",    "an",     "in",    "on",    "at",     "by",    "from",    "as",
      "if",    "when", "not",    "does",  "must",  "cannot", "has",   "have",    "exists",
      "names", "only", "writes", "gives", "takes", "needs",  "given", "required"};
  std::string out;
  for (size_t i = 0; i < m.size();) {
    const bool flag = m.compare(i, 2, "--") == 0 && i + 2 < m.size() &&
                      std::islower(static_cast<unsigned char>(m[i + 2])) &&
                      (i == 0 || !std::isalnum(static_cast<unsigned char>(m[i - 1])));
    if (!flag) {
      out += m[i++];
      continue;
    }
    bool done = false;
    for (const auto& [from, to] : whole)
      if (m.compare(i, from.size(), from) == 0 &&
          (i + from.size() == m.size() ||
           !std::isalnum(static_cast<unsigned char>(m[i + from.size()]))) &&
          (i + from.size() == m.size() || m[i + from.size()] != '-')) {
        out += to;
        i += from.size();
        done = true;
        break;
      }
    if (done) continue;
    size_t j = i + 2;
    while (j < m.size() && (std::isalnum(static_cast<unsigned char>(m[j])) || m[j] == '-')) ++j;
    std::string name = m.substr(i + 2, j - i - 2);
    for (char& c : name)
      if (c == '-') c = '_';
    out += name + "=";
    i = j;
    // "--out /x exists" -> "out=/x exists"; "--ids or" keeps its space.
    if (i + 1 < m.size() && m[i] == ' ') {
      size_t k = i + 1;
      while (k < m.size() && std::isalpha(static_cast<unsigned char>(m[k]))) ++k;
      const std::string_view next(m.data() + i + 1, k - i - 1);
      const bool word = std::find(words.begin(), words.end(), next) != words.end();
      const bool value = !word && m[i + 1] != '(' && m[i + 1] != '-';
      if (value) ++i;
    }
  }
  return out;
}

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
  // adapter: a PEFT adapter directory applied unmerged (as peft's PeftModel) in every pass.
  // device: where every pass of this model runs ("cpu" or "cuda").
  // gpu_memory: with device "cuda", the GPU memory its weights may hold (bytes, or "4GiB");
  // the layers beyond are streamed from host memory (--gpu-memory).
  explicit Model(const fs::path& path, std::optional<fs::path> adapter = std::nullopt,
                 const std::string& device = "cpu", py::object gpu_memory = py::none())
      : ck_(std::make_shared<Checkpoint>(Checkpoint::open(resolve_model_path(path.string())))),
        dev_(parse_device_flag(device)) {
    if (adapter) ov_ = AdapterOverlay::open(resolve_model_path(adapter->string()), *ck_);
    if (!gpu_memory.is_none()) {
      std::optional<uint64_t> v;
      if (py::isinstance<py::int_>(gpu_memory)) {
        const auto n = gpu_memory.cast<long long>();
        if (n > 0) v = uint64_t(n);
      } else if (py::isinstance<py::str>(gpu_memory)) {
        v = parse_byte_size(gpu_memory.cast<std::string>());
      }
      if (!v)
        fail("gpu_memory {}: expected a size in bytes or like \"4GiB\" or \"500MB\"",
             py::str(gpu_memory).cast<std::string>());
      if (dev_ != Device::Cuda) fail("gpu_memory: it caps the GPU's memory; pass device=\"cuda\"");
      cap_ = *v;
    }
  }

  std::shared_ptr<const Checkpoint> checkpoint() const { return ck_; }
  std::shared_ptr<const AdapterOverlay> adapter() const { return ov_; }
  Device device() const { return dev_; }

  // Greedy (or sampled) decoding with the key/value cache: the --json dict of `generate`.
  py::object generate(std::optional<std::vector<int64_t>> ids, std::optional<std::string> text,
                      int64_t max_new_tokens, const std::string& dtype,
                      const std::string& attention, double temperature, int64_t top_k, double top_p,
                      uint64_t seed, std::optional<std::vector<int64_t>> eos) {
    if (ids && text) fail("generate: pass ids or text, not both");
    if (!ids && !text) fail("generate: pass ids (token ids) or text");
    GenerateOptions o;
    o.prompt = ids ? *ids : tokenize(*text);
    const ForwardOptions f = opts(dtype, attention);
    o.dtype = f.dtype;
    o.attention = f.attention;
    o.adapter = ov_;
    o.device = dev_;
    o.max_new_tokens = max_new_tokens;
    o.temperature = temperature;
    o.top_k = top_k;
    o.top_p = top_p;
    o.seed = seed;
    o.eos = eos;
    GenerateResult r;
    {
      Released nogil;
      const ScopedBackend use(with_cap());
      r = nanscope::generate(*ck_, o);
    }
    return to_py(generate_json(r));
  }

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
    const ForwardOptions f = opts(dtype, attention);
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
      Released nogil;
      const ScopedBackend use(with_cap());
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
      const ForwardOptions f = opts(dtype, attention);
      const auto ls = layer_list(layers, num_states());
      HiddenStates s;
      {
        Released nogil;
        const ScopedBackend use(with_cap());
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
    const ForwardOptions f = opts(dtype, "eager");
    std::vector<float> e;
    {
      Released nogil;
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
    const ForwardOptions f = opts(dtype, attention);
    const auto ls = layer_list(layers, num_states());
    HiddenStates s;
    {
      Released nogil;
      const ScopedBackend use(with_cap());
      s = nanscope::hidden_states(*ck_, in, f, ls);
    }
    return states_to_list(std::move(s));
  }

  ForwardOptions opts(const std::string& dtype, const std::string& attention) const {
    ForwardOptions f = fwd_options(dtype, attention);
    f.adapter = ov_.get();
    f.device = dev_;
    return f;
  }

  // The kernels' options with this model's gpu_memory (its calls run under them).
  Backend with_cap() const {
    Backend b = backend();
    if (cap_ > 0) b.cuda_weight_cap = cap_;
    return b;
  }

  std::shared_ptr<Checkpoint> ck_;
  Device dev_ = Device::Cpu;
  uint64_t cap_ = 0;  // gpu_memory; 0: the process's (NANSCOPE_GPU_MEMORY, else none)
  std::shared_ptr<const AdapterOverlay> ov_;
  std::shared_ptr<Tokenizer> tk_;
};

// nanscope.HiddenStates: tools/hidden_read's set of output directories.
struct PyHiddenStates {
  HiddenSet set;

  static std::vector<fs::path> paths_of(py::object dirs) {
    // One path (str, bytes, os.PathLike) or an iterable of them.
    if (py::isinstance<py::str>(dirs) || py::isinstance<py::bytes>(dirs) ||
        py::hasattr(dirs, "__fspath__"))
      return {dirs.cast<fs::path>()};
    std::vector<fs::path> out;
    for (py::handle d : dirs) out.push_back(d.cast<fs::path>());
    return out;
  }
  explicit PyHiddenStates(py::object dirs) : set(HiddenSet::open(paths_of(std::move(dirs)))) {}

  const HiddenEntry& entry(const std::string& id) const {
    const HiddenEntry* e = set.find(id);
    if (!e) throw py::key_error(id);
    return *e;
  }
  std::vector<std::string> ids() const {
    std::vector<std::string> out;
    for (const auto& e : set.entries()) out.push_back(e.id);
    return out;
  }
  py::array_t<float> state(const std::string& id, int64_t layer) const {
    const HiddenEntry& e = entry(id);
    std::vector<float> v;
    {
      Released nogil;
      v = set.read(e, layer);
    }
    const auto sh = set.shape(e);
    return to_numpy(std::move(v), std::vector<py::ssize_t>(sh.begin(), sh.end()));
  }
  py::dict states(const std::string& id) const {
    py::dict out;
    for (int64_t k : set.layers()) out[py::int_(k)] = state(id, k);
    return out;
  }
  py::dict info(const std::string& id) const {
    const HiddenEntry& e = entry(id);
    py::dict d;
    d["id"] = e.id;
    d["input_index"] = e.input_index;
    d["tokens"] = e.tokens;
    d["kind"] = e.kind;
    d["finite"] = e.finite;
    d["nonfinite_layers"] = e.nonfinite_layers;
    d["file"] = e.file.string();
    return d;
  }
  py::dict nonfinite() const {
    py::dict d;
    for (const auto& e : set.entries())
      if (!e.finite) d[py::str(e.id)] = e.nonfinite_layers;
    return d;
  }
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
      PyErr_SetString(PyExc_ValueError, python_message(e.what()).c_str());
    } catch (const OutputError& e) {
      PyErr_SetString(PyExc_OSError, python_message(e.what()).c_str());
    }
  });

  py::class_<Model>(m, "Model")
      .def(py::init<const fs::path&, std::optional<fs::path>, const std::string&, py::object>(),
           py::arg("path"), py::arg("adapter") = py::none(), py::arg("device") = "cpu",
           py::arg("gpu_memory") = py::none(),
           "Opens a checkpoint directory (config.json + safetensors); a str or os.PathLike. "
           "adapter: a PEFT adapter directory applied unmerged, as peft's PeftModel computes it. "
           "device: 'cpu' or 'cuda' (an NVIDIA GPU), where every pass of this model runs. "
           "gpu_memory: with 'cuda', the GPU memory its weights may hold (bytes or '4GiB'); the "
           "layers that do not fit are streamed from host memory, two at a time.")
      .def("generate", &Model::generate, py::arg("ids") = py::none(), py::arg("text") = py::none(),
           py::arg("max_new_tokens") = 32, py::arg("dtype") = "bf16",
           py::arg("attention") = "eager", py::arg("temperature") = 0.0, py::arg("top_k") = 0,
           py::arg("top_p") = 1.0, py::arg("seed") = 0, py::arg("eos") = py::none(),
           "Decoding with a key/value cache: greedy (temperature 0) is token for token "
           "transformers' generate(do_sample=False). Returns the `generate --json` dict; "
           "first_nonfinite names the site when a step's logits are not finite.")
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
      [](const fs::path& path, std::optional<fs::path> adapter) {
        ScanOptions o;
        if (adapter) o.adapter = resolve_model_path(*adapter);
        const auto model = resolve_model_path(path);
        ScanResult r;
        {
          Released nogil;
          r = scan(model, o);
        }
        return to_py(scan_to_json(r));
      },
      py::arg("path"), py::arg("adapter") = py::none(),
      "nanscope scan: structure and values of every tensor, as the --json dict.");

  m.def(
      "check",
      [](const fs::path& path, std::optional<std::vector<int64_t>> ids,
         std::optional<std::string> text, std::optional<fs::path> base,
         std::optional<fs::path> adapter, std::vector<std::string> dtypes,
         const std::string& attention, const std::string& device) {
        CheckOptions o;
        o.device = parse_device_flag(device);
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
          Released nogil;
          r = check(resolve_model_path(path), o);
        }
        return to_py(check_json(r));
      },
      py::arg("path"), py::arg("ids") = py::none(), py::arg("text") = py::none(),
      py::arg("base") = py::none(), py::arg("adapter") = py::none(),
      py::arg("dtypes") = std::vector<std::string>{"bf16", "fp16"}, py::arg("attention") = "eager",
      py::arg("device") = "cpu",
      "nanscope check: the verdict (PASS / FAIL with causes), as the --json dict.");

  m.def(
      "trace",
      [](const fs::path& path, std::optional<std::vector<int64_t>> ids, const std::string& dtype,
         const std::string& attention, std::optional<std::string> text,
         std::optional<fs::path> tokenizer, std::optional<fs::path> adapter,
         const std::string& device) {
        if (ids && text) fail("trace: pass ids or text, not both");
        if (!ids && !text) fail("trace: pass ids (token ids) or text");
        TraceOptions o;
        const ForwardOptions f = fwd_options(dtype, attention);
        Checkpoint ck = Checkpoint::open(resolve_model_path(path.string()));
        if (text) {
          const fs::path tp = tokenizer ? *tokenizer : ck.dir() / "tokenizer.json";
          if (!fs::exists(tp))
            fail("{}: no tokenizer.json to tokenize text; pass tokenizer= or ids", tp.string());
          for (int32_t i :
               Tokenizer::load(fs::is_directory(tp) ? tp / "tokenizer.json" : tp).encode(*text))
            o.ids.push_back(i);
        } else {
          o.ids = std::move(*ids);
        }
        o.dtype = f.dtype;
        o.attention = f.attention;
        o.device = parse_device_flag(device);
        if (adapter) o.adapter = AdapterOverlay::open(resolve_model_path(adapter->string()), ck);
        TraceResult r;
        {
          Released nogil;
          r = trace(ck, o);
        }
        return to_py(trace_json(r));
      },
      py::arg("path"), py::arg("ids") = py::none(), py::arg("dtype") = "bf16",
      py::arg("attention") = "eager", py::kw_only(), py::arg("text") = py::none(),
      py::arg("tokenizer") = py::none(), py::arg("adapter") = py::none(), py::arg("device") = "cpu",
      "nanscope trace: every hidden state's statistics and the first non-finite site, as the "
      "--json dict. Token ids, or text tokenized with the model's (or tokenizer=) tokenizer.json.");

  m.def(
      "merge",
      [](const fs::path& base, const fs::path& adapter, const fs::path& out,
         const std::string& dtype, bool allow_nonfinite, std::optional<int64_t> max_shard_size,
         bool peft_tied, bool fsync, int threads) {
        MergeOptions o;
        o.base = base;
        o.adapter = adapter;
        o.out = out;
        o.dtype = parse_merge_dtype(dtype);
        o.allow_nonfinite = allow_nonfinite;
        if (max_shard_size && *max_shard_size <= 0)
          fail("merge: max_shard_size {}: must be a positive number of bytes", *max_shard_size);
        o.max_shard_size = max_shard_size ? uint64_t(*max_shard_size) : 0;
        o.tied = peft_tied ? TiedMode::Peft : TiedMode::Untie;
        o.durable = fsync;
        if (threads < 0) fail("merge: threads {}: must be 0 (all cores) or more", threads);
        o.threads = threads;
        MergeResult r;
        {
          Released nogil;
          r = merge(o);
        }
        return to_py(merge_result_json(r));
      },
      py::arg("base"), py::arg("adapter"), py::arg("out"), py::kw_only(), py::arg("dtype") = "auto",
      py::arg("allow_nonfinite") = false, py::arg("max_shard_size") = py::none(),
      py::arg("peft_tied") = false, py::arg("fsync") = true, py::arg("threads") = 0,
      "nanscope merge: a PEFT LoRA adapter merged into base exactly as peft does, with fp32 "
      "arithmetic, written to out (which must not exist or be empty); the --json dict. A result "
      "holding NaN/inf is refused unless allow_nonfinite: then nothing is written and the dict "
      "says refused=True, with the tensors in 'nonfinite'.");

  m.def(
      "compare",
      [](py::object a, py::object b, std::optional<std::vector<int64_t>> ids,
         std::optional<std::string> text, std::optional<fs::path> adapter_a,
         std::optional<fs::path> adapter_b, const std::string& dtype,
         std::optional<std::string> dtype_a, std::optional<std::string> dtype_b,
         const std::string& attention, std::optional<std::string> attention_a,
         std::optional<std::string> attention_b, int64_t generate,
         std::optional<std::string> device, std::optional<std::string> device_a,
         std::optional<std::string> device_b) {
        // A and B: paths (str / os.PathLike) or nanscope.Model objects (their adapter kept).
        auto model_of = [](py::object x, const std::optional<fs::path>& ad) {
          if (py::isinstance<Model>(x)) {
            if (ad)
              fail("compare: pass the adapter to Model(...) or adapter_a/adapter_b, not both");
            return x.cast<Model>();
          }
          return Model(x.cast<fs::path>(), ad);
        };
        Model ma = model_of(a, adapter_a), mb = model_of(b, adapter_b);
        if (ids && text) fail("compare: pass ids or text, not both");
        if (!ids && !text) fail("compare: pass ids (token ids) or text");
        const std::vector<int64_t> toks = ids ? *ids : ma.tokenize(*text);
        // device_a / device_b, else device, else the Model's own (cpu for a path).
        auto side = [&](Model& mo, const std::optional<std::string>& d,
                        const std::optional<std::string>& at, const std::optional<std::string>& dev,
                        const char* which) {
          const ForwardOptions f = fwd_options(d.value_or(dtype), at.value_or(attention));
          CompareSide s;
          s.ck = mo.checkpoint().get();
          s.adapter = mo.adapter();
          s.dtype = f.dtype;
          s.attention = f.attention;
          s.device = dev      ? parse_device_flag(*dev)
                     : device ? parse_device_flag(*device)
                              : mo.device();
          s.label = fmt::format("{}: {}{} {} {}{}", which, mo.path(),
                                s.adapter ? " + " + s.adapter->adapter().dir().string() : "",
                                run_dtype_name(f.dtype), attention_name(f.attention),
                                s.device == Device::Cuda ? " cuda" : "");
          return s;
        };
        const CompareSide sa = side(ma, dtype_a, attention_a, device_a, "A"),
                          sb = side(mb, dtype_b, attention_b, device_b, "B");
        if (generate < 0) fail("compare: generate {} is negative", generate);
        CompareResult r;
        {
          Released nogil;
          r = nanscope::compare(sa, sb, toks, generate);
        }
        return to_py(compare_json(r));
      },
      py::arg("a"), py::arg("b"), py::arg("ids") = py::none(), py::arg("text") = py::none(),
      py::arg("adapter_a") = py::none(), py::arg("adapter_b") = py::none(),
      py::arg("dtype") = "bf16", py::arg("dtype_a") = py::none(), py::arg("dtype_b") = py::none(),
      py::arg("attention") = "eager", py::arg("attention_a") = py::none(),
      py::arg("attention_b") = py::none(), py::arg("generate") = 0, py::arg("device") = py::none(),
      py::arg("device_a") = py::none(), py::arg("device_b") = py::none(),
      "nanscope compare: how far apart two runs are on one input, layer by layer (the --json "
      "dict). a, b: checkpoint paths or Model objects.");

  py::class_<PyHiddenStates>(m, "HiddenStates")
      .def(py::init<py::object>(), py::arg("dirs"),
           "Reads what `nanscope hidden` wrote: an output directory, a directory of slices "
           "(--shard K/N), a merged index, or a list of these, as one set in input order.")
      .def("__len__", [](const PyHiddenStates& h) { return h.set.entries().size(); })
      .def("__contains__",
           [](const PyHiddenStates& h, const std::string& id) { return h.set.find(id) != nullptr; })
      .def("__iter__", [](const PyHiddenStates& h) { return py::iter(py::cast(h.ids())); })
      .def("__getitem__", &PyHiddenStates::states, py::arg("id"),
           "Every state kept of one input: {state index: float32 array}.")
      .def_property_readonly("ids", &PyHiddenStates::ids, "Input ids in input order")
      .def_property_readonly("settings",
                             [](const PyHiddenStates& h) { return to_py(h.set.settings()); })
      .def_property_readonly(
          "layers", [](const PyHiddenStates& h) { return h.set.layers(); },
          "The state indices kept (--layers)")
      .def_property_readonly(
          "dirs",
          [](const PyHiddenStates& h) {
            std::vector<std::string> d;
            for (const auto& p : h.set.dirs()) d.push_back(p.string());
            return d;
          },
          "The directories read (each slice's own)")
      .def_property_readonly("slice_count",
                             [](const PyHiddenStates& h) { return h.set.slice_count(); })
      .def_property_readonly(
          "missing_slices", [](const PyHiddenStates& h) { return h.set.missing_slices(); },
          "K of the slices of N not found (not run, or nothing finished yet)")
      .def_property_readonly("nonfinite", &PyHiddenStates::nonfinite,
                             "{id: [states holding NaN/inf]} of every input that has them")
      .def("info", &PyHiddenStates::info, py::arg("id"),
           "The index entry of one input: input_index, tokens, kind, finite, nonfinite_layers, "
           "file.")
      .def("state", &PyHiddenStates::state, py::arg("id"), py::arg("layer"),
           "State `layer` (-1 = N) of one input: float32 [T, H], or [H] when pooled.");

  m.attr("__version__") = NANSCOPE_VERSION;
}
