"""Frames and metadata (issue 7): a -TL model trained on two dates with its temporal and location
encoders fed from the rasters' date tags and the scene centre; the card records them; prediction
and the ONNX export use them."""
from __future__ import annotations

import datetime as dt
import json

import engine.models  # noqa: F401 - torchvision fix before lightning
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from engine.data.metadata import acquisition_date, parse_date, scene_centre, scene_metadata
from engine.protocol import EngineError
from engine.training.train import TrainConfig, run_training

SIZE = 64


def _write(path, data, date: str | None = None):
    profile = {"driver": "GTiff", "width": SIZE, "height": SIZE, "count": data.shape[0], "dtype": data.dtype,
               "crs": "EPSG:32631", "transform": from_origin(500000, 4000000, 10, 10)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if date:
            dst.update_tags(TIFFTAG_DATETIME=date)
        dst.descriptions = tuple(["B02", "B03", "B04", "B8A", "B11", "B12"][:data.shape[0]])
    return path


def _two_dates(tmp_path):
    rng = np.random.default_rng(0)
    first = rng.normal(1000, 200, (6, SIZE, SIZE)).astype(np.float32)
    second = first + rng.normal(0, 50, first.shape).astype(np.float32)
    labels = (first[0] > 1000).astype(np.uint8)[None] + 1
    return (_write(tmp_path / "june.tif", first, "2021:06:01 10:30:00"),
            _write(tmp_path / "august.tif", second, "2021:08:15 10:30:00"),
            _write(tmp_path / "labels.tif", labels))


def test_dates_from_tags_and_the_scene_centre(tmp_path):
    june, august, labels = _two_dates(tmp_path)
    assert acquisition_date(june) == dt.date(2021, 6, 1)
    assert acquisition_date(labels) is None
    lat, lon = scene_centre(june)
    assert 36.0 < lat < 36.2 and 2.9 < lon < 3.1  # UTM 31N, 500 km east, 4000 km north
    meta = scene_metadata([str(june), str(august)], 2)
    assert meta["dates"] == ["2021-06-01", "2021-08-15"]
    assert meta["temporal"] == [[2021, 152], [2021, 227]]
    assert parse_date("20210815T103000") == dt.date(2021, 8, 15)
    with pytest.raises(EngineError, match="no acquisition date"):
        scene_metadata([str(labels)], 1)
    with pytest.raises(EngineError, match=r"1 date\(s\) for 2 frame"):
        scene_metadata([str(june)], 2, ["2021-06-01"])
    assert scene_metadata([str(june)], 2, ["2021-06-01", "2021-07-01"])["temporal"][1] == [2021, 182]


def test_a_tl_model_trains_on_two_dates_with_metadata_and_exports(tmp_path):
    june, august, labels = _two_dates(tmp_path)
    cfg = TrainConfig(images=[str(june), str(august)], labels=str(labels), out=str(tmp_path / "model"),
                      backbone="prithvi_eo_v2_tiny", weights="none", chip_size=32, epochs=1, batch_size=2,
                      chips_per_epoch=4, frames=2, metadata=True, val_fraction=0.0)
    run_training(cfg)
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["input"]["frames"] == 2 and len(card["input"]["bands"]) == 12
    assert card["input"]["metadata"]["temporal"] == [[2021, 152], [2021, 227]]

    from engine.inference.runners import load_trained_model
    from engine.protocol import Reporter
    model = load_trained_model(card, tmp_path / "model", Reporter("quiet")).eval()
    encoder = model.encoder
    assert encoder.num_frames == 2 and encoder.has_metadata and encoder.coords is not None
    x = torch.randn(1, 12, 32, 32)
    with torch.no_grad():
        with_meta = model(x)
        coords, encoder.coords = encoder.coords, None
        without = model(x)
        encoder.coords = coords
    assert not torch.allclose(with_meta, without)  # the dates and place change the prediction

    from engine.export import export_onnx
    onnx_path = tmp_path / "model.onnx"
    export_onnx(tmp_path / "model", onnx_path)
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(out, torch.softmax(with_meta, 1).numpy(), atol=1e-4)


def test_metadata_needs_a_tl_backbone_and_frames_must_divide_the_bands(tmp_path):
    june, august, labels = _two_dates(tmp_path)
    base = dict(labels=str(labels), out=str(tmp_path / "m"), weights="none", chip_size=32, epochs=1)
    with pytest.raises(EngineError, match="no temporal/location encoders"):
        run_training(TrainConfig(images=[str(june)], backbone="prithvi_eo_v2_300", metadata=True, **base))
    with pytest.raises(EngineError, match="cannot be 4 frames"):
        run_training(TrainConfig(images=[str(june)], backbone="prithvi_eo_v2_tiny", frames=4, **base))
