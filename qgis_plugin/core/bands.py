"""Band names: which of the analyst's bands match a model's pretrained bands, and which bands of
a raster a trained model needs.

The matching rule is the engine's (``engine/models/registry.py`` ``canonical_band``: upper case,
'-' -> '_', then the alias table). The models' bands and the alias table come from the engine
itself (``engine models``: ``models[].bands`` and ``band_aliases``); nothing is copied here.
The same answer carries the engine's ``tuning_methods`` and ``decoders`` for the Train dialog.
Qt-free.
"""
from __future__ import annotations

import re
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
    wavelengths: dict[str, float] = field(default_factory=dict)  # canonical band name → centre wavelength (µm)
    methods: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model → the tuning methods it supports

    @classmethod
    def from_summary(cls, done: dict) -> "ModelsInfo":
        return cls(bands={m["name"]: [str(b) for b in m.get("bands") or []]
                          for m in done.get("models") or []},
                   aliases={str(k): str(v) for k, v in (done.get("band_aliases") or {}).items()},
                   tuning_methods=tuple(str(m) for m in done.get("tuning_methods") or ()),
                   decoders=tuple(str(d) for d in done.get("decoders") or ()),
                   patches={m["name"]: int(m["patch"]) for m in done.get("models") or [] if m.get("patch")},
                   wavelengths={str(k): float(v) for k, v in (done.get("band_wavelengths") or {}).items()},
                   methods={m["name"]: tuple(m["methods"]) for m in done.get("models") or [] if m.get("methods")})

    def methods_for(self, model: str) -> tuple[str, ...]:
        """The tuning choices for ``model`` ("auto" first); every method when the engine did not say."""
        own = self.methods.get(model)
        return ("auto", *own) if own else self.tuning_methods

    def canonical(self, name: str) -> str:
        key = (name or "").strip().upper().replace("-", "_")
        return self.aliases.get(key, key)

    def wavelength(self, name: str) -> float | None:
        """A band's centre wavelength (µm): written in its name (``705nm``, ``0.705um``) or known
        for its canonical name (the engine's table)."""
        text = (name or "").strip().lower().replace(" ", "")
        m = re.fullmatch(r"(?:.*[^\d.])?(\d+(?:\.\d+)?)(nm|um|µm|μm)", text)
        if m:
            return float(m.group(1)) / (1000 if m.group(2) == "nm" else 1)
        return self.wavelengths.get(self.canonical(name)) if text else None

    def pretrained_matches(self, model: str, names: list[str], tolerance: float = 0.03) -> list[str | None]:
        """For each band name, the pretrained band of ``model`` it matches (None: fresh weights):
        the engine's rule (``match_bands``): by name first, else the nearest centre wavelength
        within 3 %; each pretrained band once."""
        pretrained = self.bands.get(model, [])
        index = {self.canonical(b): b for b in pretrained}
        out: list[str | None] = [None] * len(names)
        for j, name in enumerate(names):
            hit = index.get(self.canonical(name)) if name and name.strip() else None
            if hit is not None and hit not in out:
                out[j] = hit
        waves = {b: self.wavelength(b) for b in pretrained}
        for j, name in enumerate(names):
            wave = self.wavelength(name) if out[j] is None else None
            if wave is None:
                continue
            near = [(abs(w - wave) / w, b) for b, w in waves.items()
                    if w and b not in out and abs(w - wave) / w <= tolerance]
            if near:
                out[j] = min(near)[1]
        return out

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
