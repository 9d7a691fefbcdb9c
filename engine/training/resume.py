"""Cancel and resume a training run.

Between epochs (from the second one on) the run writes Lightning's checkpoint of its whole
training state to a working folder: the trained tensors (not a frozen backbone, rebuilt from
its weights), the optimiser, the learning-rate schedule, the loops' epoch and step, the kept
best epoch (``KeepBest``) and the random states (Python, NumPy, torch). A cancel (SIGTERM or
``cancel`` on stdin) stops the run within one batch, in training or in validation, and the last
such checkpoint goes into the model folder as ``resume.ckpt`` beside the best weights so far,
with ``resume.json``: the run's configuration (absolute paths) and where it stopped.

``train --resume DIR`` rebuilds the same data (same split and seed; the chips of an epoch depend
only on the seed and the epoch, see ``RandomCrops``) and the same model, and lets Lightning
continue from the checkpoint (``fit(ckpt_path=...)``): the epoch that was cancelled is run again
from its start, so the result equals an uninterrupted run's. A run that finishes replaces the
folder with the final model: the resume files go with it.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from engine.protocol import EngineError

RESUME_CKPT = "resume.ckpt"
RESUME_FILE = "resume.json"
# Test hook: cancel at a chosen point as if SIGTERM came: "step:N" after training step N,
# "validate:E:B" after validation batch B (0-based) of epoch E (1-based), "written" once the
# model folder is written (see ``engine.training.task.ProgressEvents`` and ``report_end``).
CANCEL_AT_ENV = "GEOPEFT_TEST_CANCEL_AT"

# CLI option (argparse dest) → TrainConfig field ("tuning.rank": a field of the TuningConfig).
OPTION_FIELDS = {
    "image": "images", "labels": "labels", "out": "out", "bands": "bands", "band_names": "band_names",
    "label_field": "label_field", "ignore_index": "ignore_index", "classes": "classes",
    "backbone": "backbone", "weights": "weights", "tuning": "tuning.method", "lora_rank": "tuning.rank",
    "lora_alpha": "tuning.alpha", "prompt_tokens": "tuning.prompt_tokens",
    "prompt_dropout": "tuning.prompt_dropout", "decoder": "decoder", "chip_size": "chip_size", "epochs": "epochs",
    "max_time": "max_time", "batch_size": "batch_size", "lr": "lr", "val_fraction": "val_fraction",
    "chips_per_epoch": "chips_per_epoch", "device": "device", "precision": "precision",
    "devices": "devices", "num_nodes": "num_nodes", "strategy": "strategy", "workers": "workers",
    "seed": "seed", "init_from": "init_from", "preview_dir": "preview_dir", "preview_every": "preview_every",
    "preview_extent": "preview_extent", "preview_request": "preview_request", "frames": "frames",
    "metadata": "metadata", "date": "dates", "no_activation_checkpointing": "activation_checkpointing",
}
# May differ on resume: where the run computes, not what it computes.
MAY_CHANGE = {"device", "workers", "no_activation_checkpointing"}
# Not kept for a resumed run (it previews only when asked again): the caller's temporary files.
PREVIEW_OPTIONS = {"preview_dir": None, "preview_every": 5, "preview_extent": None, "preview_request": None}
MAY_CHANGE |= set(PREVIEW_OPTIONS)


def _resolved(path) -> str:
    return str(Path(path).expanduser().resolve())


def config_record(cfg) -> dict:
    """``cfg`` as JSON, with absolute paths (a resumed run may start in another folder)."""
    record = {**asdict(cfg), **PREVIEW_OPTIONS}
    record["images"] = [_resolved(p) for p in cfg.images or []]
    for key in ("labels", "out", "init_from"):
        if record[key]:
            record[key] = _resolved(record[key])
    if record["weights"] not in (None, "auto", "hub", "none") and Path(record["weights"]).expanduser().exists():
        record["weights"] = _resolved(record["weights"])
    return record


def config_from_record(record: dict):
    from engine.training.train import TrainConfig
    from engine.tuning import TuningConfig

    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in record.items() if k in known and k != "tuning"},
                       tuning=TuningConfig(**record["tuning"]))


def read_resume(folder) -> tuple[dict, Path]:
    """(resume.json, resume.ckpt) of a cancelled run's model folder; EngineError if it has none."""
    folder = Path(folder)
    start_again = "start the training again (train --image … --labels … --out FOLDER)"
    if not folder.is_dir():
        raise EngineError(f"cannot resume {folder}: there is no such folder",
                          hint="pass the model folder of a cancelled training run (it holds resume.ckpt)")
    ckpt, info = folder / RESUME_CKPT, folder / RESUME_FILE
    if not (ckpt.is_file() and info.is_file()):
        hint = f"the folder holds no cancelled run to continue; {start_again}"
        try:
            card = json.loads((folder / "card.json").read_text())
            if not card.get("training", {}).get("cancelled"):
                hint = ("its training finished: the model is complete. To train more, start a new run "
                        "with another --out folder")
        except (OSError, ValueError):
            pass
        raise EngineError(f"{folder} holds no resume checkpoint ({RESUME_CKPT}): there is nothing to resume",
                          hint=hint)
    try:
        return json.loads(info.read_text()), ckpt
    except ValueError as exc:
        raise EngineError(f"{info} is not valid JSON: {exc}", hint=start_again) from None


