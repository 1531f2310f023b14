"""Hub ids in Python: the same offline resolution from the local cache as the command line."""

import os
import pathlib

import pytest

import nanscope

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def add_snapshot(cache, repo_id, commit, source, ref="main"):
    """Lays out one snapshot as huggingface_hub does: blobs, symlinks, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            blob = repo / "blobs" / (commit[:8] + "-" + f.name)
            blob.write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(pathlib.Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(v, raising=False)
    cache = tmp_path / "hub"
    add_snapshot(cache, "Org/Tiny", "a" * 40, FIXTURES / "models" / "qwen3-tiny")
    add_snapshot(cache, "Org/Lora", "b" * 40, FIXTURES / "adapters" / "lora-bf16")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_everywhere(hub):
    snap = str(hub / "models--Org--Tiny" / "snapshots" / ("a" * 40))
    assert nanscope.scan("Org/Tiny")["model"] == snap
    assert nanscope.scan("Org/Tiny", adapter="Org/Lora")["model"] == snap
    assert nanscope.Model("Org/Tiny").num_states == 4
    assert nanscope.trace("Org/Tiny", [1, 2, 3])["first_nonfinite"] is None
    assert nanscope.check("Org/Tiny", ids=[1, 2], dtypes=["bf16"])["verdict"] == "PASS"


def test_missing_hub_id_says_how_to_download(hub):
    with pytest.raises(ValueError, match="hf download Org/Missing"):
        nanscope.Model("Org/Missing")
    with pytest.raises(ValueError, match="revision v9"):
        nanscope.scan("Org/Tiny@v9")
