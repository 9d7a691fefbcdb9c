"""What training saves is what it trained and scored: fresh band columns survive a reload, the
kept epoch is really the best one, the validation is honest, and the loss and schedule do what
they claim. Each test failed on the engine before the fix it guards."""
from __future__ import annotations

import copy

import engine.models  # noqa: F401 - torchvision fix before lightning/torchmetrics load it
import lightning as L
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from engine.data.chips import crop_positions, grow, training_split
from engine.inference.runners import load_trained_model
from engine.models.registry import get_backbone_spec
from engine.models.segmentor import build_segmentor
from engine.protocol import Reporter
from engine.training.data import ChipDataModule
from engine.training.task import KeepBest, SegmentationTask
from engine.training.train import TrainConfig, choose_method_and_lr, prepare_data, run_training
from engine.tuning import METHODS, TuningConfig, apply_tuning
from tests.conftest import REPO, make_prithvi_checkpoint

SIZE, CHIP = 96, 32


def _write(path, data, **extra):
    profile = {"driver": "GTiff", "width": data.shape[-1], "height": data.shape[-2], "count": data.shape[0],
               "dtype": data.dtype, "crs": "EPSG:32631", "transform": from_origin(500000, 4000000, 10, 10), **extra}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _scene(tmp_path, invert_validation: bool = False):
    """A 4-band raster with no band names (so no band matches the pretrained ones) and 0/1
    labels that follow band 1. ``invert_validation``: the labels in the blocks validation will
    hold out say the opposite, so the validation score can only fall as training fits."""
    rng = np.random.default_rng(0)
    image = rng.normal(1000, 200, (4, SIZE, SIZE)).astype(np.float32)
    truth = (image[0] > 1000).astype(np.int16)
    if invert_validation:
        _, val = training_split(np.zeros((SIZE, SIZE), np.int16), CHIP, 0.2, seed=0)
        truth = np.where(val >= 0, 1 - truth, truth).astype(np.int16)
    return _write(tmp_path / "image.tif", image), _write(tmp_path / "labels.tif", truth[None])


class Snapshots(L.Callback):
    """Full copies of the model's tensors at each epoch the engine keeps, and at the end."""

    def __init__(self):
        self.kept, self.final = None, None

    def _snap_if_kept(self, trainer, pl_module):
        keep = next((c for c in trainer.callbacks if isinstance(c, KeepBest)), None)
        if keep and keep.best_epoch == trainer.current_epoch + 1:
            self.kept = copy.deepcopy(pl_module.model.state_dict())

    on_validation_end = on_train_epoch_end = _snap_if_kept

    def on_fit_end(self, trainer, pl_module):
        self.final = copy.deepcopy(pl_module.model.state_dict())


@pytest.fixture
def snapshots(monkeypatch):
    """Adds ``Snapshots`` to the engine's trainer (the engine itself is unchanged)."""
    snap = Snapshots()
    real = L.Trainer.__init__

    def init(self, *args, callbacks=(), **kwargs):
        real(self, *args, callbacks=[*callbacks, snap], **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", init)
    return snap


def _config(tmp_path, image, labels, **kw):
    return TrainConfig(images=[str(image)], labels=str(labels), out=str(tmp_path / "model"), chip_size=CHIP,
                       batch_size=4, precision="32", chips_per_epoch=16, **kw)


def test_fresh_band_columns_are_trained_saved_and_reloaded_bit_for_bit(tmp_path, snapshots, monkeypatch):
    """Defect 1: LoRA froze the patch embedding, so the fresh columns of a 4-band raster were
    neither trained nor saved, and each reload drew other random ones. Before the fix the
    reloaded patch embedding differed from the trained one (and from reload to reload)."""
    image, labels = _scene(tmp_path)
    weights = make_prithvi_checkpoint(tmp_path / "Prithvi_EO_V2_tiny_TL.pt")
    monkeypatch.chdir(tmp_path)  # --weights as a user types it: relative to where they are
    summary = run_training(_config(tmp_path, image, labels, weights="Prithvi_EO_V2_tiny_TL.pt", epochs=2,
                                   val_fraction=0.0, tuning=TuningConfig("lora")))
    from engine.card import read_card
    card, folder = read_card(summary["out"])
    assert card["backbone"]["weights"]["path"] == str(weights.resolve())  # absolute, not as typed
    assert card["backbone"]["weights"]["fresh_bands"] == ["band 1", "band 2", "band 3", "band 4"]
    assert card["tuning"]["patch_embed"] is True
    trained = snapshots.kept
    monkeypatch.chdir(REPO)
    for seed in (1, 2):  # two loading processes in different random states
        torch.manual_seed(seed)
        model = load_trained_model(card, folder, Reporter("quiet")).eval()
        reloaded = model.state_dict()
        assert reloaded.keys() == trained.keys()
        different = [k for k in trained if not torch.equal(trained[k], reloaded[k])]
        assert not different, different[:5]
    in_memory = build_segmentor(get_backbone_spec("prithvi_eo_v2_tiny"), 4, CHIP, 2, card["decoder"])
    apply_tuning(in_memory, TuningConfig(**card["tuning"]))
    in_memory.load_state_dict(trained)
    x = torch.randn(2, 4, CHIP, CHIP)
    with torch.inference_mode():
        assert torch.equal(in_memory.eval()(x), model(x))


def test_the_kept_epoch_is_the_best_one_and_reproduces_its_score(tmp_path, snapshots):
    """Defect 2: on the CPU the "best" state shared storage with the live parameters, so the
    optimiser overwrote it and the last epoch's weights were saved under the best epoch's score.
    Here validation labels contradict training ones, so the score falls as training fits:
    the best epoch is an early one. Before the fix the saved weights were the final ones."""
    image, labels = _scene(tmp_path, invert_validation=True)
    cfg = _config(tmp_path, image, labels, weights="none", epochs=5, lr=3e-3, tuning=TuningConfig("full"))
    summary = run_training(cfg)
    from engine.card import read_card
    card, folder = read_card(summary["out"])
    assert card["training"]["best_epoch"] < card["training"]["epochs"] == 5
    model = load_trained_model(card, folder, Reporter("quiet"))
    saved = model.state_dict()
    assert any(not torch.equal(saved[k], snapshots.final[k]) for k in saved if saved[k].is_floating_point())
    assert all(torch.equal(saved[k], snapshots.kept[k]) for k in saved)
    # The reloaded model scores on the validation chips exactly what the card reports.
    data = prepare_data(cfg, get_backbone_spec(cfg.backbone), Reporter("quiet"))
    task = SegmentationTask(model, [c["name"] for c in data.classes], cfg.lr)
    L.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_progress_bar=False,
              enable_model_summary=False).validate(task, datamodule=ChipDataModule(data.train_set, data.val_set, 4))
    assert task.last_val["miou"] == pytest.approx(card["training"]["best_val_miou"], abs=1e-9)