def given_options(argv: list[str]) -> set[str]:
    """The train options (argparse dests) written on the command line ``argv`` (also as
    ``--opt=value`` or an unambiguous abbreviation, which argparse accepts)."""
    names = {dest.replace("_", "-"): dest for dest in OPTION_FIELDS}
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0]
        matches = [n for n in names if n == name] or [n for n in names if n.startswith(name)]
        if len(matches) == 1:
            given.add(names[matches[0]])
    return given


def resumed_config(folder, given_cfg, given: set[str]):
    """The cancelled run's configuration; ``given_cfg`` (the command line's) may only repeat it,
    or change --device and --workers. Anything else is refused, naming each option."""
    info, _ = read_resume(folder)
    saved = info["config"]
    saved["out"] = _resolved(folder)  # the folder is where it is now
    asked = config_record(given_cfg)
    conflicts = []
    for dest in sorted(given):
        field = OPTION_FIELDS[dest]
        key, _, sub = field.partition(".")
        mine, theirs = asked[key], saved[key]
        if sub:
            mine, theirs = mine[sub], theirs[sub]
        if dest in MAY_CHANGE:
            saved[key] = mine
        elif mine != theirs:
            shown = ",".join(map(str, mine)) if isinstance(mine, list) else mine
            was = ",".join(map(str, theirs)) if isinstance(theirs, list) else theirs
            was = "the default" if theirs is None else was
            conflicts.append(f"--{dest.replace('_', '-')} {shown} (the run was started with {was})")
    if conflicts:
        raise EngineError(f"cannot resume {folder} with other arguments: " + "; ".join(conflicts),
                          hint="a resumed run continues with the arguments it started with (only --device and "
                          "--workers may change): leave the others out, or start a new run with another --out")
    return config_from_record(saved)


def resume_record(cfg, *, epochs_done: int, step: int, cancelled_in_epoch: int, data_check: dict) -> dict:
    return {"checkpoint": RESUME_CKPT, "epochs_done": epochs_done, "epochs": cfg.epochs, "step": step,
            "cancelled_in_epoch": cancelled_in_epoch, "data": data_check, "config": config_record(cfg),
            "command": f"python -m engine train --resume {_resolved(cfg.out)}"}


# -- random states ---------------------------------------------------------------------------
def rng_state() -> dict:
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- what a run that stopped keeps, and says ----------------------------------------------------
def data_check(data) -> dict:
    """What must be the same when a run resumes: the split and the chips of an epoch."""
    return {"train_pixels": int(data.train_target.labelled), "val_pixels": int(data.val_target.labelled),
            "chip_size": int(data.chip_size), "chips_per_epoch": int(data.chips_per_epoch),
            "classes": [int(c["value"]) for c in data.classes]}


def nothing_new_kept(reporter, trainer, cfg, folder, resume_info) -> dict:
    """A cancel before an epoch ended (of this process): nothing is written."""
    if resume_info is None:
        reporter.warning("training cancelled before the first epoch ended: nothing was kept and there is "
                         "nothing to resume; start the training again")
        return {"out": None, "epochs": trainer.current_epoch, "resumable": False}
    done = resume_info["epochs_done"]
    reporter.warning(f"training cancelled in epoch {trainer.current_epoch + 1} of {cfg.epochs}, before it ended: "
                     f"{folder} is unchanged (the best model so far, and the resume checkpoint after epoch {done}); "
                     f"continue with: {resume_info['command']}")
    return {"out": str(folder), "epochs": done, "resumable": True}


def card_and_files(card: dict, cfg, trainer, checkpoints, resume_ckpt: Path | None,
                   resume_info: dict | None, data: dict) -> dict:
    """Completes the card of a cancelled (or resumed) run; the resume files to write beside it."""
    training = card["training"]
    if resume_info is not None:
        training["resumed_after_epoch"] = resume_info["epochs_done"]
    if not training["cancelled"]:
        return {}
    training["cancelled_in_epoch"] = trainer.current_epoch + 1
    if resume_ckpt is None:
        return {}
    record = resume_record(cfg, epochs_done=checkpoints.epochs_done, step=checkpoints.step,
                           cancelled_in_epoch=trainer.current_epoch + 1, data_check=data)
    training["resume"] = {k: record[k] for k in ("epochs_done", "epochs", "checkpoint", "command")}
    return {RESUME_CKPT: resume_ckpt, RESUME_FILE: json.dumps(record, indent=2)}


def report_end(reporter, summary: dict, card: dict, stopped: bool) -> dict:
    """The warning that says what a cancel did; the ``done`` summary."""
    if os.environ.get(CANCEL_AT_ENV) == "written":  # test hook: a cancel after the model was written
        reporter.cancel()
    training, out = card["training"], summary["out"]
    if stopped:
        miou = training["best_val_miou"]
        best = (f"the best model so far (epoch {training['best_epoch']}"
                + (f", validation mIoU {miou:.3f}" if miou is not None else "") + f") is in {out}")
        resume = training.get("resume")
        if resume:
            reporter.warning(f"training cancelled in epoch {training['cancelled_in_epoch']} of {resume['epochs']}: "
                             f"{best}; the first {resume['epochs_done']} epochs are saved for resuming (epoch "
                             f"{resume['epochs_done'] + 1} starts again): continue with: {resume['command']}")
        else:
            reporter.warning(f"training cancelled in epoch {training['cancelled_in_epoch']}: {best}; there is no "
                             "resume checkpoint (one is kept from the start of the second epoch on)")
        summary["resumable"] = bool(resume)
    elif reporter.cancelled:
        reporter.warning(f"training finished before the cancel arrived: the model is complete ({out})")
        reporter.withdraw_cancel()
        summary["finished_before_cancel"] = True
    return summary
