"""Ctrl-C during a long call: KeyboardInterrupt at the library's next safe point (between decoder
layers, merged tensors, scanned tensors), not when the call would have ended.

The model is a Qwen3 of random weights written here (8 layers, hidden 256), so that one forward
pass over 1024 tokens lasts long enough to be interrupted in its middle. Each run is a child
process that sends itself SIGINT shortly after the call starts.
"""

import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

H, I, LAYERS, HEADS, KV, D, VOCAB = 256, 768, 8, 8, 4, 32, 512


def write_model(d):
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        tensors.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (HEADS * D, H), p + "self_attn.k_proj.weight": (KV * D, H),
            p + "self_attn.v_proj.weight": (KV * D, H), p + "self_attn.o_proj.weight": (H, HEADS * D),
            p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I)})
    header, blobs, off = {}, [], 0
    for name, shape in tensors.items():
        a = (np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.05, shape)).astype(np.float32)
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": D, "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "hidden_act": "silu", "rope_theta": 10000.0, "attention_bias": False, "dtype": "float32"}))


CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import nanscope
    m = nanscope.Model(sys.argv[1])
    ids = [(7 * j) % 500 + 1 for j in range(int(sys.argv[2]))]
    m.hidden_states(ids[:8], dtype="fp32")  # warm: pages, threads
    delay = float(sys.argv[3])
    timer = threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    if delay > 0:
        timer.start()
    try:
        m.hidden_states(ids, dtype="fp32")
        print("completed", time.monotonic() - t0)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic() - t0)
    timer.cancel()
    """
)


def run_child(model, tokens, delay):
    r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tokens), str(delay)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    word, seconds = r.stdout.split()
    return word, float(seconds)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupt-model")
    write_model(d)
    return d


def test_ctrl_c_stops_a_long_forward_with_keyboard_interrupt(model):
    # The whole call is timed first, so that the interrupt provably came before its end: the
    # input doubles until one pass lasts at least 2 s here (8 layers: a safe point every 1/8).
    tokens = 512
    while True:
        word, full = run_child(model, tokens, 0)
        assert word == "completed"
        if full >= 2.0 or tokens >= 4096:
            break
        tokens *= 2
    delay = full / 8
    word, seconds = run_child(model, tokens, delay)
    assert word == "interrupted"
    assert seconds < delay + full / 2, (seconds, delay, full)
