"""``evaluate --report``: one self-contained HTML page of an evaluation.

The page holds the scores (mIoU, pixel accuracy, per-class IoU/F1/precision/recall), a bar
chart of per-class IoU and F1, the confusion matrix as a heat map (rows: reference, columns:
prediction; colour: share of the reference row, counts written in the cells), the area of each
class in the reference and in the prediction, and, when the model card holds them, the
training curves (``card["training"]["history"]``). Charts are PNG images embedded as base64
``data:`` URIs: the file can be mailed or archived alone.

matplotlib is imported here only, and only when a report is written (``Figure`` objects, never
pyplot's global state, so no GUI backend is ever touched).
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
import re
import warnings
from pathlib import Path

from engine.protocol import EngineError, Reporter

MISSING = "–"  # a score that does not exist (class absent from reference and prediction)
_HEX_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
_UNIT_SYMBOLS = {"metre": "m", "meter": "m", "foot": "ft", "US survey foot": "US survey ft",
                 "degree": "°"}


def require_matplotlib() -> None:
    """Refuse a report, before any work, where matplotlib is not installed."""
    try:
        with warnings.catch_warnings():  # a stray system mpl_toolkits breaks only 3D axes, unused here
            warnings.filterwarnings("ignore", message="Unable to import Axes3D")
            import matplotlib  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise EngineError(f"--report needs matplotlib, which this engine's Python cannot import ({exc})",
                          hint="install it into the engine's environment (pip install 'matplotlib>=3.7'), "
                               "or run the plugin's 'Set up engine' again; or leave out --report") from None


# -- the model card (for the training curves) -------------------------------------------------
def _onnx_card(path: Path) -> dict:
    from engine.card import card_from_onnx_metadata

    try:
        import onnx
    except ImportError:
        raise EngineError(f"reading the model card of {path.name} needs the onnx package",
                          hint="pass the trained model folder (or its card.json) instead") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure: not an ONNX file
        raise EngineError(f"{path.name} is not a readable ONNX file ({exc})",
                          hint="pass the model folder, its card.json or the .onnx file 'export' wrote") from None
    return card_from_onnx_metadata({p.key: p.value for p in model.metadata_props}, path.name)


def read_model_card(model: str | os.PathLike) -> tuple[dict, str]:
    """(card, where it was read) from a model folder, its card.json, or an exported .onnx file."""
    from engine.card import CARD_FILE, read_card

    path = Path(model)
    if path.suffix.lower() == ".onnx" and path.is_file():
        return _onnx_card(path), str(path)
    card, folder = read_card(path)
    return card, str(folder / CARD_FILE)


def find_model_card(model: str | os.PathLike | None, tagged: str | None, prediction: str | os.PathLike,
                    reporter: Reporter) -> tuple[dict | None, str | None]:
    """The card whose training curves the report shows: ``model`` (--model; a card that cannot be
    read is an error), else the model the prediction names (its GEOPEFT_MODEL tag, as given to
    predict: tried as it is, then beside the prediction when relative). A tagged model that is
    gone or unreadable only costs the curves (said in the log)."""
    if model:
        return read_model_card(model)
    if not tagged:
        reporter.info("the prediction names no model (and no --model was given): the report has no "
                      "training curves")
        return None, None
    candidates = [Path(tagged)]
    if not Path(tagged).is_absolute():
        candidates.append(Path(prediction).parent / tagged)
    for path in candidates:
        if path.is_file() or (path / "card.json").is_file():
            try:
                return read_model_card(path)
            except EngineError as exc:
                reporter.warning(f"the model the prediction names ({tagged}) has an unreadable card: "
                                 f"{exc.message}. The report has no training curves")
                return None, None
    reporter.info(f"the model the prediction names ({tagged}) is not found: the report has no training "
                  "curves (pass --model to name it)")
    return None, None


# -- formatting (the tests format the JSON metrics with these to find them in the page) --------
def fmt_score(value) -> str:
    """A score in [0, 1] as the report prints it."""
    return MISSING if value is None else f"{value:.4f}"


def fmt_count(value) -> str:
    return MISSING if value is None else f"{int(value):,}"


def fmt_area(value) -> str:
    return MISSING if value is None else f"{value:,.2f}"


def area_unit(unit: str | None) -> str:
    """The area unit of a CRS linear unit: 'metre' -> 'm²'."""
    if not unit:
        return "pixel units²"
    return f"{_UNIT_SYMBOLS.get(unit, unit)}²"


# -- charts -------------------------------------------------------------------------------------
def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _colour(c: dict, default: str) -> str:
    colour = c.get("colour") if isinstance(c, dict) else None
    return colour if isinstance(colour, str) and _HEX_COLOUR.match(colour) else default


def scores_chart(result: dict) -> str:
    """Per-class IoU and F1 as grouped bars (base64 PNG)."""
    from matplotlib.figure import Figure

    names = result["class_names"]
    per_class = result["per_class"]
    n = len(names)
    fig = Figure(figsize=(max(5.0, 0.9 * n + 2), 3.6))
    ax = fig.add_subplot()
    xs = list(range(n))
    width = 0.38
    for offset, key, label, colour in ((-width / 2, "iou", "IoU", "#1f78b4"),
                                       (width / 2, "f1", "F1", "#ff7f00")):
        values = [per_class[name][key] for name in names]
        bars = ax.bar([x + offset for x in xs], [v or 0.0 for v in values], width, label=label, color=colour)
        for bar, value in zip(bars, values):
            ax.annotate(MISSING if value is None else f"{value:.2f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=30 if n > 5 else 0, ha="right" if n > 5 else "center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.set_title(f"Per-class IoU and F1 (mIoU {result['miou']:.3f})")
    ax.axhline(result["miou"], color="#555555", linestyle="--", linewidth=0.8, label="mIoU")
    ax.legend(loc="upper right", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def confusion_chart(result: dict) -> str:
    """The confusion matrix as a heat map: colour = share of the reference row, cells = counts."""
    import numpy as np
    from matplotlib.figure import Figure

    names = result["class_names"]
    counts = np.asarray(result["confusion_matrix"], dtype=np.int64).reshape(len(names), len(names))
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, np.float64), where=rows > 0)
    n = len(names)
    side = max(4.0, 0.75 * n + 2.5)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    colourbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colourbar.set_label("share of the reference class (row)")
    size = max(5, min(10, int(60 / max(n, 1))))
    for r in range(n):
        for c in range(n):
            ax.text(c, r, f"{counts[r, c]:,}", ha="center", va="center", fontsize=size,
                    color="white" if share[r, c] > 0.5 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticklabels(names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    ax.set_title("Confusion matrix (pixels)")
    return _png(fig)


def history_rows(card: dict | None) -> list[dict]:
    """The epochs of ``card["training"]["history"]`` that are well formed, in epoch order."""
    training = (card or {}).get("training") or {}
    history = training.get("history") if isinstance(training, dict) else None
    rows = []
    for row in history if isinstance(history, list) else []:
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
            rows.append(row)
    return sorted(rows, key=lambda r: r["epoch"])


def _number(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else float("nan")


def curves_chart(rows: list[dict], best_epoch=None) -> str:
    """Training and validation loss, and validation mIoU, per epoch (base64 PNG)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(9.5, 3.4))
    loss, miou = fig.subplots(1, 2)
    for key, label, colour in (("train_loss", "training loss", "#1f78b4"),
                               ("val_loss", "validation loss", "#e31a1c")):
        values = [_number(r.get(key)) for r in rows]
        if any(not math.isnan(v) for v in values):
            loss.plot(epochs, values, marker="o", markersize=3, label=label, color=colour)
    loss.set_xlabel("epoch")
    loss.set_ylabel("loss")
    loss.set_title("Loss")
    if loss.get_legend_handles_labels()[0]:
        loss.legend(fontsize=8)
    values = [_number(r.get("val_miou")) for r in rows]
    if any(not math.isnan(v) for v in values):
        miou.plot(epochs, values, marker="o", markersize=3, color="#33a02c", label="validation mIoU")
    if isinstance(best_epoch, int) and best_epoch in epochs:
        miou.axvline(best_epoch, color="#555555", linestyle="--", linewidth=0.8, label=f"kept (epoch {best_epoch})")
    miou.set_xlabel("epoch")
    miou.set_ylabel("mIoU")
    miou.set_ylim(0, 1)
    miou.set_title("Validation mIoU")
    if miou.get_legend_handles_labels()[0]:
        miou.legend(fontsize=8)
    for ax in (loss, miou):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# -- HTML ---------------------------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(table_id: str, header: list[str] | None, rows: list[list[str]], caption: str | None = None,
           css_class: str | None = None) -> str:
    """A table whose first column names the rows; every cell's text is escaped here."""
    out = [f'<table id="{_e(table_id)}"' + (f' class="{_e(css_class)}">' if css_class else ">")]
    if caption:
        out.append(f"<caption>{_e(caption)}</caption>")
    if header:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            tag = "th" if i == 0 else "td"
            cells.append(f"<{tag}>{_e(cell)}</{tag}>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _image(data: str, alt: str, image_id: str) -> str:
    return f'<img id="{_e(image_id)}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _area_rows(result: dict) -> tuple[list[str], list[list[str]], str]:
    names = result["class_names"]
    unit = area_unit(result.get("area_unit"))
    pixel_area = result.get("pixel_area")
    matrix = result["confusion_matrix"]
    in_labels = [sum(row[j] for row in matrix) for j in range(len(names))]
    whole = result.get("predicted_pixels")

    def area(pixels):
        return fmt_area(pixels * pixel_area) if pixels is not None and pixel_area else MISSING

    header = ["class", "reference pixels", f"reference area ({unit})",
              "predicted pixels, within the reference", f"predicted area, within the reference ({unit})",
              "predicted pixels, whole raster", f"predicted area, whole raster ({unit})"]
    rows = []
    for j, name in enumerate(names):
        ref = result["per_class"][name]["pixels"]
        total = whole.get(name) if isinstance(whole, dict) else None
        rows.append([name, fmt_count(ref), area(ref), fmt_count(in_labels[j]), area(in_labels[j]),
                     fmt_count(total), area(total)])
    note = ("Reference: the labelled pixels scored (where the prediction has a class). "
            "Predicted, within the reference: the prediction on those same pixels (the confusion "
            "matrix's column sums). Predicted, whole raster: every pixel of the prediction that is "
            "not nodata. Areas: pixels × the prediction's pixel area"
            + (f" ({fmt_area(pixel_area)} {unit})." if pixel_area else "."))
    return header, rows, note


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f2f2f2; } tbody th { text-align: left; font-weight: normal; }
caption { caption-side: bottom; text-align: left; font-size: 0.85em; color: #555; padding-top: 0.4em; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
.meta td { text-align: left; } .note { color: #555; font-size: 0.9em; }
"""


def render_html(result: dict, card: dict | None, card_source: str | None = None) -> str:
    """The page (charts drawn here, with matplotlib)."""
    from engine import __version__

    names = result["class_names"]
    per_class = result["per_class"]
    meta = [["prediction", str(result.get("prediction", MISSING))],
            ["reference labels", str(result.get("labels", MISSING))],
            ["model card", card_source or "none found"],
            ["written", datetime.datetime.now().astimezone().isoformat(timespec="seconds")],
            ["GeoPEFT engine", __version__]]
    summary = [["mIoU", fmt_score(result["miou"])],
               ["pixel accuracy", fmt_score(result["pixel_accuracy"])],
               ["pixels scored", fmt_count(result["pixels"])]]
    classes = [[name, fmt_score(per_class[name]["iou"]), fmt_score(per_class[name]["f1"]),
                fmt_score(per_class[name]["precision"]), fmt_score(per_class[name]["recall"]),
                fmt_count(per_class[name]["pixels"])] for name in names]
    area_header, area_rows, area_note = _area_rows(result)
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e('GeoPEFT evaluation — ' + Path(str(result.get('prediction', ''))).name)}</title>",
        f"<style>{_STYLE}</style>", "</head>", "<body>",
        "<h1>GeoPEFT evaluation report</h1>",
        _table("meta", None, meta, css_class="meta"),
        "<h2>Scores</h2>",
        _table("summary", ["score", "value"], summary,
               caption="mIoU: the mean IoU of the classes present in the reference or the prediction."),
        _table("per-class", ["class", "IoU", "F1", "precision", "recall", "reference pixels"], classes,
               caption=f"{MISSING}: the class is in neither the reference nor the prediction (IoU, F1), "
                       "or not predicted (precision), or not in the reference (recall)."),
        _image(scores_chart(result), "per-class IoU and F1", "scores-chart"),
        "<h2>Confusion matrix</h2>",
        '<p class="note">Rows: reference class; columns: predicted class. Each cell gives the number of '
        "pixels; its colour is the share of its row (the reference class), so the diagonal shows each "
        "class's recall.</p>",
        _image(confusion_chart(result), "confusion matrix", "confusion-chart"),
        "<h2>Class areas</h2>",
        _table("areas", area_header, area_rows, caption=area_note),
        "<h2>Training curves</h2>",
    ]
    rows = history_rows(card)
    if rows:
        training = card.get("training") or {}
        parts.append(_image(curves_chart(rows, training.get("best_epoch")), "training curves", "curves-chart"))
        parts.append(f'<p class="note">{_e(len(rows))} epochs, from the model card'
                     + (f"; the weights of epoch {_e(training['best_epoch'])} were kept"
                        if isinstance(training.get("best_epoch"), int) else "") + ".</p>")
    elif card is not None:
        parts.append('<p class="note" id="no-curves">The model card holds no training curves (it was '
                     "written before GeoPEFT recorded them, or training stopped before the first epoch "
                     "ended).</p>")
    else:
        parts.append('<p class="note" id="no-curves">No model card was found, so there are no training '
                     "curves: pass the model with --model (its folder or card.json).</p>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(result: dict, out_html: str | os.PathLike, card: dict | None = None,
                 reporter: Reporter | None = None, card_source: str | None = None) -> Path:
    """Write the report of ``result`` (engine.evaluate's dict) to ``out_html``, atomically."""
    from engine.data.rasters import atomic_output

    require_matplotlib()
    if card is not None and not history_rows(card):
        (reporter or Reporter("quiet")).info(f"the model card {card_source or ''} holds no training curves: "
                                             "the report says so")
    page = render_html(result, card, card_source)
    out = Path(out_html)
    with atomic_output(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return out
