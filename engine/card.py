"""The model card: everything prediction needs to prepare inputs and label outputs.

Stored as ``card.json`` beside the trained tensors (``adapter.safetensors``) and inside the
ONNX file's metadata (key ``geopeft_card``). Versioned and validated on read against ``SCHEMA``.

Validation policy: the version is checked first (a card newer than this engine is refused with
"update GeoPEFT", not with a list of fields it does not know). Then every field is checked for its
type and, where the engine acts on it, its allowed values. Unknown fields are refused, naming the
field, at the top level and in every section the engine acts on (a typo such as ``chipsize`` or a
field of a newer engine would otherwise be silently ignored and the model run as something it is
not); only ``training`` (statistics for people), ``export.agreement`` and
``backbone.weights.matched_bands`` (free band names) take other keys.

Hand-written rather than with ``jsonschema``: that package is not a dependency of the engine
(only installed here by chance), ONNX prediction must run with onnxruntime and numpy alone, and
these few rules give messages in the user's terms (the file, the field, what to do).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.protocol import EngineError

# 2: tuning.patch_embed (trained patch embedding for fresh bands), input.source_dtype, the
#    decoder may be "linear"; version-1 cards still load.
# 3: tuning.prompt_tokens and prompt_dropout (VPT), parent (train --init-from), decoders upernet
#    and fcn; older cards still load.
# 4: input.frames and input.metadata (train --frames/--metadata), backbone.weights.url (hf://),
#    the vit-adapter method and the Clay, DeCUR and timm backbones.
CARD_VERSION = 4
CARD_FILE = "card.json"
WEIGHTS_FILE = "adapter.safetensors"


class Field:
    """One field: its JSON type(s) (``int``, ``number``, ``str``, ``bool``, ``object``, ``array``,
    ``null``), whether it is required, its allowed values, the schema of an object's keys
    (``keys``; ``open``: other keys allowed) or of an array's items (``items``)."""

    def __init__(self, *types: str, required: bool = True, allowed=None, keys: dict | None = None,
                 items: "Field | None" = None, open: bool = False):
        self.types, self.required, self.allowed = types, required, allowed
        self.keys, self.items, self.open = keys, items, open


_TYPE_TESTS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}
_TYPE_WORDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false",
               "object": "an object", "array": "a list", "null": "null"}


def _json_type(value) -> str:
    for name in ("bool", "int", "number", "str", "object", "array", "null"):
        if _TYPE_TESTS[name](value):
            return {"object": "an object", "array": "a list"}.get(name, f"{_TYPE_WORDS[name]} ({value!r:.40})")
    return type(value).__name__


def _opt(*types: str, **kw) -> Field:
    return Field(*types, required=False, **kw)


# The fields of engine.tuning.TuningConfig (checked equal by tests/faults/test_models.py): the card's
# tuning section is passed to it as keyword arguments, so an unknown key must be refused here.
TUNING_FIELDS = ("method", "rank", "alpha", "dropout", "target_modules", "patch_embed", "prompt_tokens",
                 "prompt_dropout")

SCHEMA = Field("object", keys={
    "card_version": Field("int"),
    "engine_version": Field("str"),
    "created": _opt("str"),
    "backbone": Field("object", keys={
        "name": Field("str"),  # a registered backbone: checked where the model is built (needs torch)
        "weights": _opt("object", keys={
            "source": Field("str", allowed=("file", "hub", "random")),
            "path": _opt("str", "null"),
            "sha256": _opt("str", "null"),
            "matched_bands": _opt("object", open=True),
            "fresh_bands": _opt("array", items=Field("str")),
            "url": _opt("str"),  # hf://OWNER/REPO/FILE
        }),
        "licence": _opt("str"),
    }),
    "decoder": Field("str"),  # a registered decoder: checked where the model is built
    "tuning": Field("object", keys={
        "method": Field("str"),  # a registered method: checked where the model is built
        "rank": _opt("int"), "alpha": _opt("int"), "dropout": _opt("number"),
        "target_modules": _opt("str"), "patch_embed": _opt("bool"),
        "prompt_tokens": _opt("int"), "prompt_dropout": _opt("number"),
    }),
    "input": Field("object", keys={
        "bands": Field("array", items=Field("int")),
        "band_names": Field("array", items=Field("str", "null")),
        "num_images": _opt("int"),
        "frames": _opt("int"),  # dates in the stacked bands (1 when absent)
        "metadata": _opt("object", keys={  # train --metadata: the -TL encoders' inputs
            "dates": Field("array", items=Field("str")),
            "temporal": Field("array", items=Field("array", items=Field("number"))),
            "location": Field("array", items=Field("number")),
        }),
        "mean": Field("array", items=Field("number")),
        "std": Field("array", items=Field("number")),
        "dtype": _opt("str", allowed=("float32",)),
        "source_dtype": _opt("str", "null"),
        "nodata": _opt("str"),
    }),
    "classes": Field("array", items=Field("object", keys={
        "value": Field("int"), "name": Field("str"), "colour": Field("str")})),
    "chip_size": Field("int"),
    "stride": _opt("int"),  # version-1 cards
    "grid": _opt("object", keys={
        "crs": _opt("str", "null"), "width": Field("int"), "height": Field("int"),
        "transform": Field("array", items=Field("number")),
    }),
    "training": _opt("object", open=True),
    "parent": _opt("object", open=True),  # the model training continued from (train --init-from)
    "files": _opt("object", keys={"weights": Field("str"), "weights_sha256": _opt("str")}),
    "export": _opt("object", keys={  # ONNX files' cards
        "merged": _opt("bool"), "opset": _opt("int"), "input": _opt("str"), "output": _opt("str"),
        "layout": _opt("str"), "profile": _opt("str"), "quantize": _opt("str", "null"),
        "precision": _opt("str"), "float32_nodes": _opt("int", "array"), "agreement": _opt("object", open=True),
    }),
})
assert set(SCHEMA.keys["tuning"].keys) == set(TUNING_FIELDS)


