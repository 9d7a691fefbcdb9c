"""Segmentation metrics from a confusion matrix (rows: reference, columns: prediction).

Training fills the matrix with torchmetrics; ``evaluate`` fills it window by window with
``np.bincount`` (it reads whole rasters and must not need torch). Both derive every score here.
"""
from __future__ import annotations

import numpy as np


def confusion(reference: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion counts of class indices; pixels with a negative index on either side are skipped."""
    keep = (reference >= 0) & (prediction >= 0)
    idx = reference[keep].astype(np.int64) * num_classes + prediction[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray, class_names: list[str]) -> dict:
    """mIoU, pixel accuracy, per-class IoU/F1/precision/recall. Classes absent from both the
    reference and the prediction have no IoU and are left out of the mean."""
    m = np.asarray(matrix, np.float64)
    tp = np.diag(m)
    ref = m.sum(axis=1)
    pred = m.sum(axis=0)
    union = ref + pred - tp
    per_class = {}
    ious = []
    for i, name in enumerate(class_names):
        present = union[i] > 0
        iou = tp[i] / union[i] if present else None
        precision = tp[i] / pred[i] if pred[i] > 0 else None
        recall = tp[i] / ref[i] if ref[i] > 0 else None
        f1 = 2 * tp[i] / (ref[i] + pred[i]) if present else None
        per_class[name] = {"iou": iou, "f1": f1, "precision": precision, "recall": recall,
                           "pixels": int(ref[i])}
        if present:
            ious.append(iou)
    total = m.sum()
    return {
        "miou": float(np.mean(ious)) if ious else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "pixels": int(total),
        "per_class": per_class,
        "confusion_matrix": m.astype(np.int64).tolist(),
        "class_names": list(class_names),
    }


def format_table(result: dict) -> str:
    """A readable table of the scores and the confusion matrix."""
    names = result["class_names"]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'F1':>7}  {'pixels':>10}"]
    fmt = lambda v: f"{v:7.4f}" if v is not None else f"{'-':>7}"  # noqa: E731
    for name in names:
        pc = result["per_class"][name]
        lines.append(f"{name:<{width}}  {fmt(pc['iou'])}  {fmt(pc['f1'])}  {pc['pixels']:>10}")
    lines.append(f"{'mIoU':<{width}}  {result['miou']:7.4f}")
    lines.append(f"{'pixel acc.':<{width}}  {result['pixel_accuracy']:7.4f}")
    lines.append("")
    lines.append("confusion matrix (rows: reference, columns: prediction)")
    cw = max(10, *(len(n) for n in names))
    lines.append(" " * width + "  " + "  ".join(f"{n:>{cw}}" for n in names))
    for name, row in zip(names, result["confusion_matrix"]):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)
