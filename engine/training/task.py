"""The Lightning system around a Segmentor: loss, optimiser, validation metrics, and the
callbacks that report progress through the protocol and keep the best trained tensors."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from engine.metrics import scores
from engine.protocol import Reporter
from engine.training.memory import fp32_state
from engine.training.resume import CANCEL_AT_ENV, rng_state, set_rng_state
from engine.tuning import trainable_keys, trainable_state_dict


class TrainingCancelled(Exception):
    """Raised from a batch hook when the reporter's cancel flag is set: ends ``fit`` at once."""


class SegmentationTask(L.LightningModule):
    def __init__(self, model: nn.Module, class_names: list[str], lr: float, weight_decay: float = 0.01,
                 class_weights: list[float] | None = None, monitor: str = "val_miou"):
        super().__init__()
        self.model = model
        self.class_names = class_names
        self.lr = lr
        self.weight_decay = weight_decay
        self.monitor = monitor  # what the learning-rate schedule watches: val_miou, or train_loss_epoch
        self.register_buffer("class_weights", torch.tensor(class_weights or [1.0] * len(class_names)),
                             persistent=False)
        self.val_confusion = MulticlassConfusionMatrix(len(class_names), ignore_index=-1)
        self.last_val: dict | None = None
        self.checkpoint_keys: set[str] | None = None  # None: checkpoints hold the whole model

    def save_only_trained(self, include_frozen: bool) -> None:
        """Checkpoints (the resume checkpoint) hold only the tensors training changes: a frozen
        backbone is rebuilt from its weights file when the run resumes."""
        self.checkpoint_keys = {f"model.{k}" for k in trainable_keys(self.model, include_frozen)}
        self.strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.checkpoint_keys is not None:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k in self.checkpoint_keys}
        checkpoint["state_dict"] = fp32_state(checkpoint["state_dict"])  # frozen weights held in bf16 (memory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy over the labelled pixels (-1: no label). A batch without
        a labelled pixel gives 0 with no gradient, where the library's mean would give NaN."""
        per_pixel = F.cross_entropy(logits, y, weight=self.class_weights, ignore_index=-1, reduction="sum")
        labelled = y >= 0
        total_weight = self.class_weights[y[labelled]].sum()
        return per_pixel / total_weight.clamp_min(1e-12)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self.model(x).float(), y)
        self.log("train_loss", loss, prog_bar=False, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x).float()
        self.log("val_loss", self.loss(logits, y), on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.val_confusion.update(logits.argmax(1), y)

    def on_validation_epoch_end(self):
        matrix = self.val_confusion.compute().cpu().numpy()  # synced across processes
        self.val_confusion.reset()
        result = scores(matrix, self.class_names)
        self.last_val = result
        self.log("val_miou", result["miou"], sync_dist=False)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        # The paper's schedule: reduce the learning rate when validation stalls (the training
        # loss stands in when nothing is held out).
        mode = "max" if self.monitor == "val_miou" else "min"
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=5)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor, "interval": "epoch"}}


class ProgressEvents(L.Callback):
    """Protocol events for every step and validation; honours the reporter's cancel flag."""

    def __init__(self, reporter: Reporter, total_steps: int | None, max_seconds: float | None = None):
        self.reporter = reporter
        self.total_steps = total_steps
        self.max_seconds = max_seconds
        self.started = time.monotonic()
        self.cancel_at = os.environ.get(CANCEL_AT_ENV, "").split(":")

    def _check_cancel(self) -> None:
        """Honoured after every training and validation batch: the run stops within one batch."""
        if self.reporter.cancelled:
            raise TrainingCancelled()

    def on_train_start(self, trainer, pl_module):
        self.started = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
        step = trainer.global_step
        elapsed = time.monotonic() - self.started
        # Whichever ends training first: the step count or the time budget.
        fraction = max(step / self.total_steps if self.total_steps else 0.0,
                       elapsed / self.max_seconds if self.max_seconds else 0.0)
        self.reporter.progress("train", step, self.total_steps, epoch=trainer.current_epoch + 1,
                               loss=round(loss, 5), elapsed_s=round(elapsed, 1), fraction=round(min(fraction, 1.0), 4))
        if self.cancel_at[0] == "step" and step == int(self.cancel_at[1]):
            self.reporter.cancel()
        self._check_cancel()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        if self.cancel_at[0] == "validate" and [trainer.current_epoch + 1, batch_idx] == \
                [int(v) for v in self.cancel_at[1:3]]:
            self.reporter.cancel()
        self._check_cancel()

    def on_validation_end(self, trainer, pl_module):  # after the module's epoch-end hook
        if trainer.sanity_checking or pl_module.last_val is None:
            return
        epoch = trainer.current_epoch + 1
        self.reporter.metric("val_miou", pl_module.last_val["miou"], "validate", epoch=epoch)
        val_loss = trainer.callback_metrics.get("val_loss")
        if val_loss is not None:
            self.reporter.metric("val_loss", float(val_loss), "validate", epoch=epoch)

    def on_train_epoch_end(self, trainer, pl_module):
        loss = trainer.callback_metrics.get("train_loss_epoch")
        if loss is not None:
            self.reporter.metric("train_loss", float(loss), "train", epoch=trainer.current_epoch + 1)