def _bad(source: str, message: str, hint: str | None = None) -> EngineError:
    return EngineError(f"{source}: {message}", hint=hint or "the card is damaged or was edited by hand: put back "
                       "the card.json the engine wrote (or train / export the model again)")


def _check(value, field: Field, where: str, source: str) -> None:
    if not any(_TYPE_TESTS[t](value) for t in field.types):
        raise _bad(source, f"{where} should be {' or '.join(_TYPE_WORDS[t] for t in field.types)}, "
                           f"not {_json_type(value)}")
    if field.allowed is not None and value not in field.allowed:
        raise _bad(source, f"{where} is {value!r}; allowed: {', '.join(map(str, field.allowed))}")
    if isinstance(value, dict) and field.keys is not None:
        for key, sub in field.keys.items():
            if key in value:
                _check(value[key], sub, f"{where}.{key}" if where else key, source)
            elif sub.required:
                raise _bad(source, f"the field {f'{where}.{key}' if where else key} is missing")
        unknown = [k for k in value if k not in field.keys]
        if unknown and not field.open:
            named = ", ".join(f"{where}.{k}" if where else k for k in unknown)
            raise _bad(source, f"unknown field{'s' if len(unknown) > 1 else ''} {named} (this engine knows "
                               f"{', '.join(field.keys)}{' there' if where else ''})",
                       hint="the card was written by another GeoPEFT version or edited by hand: remove the "
                            "field, or update GeoPEFT")
    if isinstance(value, list) and field.items is not None:
        for i, item in enumerate(value):
            _check(item, field.items, f"{where}[{i}]", source)


def validate_card(card: dict, source: str = "model card") -> dict:
    if not isinstance(card, dict):
        raise _bad(source, f"should be a JSON object, not {_json_type(card)}")
    version = card.get("card_version")
    if not _TYPE_TESTS["int"](version) or version < 1:
        raise _bad(source, f"card_version is {version!r}, not a card version (1 to {CARD_VERSION})")
    if version > CARD_VERSION:
        raise EngineError(f"{source} has card version {version}, newer than this engine understands "
                          f"(versions 1 to {CARD_VERSION})",
                          hint="update GeoPEFT to use this model (or train / export it again with this version)")
    _check(card, SCHEMA, "", source)
    inp = card["input"]
    n = len(inp["bands"])
    if n == 0 or any(b < 1 for b in inp["bands"]):
        raise _bad(source, f"input.bands {inp['bands']} should list 1-based band numbers")
    if not (len(inp["band_names"]) == len(inp["mean"]) == len(inp["std"]) == n):
        raise _bad(source, "input.bands, band_names, mean and std differ in length")
    if any(s <= 0 for s in inp["std"]):
        raise _bad(source, "input.std holds a value ≤ 0")
    if len(card["classes"]) < 2:
        raise _bad(source, "fewer than two classes")
    if len({c["value"] for c in card["classes"]}) != len(card["classes"]):
        raise _bad(source, "two classes share a value")
    if card["chip_size"] < 1:
        raise _bad(source, f"chip_size {card['chip_size']} should be positive")
    weights = card.get("files", {}).get("weights")
    if weights is not None and (Path(weights).name != weights or not weights.endswith(".safetensors")):
        raise _bad(source, f"files.weights {weights!r} should name a .safetensors file in the model folder "
                           "(trained weights are read as safetensors only, never unpickled)")
    return card


def write_card(card: dict, folder: str | os.PathLike) -> Path:
    validate_card(card)
    path = Path(folder) / CARD_FILE
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(card, indent=2))
    os.replace(tmp, path)
    return path


ONNX_CARD_KEY = "geopeft_card"  # the ONNX metadata key holding the card


def card_from_onnx_metadata(meta: dict, name: str) -> dict:
    """The validated card in an exported ONNX file's metadata (``name``: the file's, for messages)."""
    if ONNX_CARD_KEY not in meta:
        raise EngineError(f"{name} has no GeoPEFT model card in its metadata",
                          hint="export the model with 'python -m engine export', or pass the model folder")
    try:
        card = json.loads(meta[ONNX_CARD_KEY])
    except ValueError as exc:
        raise EngineError(f"the model card in {name} is not valid JSON ({exc})", hint="export the model again") from None
    return validate_card(card, f"model card in {name}")


def read_card(model: str | os.PathLike) -> tuple[dict, Path]:
    """(card, model folder) from a model folder or its card.json."""
    path = Path(model)
    if not path.exists():
        raise EngineError(f"model not found: {path}",
                          hint="pass the folder written by 'train' (it holds card.json), or an .onnx file")
    if path.is_dir():
        if not (path / CARD_FILE).is_file():
            raise EngineError(f"{path.name} is not a GeoPEFT model folder: it holds no {CARD_FILE} ({path})",
                              hint="pass the folder written by 'train' (it holds card.json and "
                                   f"{WEIGHTS_FILE}), or an .onnx file")
        path = path / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(f"model card {path} is not valid JSON: {exc}",
                          hint="pass the card.json written by 'train' (or train the model again)") from None
    return validate_card(card, f"model card {path}"), path.parent