def test_validation_blocks_are_kept_half_a_chip_from_training_labels_and_chips():
    """Defect 6: training chips used to cover validation blocks and training labels touched
    them, so the validation score of a few small polygons was not honest."""
    index = np.zeros((256, 256), np.int16)
    index[::7] = 1
    train, val = training_split(index, 32, 0.2, seed=3)
    assert (val >= 0).any() and (train >= 0).any()
    assert not ((train >= 0) & grow(val >= 0, 15)).any()  # ≥ half a chip (16 px) apart
    positions = crop_positions(train, val, 32, 2)
    assert len(positions)
    for r, c in positions:
        assert not (val[r:r + 32, c:c + 32] >= 0).any()
        assert (train[r:r + 32, c:c + 32] >= 0).any()


def test_a_batch_without_labels_gives_zero_loss_not_nan():
    """Defect 6: cross-entropy's mean over no labelled pixel is NaN, which poisoned training."""
    task = SegmentationTask(torch.nn.Identity(), ["a", "b"], 1e-3, class_weights=[0.5, 1.5])
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    loss = task.loss(logits, torch.full((2, 8, 8), -1))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and not logits.grad.any()
    y = torch.randint(0, 2, (2, 8, 8))
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([0.5, 1.5]))
    assert task.loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_learning_rate_schedule_watches_the_validation_score():
    """Defect 6: the schedule claimed to follow validation but watched the training loss."""
    model = torch.nn.Conv2d(1, 2, 1)
    with_val = SegmentationTask(model, ["a", "b"], 1e-3).configure_optimizers()["lr_scheduler"]
    assert with_val["monitor"] == "val_miou" and with_val["scheduler"].mode == "max"
    no_val = SegmentationTask(model, ["a", "b"], 1e-3, monitor="train_loss_epoch").configure_optimizers()
    assert no_val["lr_scheduler"]["monitor"] == "train_loss_epoch" and no_val["lr_scheduler"]["scheduler"].mode == "min"


def test_linear_probe_trains_a_light_head_on_a_frozen_encoder(tmp_path):
    """Defect 6: linear-probe used to train a full UNet with an image stem."""
    image, labels = _scene(tmp_path)
    weights = make_prithvi_checkpoint(tmp_path / "w.pt")
    summary = run_training(_config(tmp_path, image, labels, weights=str(weights), epochs=1,
                                   band_names=["BLUE", "GREEN", "RED", "NIR_NARROW"],
                                   tuning=TuningConfig("linear-probe")))
    from engine.card import read_card
    card, _ = read_card(summary["out"])
    assert card["decoder"] == "linear" and card["tuning"]["patch_embed"] is False
    params = card["training"]["parameters"]
    assert params["trainable"] == 2 * (192 + 1)  # one 1×1 convolution: 192 features → 2 classes


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_learning_rate_on_a_pretrained_backbone(method):
    """A new method without one failed only when a user trained it on published weights."""
    chosen, lr = choose_method_and_lr(method, None, pretrained=True, reporter=Reporter("quiet"))
    assert chosen == method and 0 < lr <= 1e-3
