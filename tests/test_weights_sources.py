"""--weights hf://OWNER/REPO/FILE: read from the Hugging Face cache without network; offline and
not cached, a clear error naming the file and where to put it. Never downloads."""
from __future__ import annotations

import pytest

import engine.models  # noqa: F401
from engine.models.checkpoints import load_backbone_weights, parse_hf_url, resolve_weights
from engine.models.registry import get_backbone_spec
from engine.models.segmentor import build_segmentor
from engine.protocol import EngineError, Reporter
from tests.conftest import make_prithvi_checkpoint

REPO, FILE = "ibm-nasa-geospatial/Prithvi-EO-2.0-tiny-TL", "Prithvi_EO_V2_tiny_TL.pt"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, the hub unreachable."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _cache_file(cache, repo: str, file: str, source):
    """The layout huggingface_hub's cache uses: refs/main → a snapshot folder holding the file."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / file).write_bytes(source.read_bytes())
    return snapshot / file


def test_a_cached_hub_file_loads_offline(hub_cache, tmp_path):
    cached = _cache_file(hub_cache, REPO, FILE, make_prithvi_checkpoint(tmp_path / "w.pt"))
    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    path = resolve_weights(spec, f"hf://{REPO}/{FILE}", Reporter("quiet"))
    assert path.resolve() == cached.resolve()
    model = build_segmentor(spec, 6, 32, 2)
    loaded = load_backbone_weights(model.encoder, spec, path, list(spec.bands), Reporter("quiet"))
    assert loaded.source == "file" and len(loaded.matched_bands) == 6


def test_offline_and_not_cached_names_the_file_and_the_fix(hub_cache):
    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    with pytest.raises(EngineError) as err:
        resolve_weights(spec, f"hf://{REPO}/{FILE}", Reporter("quiet"))
    assert FILE in str(err.value) and str(hub_cache) in str(err.value)
    assert f"huggingface-cli download {REPO} {FILE}" in err.value.hint and "--weights" in err.value.hint


def test_hub_addresses_are_parsed_or_refused():
    assert parse_hf_url("hf://owner/repo/sub/dir/file.safetensors") == ("owner/repo", "sub/dir/file.safetensors")
    with pytest.raises(EngineError, match="hf://OWNER/REPO/FILE"):
        parse_hf_url("hf://owner/file.pt")
