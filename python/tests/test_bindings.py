"""The Python module: hidden states of discrete and soft inputs, scan / check / trace dicts.

Run: PYTHONPATH=build/python /usr/bin/python3 -m pytest -q python/tests
"""

import json
import pathlib
import threading

import numpy as np
import pytest

import nanscope

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
TINY = str(FIXTURES / "models" / "qwen3-tiny")
NAN = str(FIXTURES / "models" / "qwen3-nan")
EXAMPLE = str(FIXTURES / "models" / "qwen3-example")
IDS = [1, 15, 300, 7, 42, 999]


def cosine(a, b):
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def model():
    return nanscope.Model(TINY)


def test_config_and_states_shape(model):
    assert model.config["hidden_size"] == 64
    assert model.config["model_type"] == "qwen3"
    assert model.num_states == model.config["num_hidden_layers"] + 1
    hs = model.hidden_states(IDS, dtype="bf16")
    assert len(hs) == model.num_states
    for h in hs:
        assert h.dtype == np.float32
        assert h.shape == (len(IDS), 64)
        assert np.isfinite(h).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_one_hot_soft_equals_discrete_exactly(model, dtype):
    discrete = model.hidden_states(IDS, dtype=dtype)
    soft = model.hidden_states_soft([[(t, 1.0)] for t in IDS], dtype=dtype)
    mixed = model.hidden_states_soft({2: [(IDS[2], 1.0)]}, ids=IDS, dtype=dtype)
    for d, s, m in zip(discrete, soft, mixed):
        assert np.array_equal(d, s)
        assert np.array_equal(d, m)


