"""The Lightning system around a Segmentor: loss, optimiser, validation metrics, and the
callbacks that report progress through the protocol and keep the best trained tensors."""
from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from engine.metrics import scores
from engine.protocol import Reporter
from engine.tuning import trainable_state_dict


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
        if self.reporter.cancelled:
            trainer.should_stop = True

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


class KeepBest(L.Callback):
    """Keeps (in memory) the trained tensors of the epoch with the best validation mIoU, or of
    the last epoch when there is no validation."""

    def __init__(self, has_validation: bool, include_frozen: bool = False):
        self.has_validation = has_validation
        self.include_frozen = include_frozen
        self.best_score = -1.0
        self.best_epoch = 0
        self.best_state: dict | None = None
        self.best_val: dict | None = None

    def _keep(self, trainer, pl_module, score, val):
        self.best_score, self.best_epoch = score, trainer.current_epoch + 1
        self.best_state = trainable_state_dict(pl_module.model, self.include_frozen)
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
