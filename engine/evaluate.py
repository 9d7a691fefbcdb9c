"""``evaluate``: a predicted class raster against reference labels (raster or vector).

Reference labels are put on the prediction's grid with the same loader training uses (kept only
in the windows where they are); the prediction is read block by block and the confusion matrix
accumulated per block, so neither raster is ever whole in memory. Nodata and ignored pixels on
either side are excluded.

``report``: also an HTML report (engine.report: charts, class areas, the model's training curves),
for which every block of the prediction is read to count each class over the whole raster.
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


def _area_unit(crs) -> str | None:
    """The CRS's linear unit ('metre', 'degree', …), None without a CRS."""
    if crs is None:
        return None
    try:
        return crs.units_factor[0]
    except Exception:  # noqa: BLE001 - a CRS whose unit pyproj cannot tell
        return None


def evaluate(prediction: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike | None = None,
             label_field: str | None = None, ignore_index: int | None = None,
             reporter: Reporter | None = None, report: str | os.PathLike | None = None,
             model: str | os.PathLike | None = None) -> dict:
    """``report``: also write an HTML report (engine.report); ``model``: the model whose card gives
    its training curves (default: the model the prediction's GEOPEFT_MODEL tag names)."""
    reporter = reporter or Reporter("quiet")
    if model and not report:
        raise EngineError("--model only names the model whose training curves --report shows",
                          hint="add --report report.html, or leave out --model")
    outputs = [("--out", "the metrics", out), ("--report", "the report", report)]
    for option, what, path in outputs:
        if not path:
            continue
        for kind, given in (("the prediction", prediction), ("the labels", labels)):
            if Path(path).resolve() == Path(given).resolve():
                raise EngineError(f"{option} {path} is {kind} ({Path(given).name}): writing {what} there "
                                  "would destroy it", hint=f"give {option} a new file name "
                                  f"(e.g. {'metrics.json' if option == '--out' else 'report.html'})")
        check_writable(path, option)
    if out and report and Path(out).resolve() == Path(report).resolve():
        raise EngineError(f"--out and --report are the same file ({out})",
                          hint="give the metrics (JSON) and the report (HTML) different names")
    if report:
        from engine.report import require_matplotlib
        require_matplotlib()  # before the work, not after it
    with open_raster(prediction, "prediction") as ds, \
            block_cache(ds.width, 4 * LABEL_BLOCK, np.dtype(ds.dtypes[0]).itemsize):
        grid = Grid.of(ds)
        nodata = ds.nodata
        tagged = ds.tags().get("GEOPEFT_CLASSES")
        if report:  # the card of the model for its training curves: --model, or the one predict tagged
            from engine.report import find_model_card
            card, card_source = find_model_card(model, ds.tags().get("GEOPEFT_MODEL"), prediction, reporter)
        known = json.loads(tagged) if tagged else None
        reference = load_labels(labels, grid, label_field, ignore_index, known, reporter,
                                target=f"the prediction {Path(prediction).name}")
        ref_values = np.array([c["value"] for c in reference.classes])
        blocks = [w for _, w in ds.block_windows(1)]
        # the report's predicted area per class counts every valid pixel of the prediction
        scanned: dict[int, int] | None = None
        if known:  # a GeoPEFT prediction names its classes: no need to scan it first
            pred_values = {c["value"] for c in known}
        else:
            scanned = {}
            for w in blocks:
                v = ds.read(1, window=w)
                found, counts = np.unique(v[v != nodata] if nodata is not None else v, return_counts=True)
                for value, count in zip(found.tolist(), counts.tolist()):
                    scanned[value] = scanned.get(value, 0) + count
            pred_values = set(scanned)
        classes = make_classes(set(ref_values.tolist()) | pred_values, (known or []) + reference.classes)
        table = np.array([c["value"] for c in classes])
        # reference indices → union indices
        ref_map = _index_of(ref_values, table)
        matrix = np.zeros((len(classes), len(classes)), np.int64)
        count_all = bool(report) and scanned is None  # a report needs every block's classes counted
        predicted = np.zeros(len(classes), np.int64)
        for n, w in enumerate(blocks):
            ref = reference.crop(w)
            labelled = (ref >= 0).any()
            if labelled or count_all:  # blocks without reference labels add nothing: not read
                v = ds.read(1, window=w)
                pred_idx = _index_of(v, table)
                if nodata is not None:
                    pred_idx[v == nodata] = -1
                if count_all:
                    predicted += np.bincount(pred_idx[pred_idx >= 0], minlength=len(classes))
                if labelled:
                    ref_idx = np.where(ref >= 0, ref_map[np.maximum(ref, 0)], -1)
                    matrix += confusion(ref_idx, pred_idx, len(classes))
            reporter.progress("evaluate", n + 1, len(blocks))
        if scanned is not None:
            predicted = np.array([scanned.get(int(value), 0) for value in table], np.int64)
        t = grid.transform
        pixel_area = abs(t.a * t.e - t.b * t.d)
        unit = _area_unit(grid.crs)
    result = scores(matrix, [c["name"] for c in classes])
    result["classes"] = classes
    result["prediction"] = str(prediction)
    result["labels"] = str(labels)
    # class areas: pixel area (CRS units², unit named) and, where every block was read, the
    # predicted pixels per class over the whole raster (nodata left out)
    result["pixel_area"] = pixel_area
    result["area_unit"] = unit
    if count_all or scanned is not None:
        result["predicted_pixels"] = {c["name"]: int(k) for c, k in zip(classes, predicted)}
    reporter.metric("miou", result["miou"], "evaluate")
    reporter.metric("pixel_accuracy", result["pixel_accuracy"], "evaluate")
    for name, pc in result["per_class"].items():
        if pc["iou"] is not None:
            reporter.metric(f"iou/{name}", pc["iou"], "evaluate")
    if out:
        with atomic_output(out) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2))
        reporter.artifact("metrics", str(out))
    if report:
        from engine.report import write_report
        write_report(result, report, card, reporter, card_source=card_source)
        reporter.artifact("report", str(report))
        result["report"] = str(report)
    result["table"] = format_table(result)
    return result
