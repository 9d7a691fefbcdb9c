"""The model card: everything prediction needs to prepare inputs and label outputs.

Stored as ``card.json`` beside the trained tensors (``adapter.safetensors``) and inside the
ONNX file's metadata (key ``geopeft_card``). Versioned and validated on read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.protocol import EngineError

# 2: tuning.patch_embed (trained patch embedding for fresh bands), input.source_dtype, the
#    decoder may be "linear"; version-1 cards still load.
CARD_VERSION = 2
CARD_FILE = "card.json"
WEIGHTS_FILE = "adapter.safetensors"

# key → (type, required)
_SCHEMA = {
    "card_version": (int, True),
    "engine_version": (str, True),
    "backbone": (dict, True),
    "decoder": (str, True),
    "tuning": (dict, True),
    "input": (dict, True),
    "classes": (list, True),
    "chip_size": (int, True),
    "training": (dict, False),
    "files": (dict, False),
}
_INPUT_SCHEMA = {"bands": list, "band_names": list, "mean": list, "std": list}


def validate_card(card: dict, source: str = "model card") -> dict:
    if not isinstance(card, dict):
        raise EngineError(f"{source} is not a JSON object")
    for key, (kind, required) in _SCHEMA.items():
        if key not in card:
            if required:
                raise EngineError(f"{source} lacks {key!r}", hint="train the model again with this engine")
            continue
        if not isinstance(card[key], kind):
            raise EngineError(f"{source}: {key!r} should be a {kind.__name__}")
    if card["card_version"] > CARD_VERSION:
        raise EngineError(f"{source} has card version {card['card_version']}, newer than this engine "
                          f"understands ({CARD_VERSION})", hint="update GeoPEFT")
    for key, kind in _INPUT_SCHEMA.items():
        if not isinstance(card["input"].get(key), kind):
            raise EngineError(f"{source}: input.{key} missing or not a {kind.__name__}")
    n = len(card["input"]["bands"])
    if not (len(card["input"]["mean"]) == len(card["input"]["std"]) == n):
        raise EngineError(f"{source}: bands, mean and std differ in length")
    for c in card["classes"]:
        if not (isinstance(c, dict) and {"value", "name", "colour"} <= set(c)):
            raise EngineError(f"{source}: each class needs value, name and colour")
    if len(card["classes"]) < 2:
        raise EngineError(f"{source}: fewer than two classes")
    return card


def write_card(card: dict, folder: str | os.PathLike) -> Path:
    validate_card(card)
    path = Path(folder) / CARD_FILE
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(card, indent=2))
    os.replace(tmp, path)
    return path


def read_card(model: str | os.PathLike) -> tuple[dict, Path]:
    """(card, model folder) from a model folder or its card.json."""
    path = Path(model)
    if path.is_dir():
        path = path / CARD_FILE
    if not path.exists():
        raise EngineError(f"model not found: {path}",
                          hint="pass the folder written by 'train' (it holds card.json), or an .onnx file")
    try:
        card = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(f"model card {path} is not valid JSON: {exc}") from None
    return validate_card(card, str(path)), path.parent
