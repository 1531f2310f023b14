"""Python API of issue 14: Model(path, adapter=...), Model.generate, nanscope.compare, against
the same goldens the C++ tests use (peft's PeftModel hidden states, transformers' generate)."""
import json
import pathlib

import numpy as np
import pytest

import nanscope

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def read_safetensors(path):
    """F32 and I64 tensors of a safetensors file (a JSON header + raw bytes)."""
    raw = pathlib.Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    kinds = {"F32": np.float32, "I64": np.int64}
    return {name: np.frombuffer(raw[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]],
                                dtype=kinds[t["dtype"]]).reshape(t["shape"])
            for name, t in header.items() if name != "__metadata__"}


def test_unmerged_adapter_matches_peftmodel():
    golden = read_safetensors(FIXTURES / "goldens" / "peft" / "lora-bf16__bfloat16__eager.safetensors")
    m = nanscope.Model(FIXTURES / "models" / "qwen3-tiny", adapter=FIXTURES / "adapters" / "lora-bf16")
    ids = [int(x) for x in golden["input_ids"]]
    states = m.hidden_states(ids, dtype="bf16")
    bare = nanscope.Model(FIXTURES / "models" / "qwen3-tiny").hidden_states(ids, dtype="bf16")
    last = len(states) - 1
    want = golden[f"hidden.{last}"]
    assert np.array_equal(states[last], want)  # bit for bit in bf16 (test_adapter_unmerged.cpp)
    assert not np.allclose(bare[last], want, atol=1e-2)  # the adapter matters


def test_generate_matches_transformers():
    runs = json.load(open(FIXTURES / "goldens" / "generate" / "generate.json"))["runs"]
    run = next(r for r in runs if r["model"] == "models/qwen3-tiny" and r["adapter"] ==
               "adapters/lora-bf16" and r["dtype"] == "float32" and r["attn"] == "eager")
    m = nanscope.Model(FIXTURES / "models" / "qwen3-tiny", adapter=FIXTURES / "adapters" / "lora-bf16")
    g = m.generate(ids=run["prompt_ids"], max_new_tokens=len(run["ids"]), dtype="fp32")
    assert g["ids"] == run["ids"]
    assert g["finish_reason"] == run["finish_reason"]
    assert g["first_nonfinite"] is None


def test_generate_text_and_nonfinite():
    g = nanscope.Model(FIXTURES / "models" / "trained-base").generate(text="def f(x):", max_new_tokens=5)
    assert len(g["ids"]) == 5 and isinstance(g["text"], str)
    bad = nanscope.Model(FIXTURES / "models" / "qwen3-fp16-attn").generate(
        ids=[1, 15, 300, 7, 42, 999, 3, 12], dtype="fp16", max_new_tokens=3)
    assert bad["finish_reason"] == "nonfinite"
    assert "self_attn" in bad["first_nonfinite"]["site"]
    with pytest.raises(ValueError, match="top_p|top-p"):
        nanscope.Model(FIXTURES / "models" / "qwen3-tiny").generate(ids=[1, 2], temperature=1.0, top_p=0.0)


def test_compare_merged_against_unmerged():
    base = FIXTURES / "models" / "qwen3-tiny"
    merged = FIXTURES / "merged" / "lora-bf16"
    ids = [1, 15, 300, 7, 42, 999, 3, 12]
    r = nanscope.compare(merged, base, ids=ids, adapter_b=FIXTURES / "adapters" / "lora-bf16", dtype="fp32")
    r0 = nanscope.compare(merged, base, ids=ids, dtype="fp32")
    assert len(r["states"]) == 4
    assert r["states"][-1]["rel_err"] < 2e-2
    assert r0["states"][-1]["rel_err"] > 10 * r["states"][-1]["rel_err"]
    same = nanscope.compare(nanscope.Model(base), base, ids=ids, generate=3)
    assert all(s["rel_err"] == 0 for s in same["states"])
    assert same["generate"]["agree"] == 3
    assert same["logits"]["top1_agreement"] == 1.0