def read_safetensors(path):
    """The float32 tensors of a safetensors file (the format is a JSON header + raw bytes)."""
    raw = pathlib.Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32"
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.float32).reshape(t["shape"])
    return out


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 1.0 / 256)])
def test_batch_matches_transformers_goldens(model, dtype, tol):
    # Prompts of 9..64 tokens in one pass and in several; goldens computed one by one by
    # transformers (tests/fixtures/goldens/hidden, tolerances as in test_hidden.cpp).
    goldens = FIXTURES / "goldens" / "hidden"
    lines = [json.loads(x) for x in (goldens / "qwen3-tiny__batch.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "ids" in x]
    prompts = [x["ids"] for x in lines]
    name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    for batch_tokens in (4096, 70):
        states = model.hidden_states_batch(prompts, dtype=dtype, batch_tokens=batch_tokens)
        assert len(states) == len(prompts)
        for x, hs in zip(lines, states):
            gold = read_safetensors(goldens / f"qwen3-tiny__{name}__batch__{x['id']}.safetensors")
            assert len(hs) == model.num_states
            for k, h in enumerate(hs):
                g = gold[f"hidden.{k}"]
                assert h.shape == g.shape
                rel = np.linalg.norm(h.astype(np.float64) - g) / np.linalg.norm(g)
                assert rel <= tol, (x["id"], k, rel)
    some = model.hidden_states_batch(prompts[:2], layers=[-1])
    assert some[0][0] is None and some[0][-1].shape == (len(prompts[0]), 64)


def test_soft_prompt_cosine_per_layer(model):
    discrete = model.hidden_states(IDS)
    # Each position: 0.9 on the prompt's token, 0.1 on a neighbour.
    mixtures = [[(t, 0.9), ((t + 1) % 1024, 0.1)] for t in IDS]
    soft = model.hidden_states_soft(mixtures)
    cos = [cosine(d, s) for d, s in zip(discrete, soft)]
    assert len(cos) == model.num_states
    assert all(-1.0 <= c <= 1.0 + 1e-9 for c in cos)
    assert cos[0] > 0.8  # the inputs themselves are close
    assert cos != [1.0] * len(cos)


def test_embed_is_fp32_sum_of_rows(model):
    rows = model.embed([[(5, 1.0)], [(9, 1.0)]], dtype="fp32")
    assert rows.shape == (2, 64)
    p = [np.float32(0.3), np.float32(0.7)]
    mix = model.embed([[(5, 0.3), (9, 0.7)]], dtype="fp32")
    expect = (np.float32(0) + p[0] * rows[0]) + p[1] * rows[1]
    assert np.array_equal(mix[0], expect.astype(np.float32))
    # An embedding array gives the same states as the mixtures it came from.
    mixtures = [[(t, 0.6), (3, 0.4)] for t in IDS]
    e = model.embed(mixtures, dtype="bf16")
    a = model.hidden_states_soft(e, dtype="bf16")
    b = model.hidden_states_soft(mixtures, dtype="bf16")
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_layers_subset(model):
    hs = model.hidden_states(IDS, layers=[0, -1])
    assert hs[0] is not None and hs[-1] is not None
    assert all(h is None for h in hs[1:-1])
    full = model.hidden_states(IDS)
    assert np.array_equal(hs[-1], full[-1])


def test_arrays_own_their_memory(model):
    hs = model.hidden_states(IDS)
    h = hs[1]
    del hs
    assert h.flags["C_CONTIGUOUS"] and h.base is not None
    assert np.isfinite(h.sum())


def test_runs_in_threads(model):
    # The GIL is released during the forward pass: two threads both finish with equal results.
    out = [None, None]

    def work(i):
        out[i] = model.hidden_states(IDS, dtype="fp32")

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(*out):
        assert np.array_equal(a, b)


def test_tokenize():
    m = nanscope.Model(EXAMPLE)
    ids = m.tokenize("Hello, world!")
    assert len(ids) == 4
    assert len(m.hidden_states(ids)) == m.num_states


def test_scan_dicts():
    ok = nanscope.scan(TINY)
    assert ok["tensors"] > 0
    assert not [f for f in ok["findings"] if f["severity"] == "error"]
    bad = nanscope.scan(NAN)
    assert any(f["kind"] == "nonfinite" and f["severity"] == "error" for f in bad["findings"])


def test_check_dicts():
    assert nanscope.check(TINY)["verdict"] == "PASS"
    r = nanscope.check(NAN, ids=[1, 2, 3], dtypes=["bf16"])
    assert r["verdict"] == "FAIL"
    assert r["causes"]


def test_check_with_base_and_adapter():
    r = nanscope.check(EXAMPLE, base=EXAMPLE + "-base",
                       adapter=str(FIXTURES / "adapters" / "example-poisoned"),
                       text="Hello, world!")
    assert r["verdict"] == "FAIL"
    assert r["causes"][0]["kind"] == "adapter_nonfinite"
    with pytest.raises(ValueError):
        nanscope.check(TINY, ids=[1], text="x")


def test_trace_dict():
    t = nanscope.trace(TINY, IDS, dtype="bf16")
    assert t["dtype"] == "bf16"
    assert len(t["hidden"]) == 4
    assert t["first_nonfinite"] is None
    t = nanscope.trace(NAN, IDS, dtype="bf16")
    assert t["first_nonfinite"] is not None


def test_errors_are_value_errors(model):
    with pytest.raises(ValueError, match="out of range"):
        model.hidden_states([1, 100000])
    with pytest.raises(ValueError, match="sum to"):
        model.hidden_states_soft([[(1, 0.2), (2, 0.2)]])
    model.hidden_states_soft([[(1, 0.2), (2, 0.2)]], allow_unnormalized=True)
    with pytest.raises(ValueError, match="dtype"):
        model.hidden_states(IDS, dtype="fp8")
    with pytest.raises(ValueError, match="tokenizer"):
        model.tokenize("hi")
    with pytest.raises(ValueError):
        nanscope.Model(str(FIXTURES / "models" / "does-not-exist"))
    with pytest.raises(ValueError):
        model.hidden_states_soft(np.zeros((3, 65), dtype=np.float32))
    with pytest.raises(ValueError, match="layers"):
        model.hidden_states(IDS, layers=[4])


# ---- the package as Python users meet it ----------------------------------------------------

BINARY = pathlib.Path(nanscope.__file__).resolve().parents[1] / "nanscope"


def test_version_is_the_projects():
    cmake = (FIXTURES.parents[1] / "CMakeLists.txt").read_text()
    import re
    assert nanscope.__version__ == re.search(r"project\(nanscope VERSION ([0-9.]+)", cmake).group(1)


def test_paths_may_be_pathlike():
    p = pathlib.Path(TINY)
    assert nanscope.Model(p).num_states == 4
    assert nanscope.scan(p)["tensors"] == nanscope.scan(TINY)["tensors"]
    assert nanscope.trace(p, IDS)["hidden"] == nanscope.trace(TINY, IDS)["hidden"]
    assert nanscope.check(pathlib.Path(NAN), ids=[1, 2, 3], dtypes=["bf16"])["verdict"] == "FAIL"


def test_trace_of_text():
    t = nanscope.trace(EXAMPLE, text="Hello, world!", dtype="fp32")
    ids = nanscope.Model(EXAMPLE).tokenize("Hello, world!")
    assert t["tokens"] == ids
    assert t["hidden"] == nanscope.trace(EXAMPLE, ids, dtype="fp32")["hidden"]
    with pytest.raises(ValueError, match="not both"):
        nanscope.trace(EXAMPLE, ids, text="x")
    with pytest.raises(ValueError, match="ids"):
        nanscope.trace(EXAMPLE)
    with pytest.raises(ValueError, match="tokenizer="):
        nanscope.trace(TINY, text="x")


def test_merge_like_the_command(tmp_path):
    base = FIXTURES / "models" / "qwen3-tiny-fp32"
    out = tmp_path / "merged"
    r = nanscope.merge(base, FIXTURES / "adapters" / "lora-fp32", out, dtype="fp32")
    assert r["written"] and not r["refused"] and r["merged"] > 0
    # Against peft's own merge of the same adapter (tests/fixtures/merged, made by peft 0.21).
    ours = read_safetensors(out / "model.safetensors")
    gold = read_safetensors(FIXTURES / "merged" / "lora-fp32" / "model.safetensors")
    before = read_safetensors(base / "model.safetensors")
    changed = 0
    for name, g in gold.items():
        assert np.allclose(ours[name], g, rtol=1e-6, atol=0), name
        changed += not np.array_equal(g, before[name])
    assert changed > 0
    # A poisoned adapter: refused, nothing written.
    out2 = tmp_path / "poisoned"
    r = nanscope.merge(FIXTURES / "models" / "qwen3-tiny", FIXTURES / "adapters" / "poisoned",
                       out2)
    assert r["refused"] and not r["written"] and r["nonfinite"]
    assert not out2.exists()


def test_error_messages_name_keywords(tmp_path, model):
    with pytest.raises(ValueError) as e:
        nanscope.merge(TINY, FIXTURES / "adapters" / "lora-bf16", tmp_path, dtype="fp8")
    assert "dtype=fp8" in str(e.value) and "--" not in str(e.value), str(e.value)
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError) as e:
        nanscope.merge(TINY, FIXTURES / "adapters" / "lora-bf16", tmp_path)
    assert f"out={tmp_path} exists" in str(e.value) and "--" not in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        model.hidden_states_soft([[(1, 0.2), (2, 0.2)]])
    assert "allow_unnormalized=True" in str(e.value) and "--" not in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        nanscope.merge(TINY, FIXTURES / "adapters" / "lora-bf16", tmp_path / "no" / "out")
    assert "of out= does not exist" in str(e.value), str(e.value)


def run_hidden(*args):
    assert BINARY.exists(), f"{BINARY}: the nanscope binary, built beside build/python"
    import subprocess
    r = subprocess.run([str(BINARY), "hidden", *map(str, args)], capture_output=True, text=True)
    return r


def test_hidden_states_reads_slices_as_one(tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = [f"q{9 - i}" for i in range(5)]
    inp.write_text("".join(json.dumps({"id": x, "ids": [3 + i, 40 + i, 7]}) + "\n"
                           for i, x in enumerate(ids)))
    common = [TINY, "--input", inp, "--layers", "1,-1", "--batch-tokens", "1"]
    assert run_hidden(*common, "--out", tmp_path / "full").returncode == 0
    assert run_hidden(*common, "--out", tmp_path / "sl", "--shard", "1/2").returncode == 0
    part = nanscope.HiddenStates(tmp_path / "sl")
    assert part.missing_slices == [0] and part.slice_count == 2
    assert part.ids == [ids[1], ids[3]]
    assert run_hidden(*common, "--out", tmp_path / "sl", "--shard", "0/2").returncode == 0

    full = nanscope.HiddenStates(str(tmp_path / "full"))
    hs = nanscope.HiddenStates([tmp_path / "sl" / "slice-00000-of-00002",
                                tmp_path / "sl" / "slice-00001-of-00002"])
    assert list(hs) == ids and full.ids == ids and len(hs) == 5
    assert hs.layers == [1, 3] and hs.missing_slices == []
    for x in ids:
        assert x in hs
        for k in (1, 3):
            a, b = hs.state(x, k), full.state(x, k)
            assert a.dtype == np.float32 and a.shape == (3, 64)
            assert np.array_equal(a, b)
        assert np.array_equal(hs[x][3], hs.state(x, -1))
    assert hs.info(ids[2])["input_index"] == 2 and hs.info(ids[2])["tokens"] == 3
    assert hs.nonfinite == {}
    with pytest.raises(KeyError):
        hs.state("nope", 1)
    with pytest.raises(ValueError, match="not kept"):
        hs.state(ids[0], 2)
    with pytest.raises(ValueError, match="does not exist"):
        nanscope.HiddenStates(tmp_path / "nowhere")


def gpu_visible():
    import shutil
    import subprocess
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible: tests/gpu/run.sh covers device='cuda'")
def test_device_cuda_without_a_gpu_is_a_value_error():
    # device= reaches the CUDA backend (its own message), never a silent CPU run.
    want = "no usable CUDA device|NANSCOPE_CUDA=ON"
    with pytest.raises(ValueError, match=want):
        nanscope.Model(TINY, device="cuda").hidden_states(IDS)
    with pytest.raises(ValueError, match=want):
        nanscope.trace(TINY, IDS, device="cuda")
    with pytest.raises(ValueError, match=want):
        nanscope.check(TINY, ids=IDS, device="cuda")
    with pytest.raises(ValueError, match=want):
        nanscope.compare(TINY, TINY, ids=IDS, device_b="cuda")
    with pytest.raises(ValueError, match="expected cpu or cuda"):
        nanscope.Model(TINY, device="gpu")
    # cpu stays the default and is accepted by name.
    assert nanscope.Model(TINY, device="cpu").hidden_states(IDS)[0].shape == (len(IDS), 64)


def test_gpu_memory_wants_a_size_and_the_gpu():
    # gpu_memory= caps the GPU's memory: on a CPU model it would do nothing, so it is refused.
    with pytest.raises(ValueError, match="pass device=\"cuda\""):
        nanscope.Model(TINY, gpu_memory="4GiB")
    with pytest.raises(ValueError, match="gpu_memory lots: expected a size"):
        nanscope.Model(TINY, device="cpu", gpu_memory="lots")
    with pytest.raises(ValueError, match="gpu_memory 0: expected a size"):
        nanscope.Model(TINY, gpu_memory=0)

