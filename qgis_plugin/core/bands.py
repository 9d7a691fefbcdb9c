"""Band names: which of the analyst's bands match a model's pretrained bands, and which bands of
a raster a trained model needs.

The matching rule is the engine's (``engine/models/registry.py`` ``canonical_band``: upper case,
'-' -> '_', then the alias table). The models' bands and the alias table come from the engine
itself (``engine models``: ``models[].bands`` and ``band_aliases``); nothing is copied here.
The same answer carries the engine's ``tuning_methods`` and ``decoders`` for the Train dialog.
Qt-free.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .engine_client import run_engine


@dataclass(frozen=True)
class ModelsInfo:
    """What ``engine models`` reports: each model's pretrained bands, the band aliases, and the
    tuning methods and decoders ``train`` accepts (empty from an engine that does not say)."""

    bands: dict[str, list[str]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    tuning_methods: tuple[str, ...] = ()
    decoders: tuple[str, ...] = ()
    patches: dict[str, int] = field(default_factory=dict)  # model → patch size (chip sizes are multiples)
    methods: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model → the tuning methods it supports

    @classmethod
    def from_summary(cls, done: dict) -> "ModelsInfo":
        return cls(bands={m["name"]: [str(b) for b in m.get("bands") or []]
                          for m in done.get("models") or []},
                   aliases={str(k): str(v) for k, v in (done.get("band_aliases") or {}).items()},
                   tuning_methods=tuple(str(m) for m in done.get("tuning_methods") or ()),
                   decoders=tuple(str(d) for d in done.get("decoders") or ()),
                   patches={m["name"]: int(m["patch"]) for m in done.get("models") or [] if m.get("patch")},
                   methods={m["name"]: tuple(m["methods"]) for m in done.get("models") or [] if m.get("methods")})

    def methods_for(self, model: str) -> tuple[str, ...]:
        """The tuning choices for ``model`` ("auto" first); every method when the engine did not say."""
        own = self.methods.get(model)
        return ("auto", *own) if own else self.tuning_methods

    def canonical(self, name: str) -> str:
        key = (name or "").strip().upper().replace("-", "_")
        return self.aliases.get(key, key)

    def pretrained_matches(self, model: str, names: list[str]) -> list[str | None]:
        """For each band name, the pretrained band of ``model`` it matches (None: fresh weights)."""
        index = {self.canonical(b): b for b in self.bands.get(model, [])}
        return [index.get(self.canonical(n)) if n and n.strip() else None for n in names]

    def find_bands(self, wanted: list[str], available: list[str]) -> list[int | None]:
        """For each wanted band name, its 1-based number among ``available`` (None: not found)."""
        index: dict[str, int] = {}
        for number, name in enumerate(available, start=1):
            if name and name.strip():
                index.setdefault(self.canonical(name), number)
        return [index.get(self.canonical(w)) if w and w.strip() else None for w in wanted]


_CACHE: dict[str, ModelsInfo] = {}
_LOCK = threading.Lock()


def cached_models_info(python: str | None) -> ModelsInfo | None:
    with _LOCK:
        return _CACHE.get(str(python))


def fetch_models_info(python: str | None, **run_options) -> ModelsInfo:
    """``engine models`` (about a second: run it off the UI thread); cached per interpreter.
    Raises ``EngineError`` when the engine cannot be run. ``run_options``: ``run_engine``'s
    ``log_dir`` and ``watchdog_s``."""
    cached = cached_models_info(python)
    if cached is not None:
        return cached
    info = ModelsInfo.from_summary(run_engine(python, ["models"], **run_options).done)
    with _LOCK:
        _CACHE[str(python)] = info
    return info


def fallback_band_name(number: int) -> str:
    """The name passed for an unnamed band: never an alias of a pretrained band (as 'B3' is)."""
    return f"band_{number}"
