"""Continue training from a trained model (``train --init-from MODEL``).

The analyst's loop: label a little, train, look at the map, correct or add labels, train again
from where the model stands. The new run keeps the parent's model choices (backbone and its
weights file, tuning method and adapter shape, decoder, bands, chip size, classes and the
normalisation statistics, which its adapters were trained with) and starts from its trained
tensors (adapters, patch embedding for fresh bands, neck and decoder; the whole model when the
backbone started from random weights). It writes a new model folder whose card names its parent.

Everything else is the new run's: images, labels, epochs, time budget, learning rate, split.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from engine.card import read_card
from engine.protocol import EngineError, Reporter

# train options (argparse dests) the parent decides: giving one that differs is refused
INHERITED = ("backbone", "weights", "tuning", "lora_rank", "lora_alpha", "prompt_tokens", "decoder", "bands",
             "band_names", "chip_size", "classes")


class Parent:
    """The model a run starts from: its card and folder."""

    def __init__(self, model: str | Path):
        self.card, self.folder = read_card(model)
        if self.card.get("export"):
            raise EngineError(f"--init-from {model} is an exported model card; training continues from a model "
                              "folder", hint="give the folder written by 'train' (it holds card.json and "
                                             "adapter.safetensors)")

    @property
    def classes(self) -> list[dict]:
        return [dict(c) for c in self.card["classes"]]

    @property
    def statistics(self) -> tuple[list[float], list[float]]:
        return list(self.card["input"]["mean"]), list(self.card["input"]["std"])

    def weights_option(self) -> str:
        """The parent's backbone weights as a ``--weights`` value."""
        weights = self.card["backbone"].get("weights") or {}
        source = weights.get("source")
        if source == "file" and weights.get("path"):
            return weights["path"]
        if source == "hub":
            return weights.get("path") if weights.get("path") and Path(weights["path"]).is_file() else "hub"
        return "none"

    def check_weights(self, path: Path | None) -> None:
        """The backbone checkpoint must be the parent's: its adapters were trained on it."""
        expected = (self.card["backbone"].get("weights") or {}).get("sha256")
        if path is None or not expected:
            return
        from engine.models.checkpoints import sha256_file

        if sha256_file(path) != expected:
            raise EngineError(f"backbone weights {path} differ from those {self.folder.name} was trained on (sha256)",
                              hint="put the parent's backbone checkpoint back at that path")

    def as_card(self) -> dict:
        """What the child's card records of its parent."""
        training = self.card.get("training") or {}
        return {"path": str(self.folder.resolve()), "created": self.card.get("created"),
                "weights_sha256": (self.card.get("files") or {}).get("weights_sha256"),
                "best_val_miou": training.get("best_val_miou"), "labels": training.get("labels"),
                "epochs": training.get("epochs")}


def inherit(cfg, parent: Parent, given: set[str]):
    """``cfg`` with the parent's model choices. An option on the command line that contradicts
    the parent is refused, naming it (the parent's trained tensors fit only its own model)."""
    card = parent.card
    tuning = card["tuning"]
    theirs = {
        "backbone": card["backbone"]["name"], "weights": parent.weights_option(), "tuning": tuning["method"],
        "lora_rank": tuning.get("rank", cfg.tuning.rank), "lora_alpha": tuning.get("alpha", cfg.tuning.alpha),
        "prompt_tokens": tuning.get("prompt_tokens", cfg.tuning.prompt_tokens),
        "decoder": card["decoder"], "bands": list(card["input"]["bands"]),
        "band_names": list(card["input"]["band_names"]), "chip_size": card["chip_size"],
        "classes": parent.classes,
    }
    mine = {"backbone": cfg.backbone, "weights": cfg.weights, "tuning": cfg.tuning.method,
            "lora_rank": cfg.tuning.rank, "lora_alpha": cfg.tuning.alpha, "prompt_tokens": cfg.tuning.prompt_tokens,
            "decoder": cfg.decoder,
            "bands": cfg.bands, "band_names": cfg.band_names, "chip_size": cfg.chip_size, "classes": cfg.classes}
    conflicts = []
    for dest in INHERITED:
        if dest not in given or mine[dest] in (None, "auto"):
            continue
        a, b = mine[dest], theirs[dest]
        if dest == "classes":  # names and colours may change; the values are the model's outputs
            a, b = sorted(c["value"] for c in a), sorted(c["value"] for c in b)
        elif dest == "weights" and a not in ("hub", "none") and b not in ("hub", "none"):
            a, b = str(Path(a).resolve()), str(Path(b).resolve())
        if a != b:
            conflicts.append(f"--{dest.replace('_', '-')} {_shown(a)} (the parent has {_shown(b)})")
    if conflicts:
        raise EngineError(f"--init-from {parent.folder}: " + "; ".join(conflicts),
                          hint="training continues with the parent model's backbone, tuning, decoder, bands, chip "
                               "size and classes: leave those options out (or train a new model without --init-from)")
    classes = parent.classes
    if "classes" in given and cfg.classes:  # new names/colours for the same values
        named = {int(c["value"]): c for c in cfg.classes}
        classes = [{**c, **{k: v for k, v in named.get(c["value"], {}).items() if k in ("name", "colour")}}
                   for c in classes]
    # the parent's frames and metadata (a continued model sees the same dates and place: its own)
    frames, metadata = card["input"].get("frames", 1), card["input"].get("metadata")
    return replace(cfg, backbone=theirs["backbone"], weights=theirs["weights"], decoder=theirs["decoder"],
                   bands=theirs["bands"], band_names=theirs["band_names"], chip_size=theirs["chip_size"],
                   frames=frames, metadata=metadata is not None,
                   dates=metadata["dates"] if metadata else cfg.dates,
                   classes=classes, tuning=replace(cfg.tuning, method=tuning["method"], rank=theirs["lora_rank"],
                                                   alpha=theirs["lora_alpha"],
                                                   dropout=tuning.get("dropout", cfg.tuning.dropout),
                                                   target_modules=tuning.get("target_modules",
                                                                             cfg.tuning.target_modules),
                                                   prompt_tokens=theirs["prompt_tokens"],
                                                   prompt_dropout=tuning.get("prompt_dropout",
                                                                             cfg.tuning.prompt_dropout)))


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def load_parent_tensors(model, parent: Parent, reporter: Reporter) -> int:
    """The parent's trained tensors into ``model`` (built and tuned like the parent). Returns
    how many tensors were loaded."""
    from engine.inference.runners import load_trained_tensors

    count = load_trained_tensors(model, parent.card, parent.folder)
    miou = (parent.card.get("training") or {}).get("best_val_miou")
    reporter.info(f"starting from {parent.folder.name}: {count} trained tensors loaded"
                  + (f" (its validation mIoU {miou:.3f})" if isinstance(miou, (int, float)) else ""))
    return count
