"""``evaluate``: a predicted class raster against reference labels (raster or vector).

Reference labels are put on the prediction's grid with the same loader training uses (kept only
in the windows where they are); the prediction is read block by block and the confusion matrix
accumulated per block, so neither raster is ever whole in memory. Nodata and ignored pixels on
either side are excluded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from engine.data.labels import LABEL_BLOCK, load_labels, make_classes
from engine.data.rasters import Grid, atomic_output, block_cache, check_writable, open_raster
from engine.metrics import confusion, format_table, scores
from engine.protocol import EngineError, Reporter


def _index_of(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Position of each value in the sorted ``table``, -1 where absent."""
    pos = np.clip(np.searchsorted(table, values), 0, len(table) - 1)
    return np.where(table[pos] == values, pos, -1)


def evaluate(prediction: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike | None = None,
             label_field: str | None = None, ignore_index: int | None = None,
             reporter: Reporter | None = None) -> dict:
    reporter = reporter or Reporter("quiet")
    if out:
        for kind, given in (("the prediction", prediction), ("the labels", labels)):
            if Path(out).resolve() == Path(given).resolve():
                raise EngineError(f"--out {out} is {kind} ({Path(given).name}): writing the metrics there "
                                  "would destroy it", hint="give --out a new file name (e.g. metrics.json)")
        check_writable(out, "--out")
    with open_raster(prediction, "prediction") as ds, \
            block_cache(ds.width, 4 * LABEL_BLOCK, np.dtype(ds.dtypes[0]).itemsize):
        grid = Grid.of(ds)
        nodata = ds.nodata
        tagged = ds.tags().get("GEOPEFT_CLASSES")
        known = json.loads(tagged) if tagged else None
        reference = load_labels(labels, grid, label_field, ignore_index, known, reporter,
                                target=f"the prediction {Path(prediction).name}")
        ref_values = np.array([c["value"] for c in reference.classes])
        blocks = [w for _, w in ds.block_windows(1)]
        if known:  # a GeoPEFT prediction names its classes: no need to scan it first
            pred_values = {c["value"] for c in known}
        else:
            pred_values = set()
            for w in blocks:
                v = ds.read(1, window=w)
                pred_values.update(np.unique(v[v != nodata] if nodata is not None else v).tolist())
        classes = make_classes(set(ref_values.tolist()) | pred_values, (known or []) + reference.classes)
        table = np.array([c["value"] for c in classes])
        # reference indices → union indices
        ref_map = _index_of(ref_values, table)
        matrix = np.zeros((len(classes), len(classes)), np.int64)
        for n, w in enumerate(blocks):
            ref = reference.crop(w)
            if (ref >= 0).any():  # blocks without reference labels add nothing: not read
                v = ds.read(1, window=w)
                pred_idx = _index_of(v, table)
                if nodata is not None:
                    pred_idx[v == nodata] = -1
                ref_idx = np.where(ref >= 0, ref_map[np.maximum(ref, 0)], -1)
                matrix += confusion(ref_idx, pred_idx, len(classes))
            reporter.progress("evaluate", n + 1, len(blocks))
    result = scores(matrix, [c["name"] for c in classes])
    result["classes"] = classes
    result["prediction"] = str(prediction)
    result["labels"] = str(labels)
    reporter.metric("miou", result["miou"], "evaluate")
    reporter.metric("pixel_accuracy", result["pixel_accuracy"], "evaluate")
    for name, pc in result["per_class"].items():
        if pc["iou"] is not None:
            reporter.metric(f"iou/{name}", pc["iou"], "evaluate")
    if out:
        with atomic_output(out) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2))
        reporter.artifact("metrics", str(out))
    result["table"] = format_table(result)
    return result
