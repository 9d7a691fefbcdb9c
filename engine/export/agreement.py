"""How far a reduced-precision copy of the exported model (``--quantize int8``, ``--fp16``) is from
the fp32 ONNX model it was made from, and the refusal below ``MIN_ARGMAX_AGREEMENT``.

Both are run through onnxruntime's CPU provider on the same chips: ``CHIPS`` chips read at random
from the training images named in the card (normalised as ``predict`` does) when they are still
readable, else random normal values, i.e. inputs at the training mean ± a few std.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.inference.runners import cpu_count
from engine.protocol import EngineError, Reporter

MIN_ARGMAX_AGREEMENT = 0.98
CHIPS = 16
BATCH = 4


def sample_chips(card: dict, count: int = CHIPS, seed: int = 0) -> tuple[np.ndarray, str]:
    """(chips float32 [N, bands, s, s] normalised as predict does, source): ``training`` chips read at
    random from the card's training images when they can be opened, else ``random`` normal values."""
    from rasterio.windows import Window

    from engine.data.chips import normalise
    from engine.data.rasters import RasterStack

    bands, size = card["input"]["bands"], int(card["chip_size"])
    rng = np.random.default_rng(seed)
    images = (card.get("training") or {}).get("images") or []
    if images and all(Path(p).is_file() for p in images):
        try:
            with RasterStack(images, bands) as stack:
                h, w = stack.grid.height, stack.grid.width
                chips = []
                for _ in range(count * 4):  # chips mostly nodata are skipped
                    r, c = int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))
                    data, valid = stack.read(Window(c, r, size, size))
                    if valid.mean() >= 0.5:
                        chips.append(normalise(data, valid, card["input"]["mean"], card["input"]["std"]))
                    if len(chips) == count:
                        return np.stack(chips), "training"
        except EngineError:
            pass  # the images changed since training: fall back to random chips
    shape = (count, len(bands), size, size)
    return rng.standard_normal(shape).astype(np.float32), "random"


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_count()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, chips: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: chips[i:i + BATCH]})[0] for i in range(0, len(chips), BATCH)])


def agreement(reference: Path, candidate: Path, chips: np.ndarray) -> dict:
    """Max absolute probability difference and the fraction of pixels with the same argmax class."""
    ref = _run(_session(reference), chips)
    out = _run(_session(candidate), chips).astype(np.float32)
    return {"max_prob_diff": float(np.abs(ref - out).max()),
            "argmax_agreement": float((ref.argmax(axis=1) == out.argmax(axis=1)).mean())}


def compare(fp32: Path, candidate: Path, chips: np.ndarray, source: str, reporter: Reporter, what: str) -> dict:
    """``chips`` (their source), ``num_chips`` and the agreement of ``candidate`` (the ``what``
    model: ``int8``, ``fp16``) with ``fp32`` on ``chips`` (from ``sample_chips``)."""
    if source != "training":
        reporter.info(f"the training images named in the model card are not readable: the {what} model is "
                      "compared with fp32 on random chips (values at the training mean ± a few std)")
    return {"chips": source, "num_chips": len(chips), **agreement(fp32, candidate, chips)}


def check_agreement(result: dict, label: str, force: bool, reporter: Reporter, without: str) -> None:
    """Report ``result`` (from ``compare``) for the ``label`` model; below ``MIN_ARGMAX_AGREEMENT``
    refuse (nothing is written yet), or warn with ``force``. ``without``: the option to drop for fp32."""
    text = (f"{label} vs fp32 ONNX on {result['num_chips']} {result['chips']} chips: "
            f"{result['argmax_agreement']:.2%} of pixels with the same class, max probability difference "
            f"{result['max_prob_diff']:.2e}")
    if result["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT:
        reporter.info(text)
        return
    if not force:
        raise EngineError(f"{text}: below {MIN_ARGMAX_AGREEMENT:.0%}; nothing written",
                          hint=f"export without {without} (fp32), or pass --force to keep the {label} model anyway")
    reporter.warning(f"{text}: below {MIN_ARGMAX_AGREEMENT:.0%}; written anyway (--force)")