class History(L.Callback):
    """The learning curves: per epoch the training loss, validation loss and mIoU, for the
    model card (``training.history``: the evaluation report plots them). Kept in the resume
    checkpoint, so a resumed run's curves start at its first epoch."""

    def __init__(self):
        self.epochs: dict[int, dict] = {}

    def _row(self, trainer) -> dict:
        epoch = trainer.current_epoch + 1
        return self.epochs.setdefault(epoch, {"epoch": epoch, "train_loss": None, "val_loss": None,
                                              "val_miou": None})

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or pl_module.last_val is None:
            return
        row = self._row(trainer)
        row["val_miou"] = round(float(pl_module.last_val["miou"]), 5)
        val_loss = trainer.callback_metrics.get("val_loss")
        row["val_loss"] = round(float(val_loss), 5) if val_loss is not None else None

    def on_train_epoch_end(self, trainer, pl_module):
        loss = trainer.callback_metrics.get("train_loss_epoch")
        if loss is not None:
            self._row(trainer)["train_loss"] = round(float(loss), 5)

    def rows(self) -> list[dict]:
        return [self.epochs[e] for e in sorted(self.epochs)]

    def state_dict(self) -> dict:
        return {"history": json.dumps(self.rows())}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = {row["epoch"]: row for row in json.loads(state["history"])}


class KeepBest(L.Callback):
    """Keeps (in memory) the trained tensors of the epoch with the best validation mIoU, or of
    the last epoch when there is no validation.

    ``baseline`` (a run that continues from a trained model): the starting weights, scored by the
    validation pass Lightning runs before training (the "sanity check", then over the whole
    validation set), are epoch 0; an epoch must beat them to be kept, so continuing never
    returns a model worse on the validation labels than the one it started from."""

    def __init__(self, has_validation: bool, include_frozen: bool = False, baseline: bool = False,
                 reporter: Reporter | None = None):
        self.has_validation = has_validation
        self.include_frozen = include_frozen
        self.baseline = baseline
        self.reporter = reporter
        self.best_score = -1.0
        self.best_epoch = 0
        self.best_state: dict | None = None
        self.best_val: dict | None = None

    def _keep(self, trainer, pl_module, score, val, epoch: int | None = None):
        self.best_score = score
        self.best_epoch = trainer.current_epoch + 1 if epoch is None else epoch
        self.best_state = fp32_state(trainable_state_dict(pl_module.model, self.include_frozen))
        self.best_val = val

    def on_validation_end(self, trainer, pl_module):  # after the module's epoch-end hook
        if trainer.sanity_checking or pl_module.last_val is None:
            return
        score = pl_module.last_val["miou"]
        if score > self.best_score:
            self._keep(trainer, pl_module, score, pl_module.last_val)

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.has_validation:
            self._keep(trainer, pl_module, 0.0, None)

    def on_sanity_check_end(self, trainer, pl_module):
        # a resumed run has its kept best already (restored before this check): only a better score replaces it
        if self.baseline and pl_module.last_val is not None and pl_module.last_val["miou"] > self.best_score:
            self._keep(trainer, pl_module, pl_module.last_val["miou"], pl_module.last_val, epoch=0)
            if self.reporter is not None:
                self.reporter.info(f"the model training continues from scores validation mIoU "
                                   f"{self.best_score:.3f} on this run's validation labels: an epoch must beat it")

    # In the resume checkpoint: a resumed run keeps the best of all its epochs.
    def state_dict(self) -> dict:
        val = json.dumps(self.best_val, default=lambda o: o.item()) if self.best_val is not None else None
        return {"best_score": float(self.best_score), "best_epoch": int(self.best_epoch),
                "best_state": self.best_state, "best_val": val}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_state = state["best_state"]
        self.best_val = json.loads(state["best_val"]) if state["best_val"] is not None else None


class ResumeCheckpoints(L.Callback):
    """Writes the resume checkpoint (see ``engine.training.resume``) to ``path`` at the start of
    every epoch but the first, and makes a run resumed from it go on as if it had never stopped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.epochs_done: int | None = None  # of the checkpoint at ``path``
        self.step: int | None = None
        self._saving = False
        self._rng: dict | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.fit_loop.restarting:  # the first epoch of a resumed run
            if self._rng is not None:
                set_rng_state(self._rng)
                self._rng = None
            return
        if trainer.current_epoch == 0:
            return
        self._saving = True
        try:
            trainer.save_checkpoint(self.path)
        finally:
            self._saving = False
        self.epochs_done, self.step = trainer.current_epoch, trainer.global_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not self._saving:
            return
        checkpoint["geopeft_rng"] = rng_state()
        # Saved between epochs, the epoch loop's batch counters still hold the finished epoch.
        # Recorded as at its last batch's end instead, which Lightning resumes by starting the next
        # epoch afresh (its fit-loop counters say: the finished epoch is complete, validation,
        # epoch-end hooks and learning-rate step included).
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        progress["total"]["completed"] -= 1
        progress["current"]["completed"] -= 1
        progress["is_last_batch"] = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._rng = checkpoint.get("geopeft_rng")

    def on_train_epoch_end(self, trainer, pl_module):
        # Lightning skips the plateau schedule's step at the end of the first epoch after a
        # restart (it assumes the metrics it watches were lost with the process); here they
        # were computed in this epoch, so the step is taken as in an uninterrupted run.
        if trainer.fit_loop.restarting:
            trainer.fit_loop.epoch_loop.update_lr_schedulers("epoch", update_plateau_schedulers=True)

    def take(self) -> Path | None:
        """Moves the last checkpoint out of the working folder (a temporary file of its own)."""
        if self.epochs_done is None or not self.path.is_file():
            return None
        fd, name = tempfile.mkstemp(prefix="geopeft-resume-", suffix=".ckpt", dir=self.path.parent.parent)
        os.close(fd)
        os.replace(self.path, name)
        return Path(name)
