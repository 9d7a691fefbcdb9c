"""``export``: merge the adapters into the backbone and write an ONNX model that predicts with
onnxruntime alone; the model card travels in the ONNX metadata.

A model too large for one protobuf (2 GB; Prithvi-EO-2.0-600M is about 2.5 GB) keeps its
weights in ``<name>.onnx.data`` beside the ``.onnx`` file: the two travel together. Both are
written, checked and run in a staging folder beside the output and renamed only on success.

``profile="deepness"`` writes the same model for the Deepness QGIS plugin instead: its input is
Deepness's (8-bit bands ÷ 255), its metadata Deepness's (see ``engine.export.deepness``).

``quantize="int8"`` writes an int8 model instead of the fp32 one (see ``engine.export.quantize``),
``precision="fp16"`` a float16 one for GPUs (see ``engine.export.half``; ``bf16`` is refused);
either is checked against the fp32 model on the same chips before anything is written (see
``engine.export.agreement``)."""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from engine.card import read_card
from engine.data.rasters import current_umask
from engine.export import agreement, deepness, half, quantize as quantization
from engine.card import ONNX_CARD_KEY
from engine.inference.runners import load_trained_model
from engine.protocol import EngineError, Reporter

PARITY_TOLERANCE = 1e-4
OPSET = 17  # IR 8 with the TorchScript exporter: loads in older onnxruntime builds too
# Tensor bytes above which the weights go to an external data file: protobuf's 2 GiB limit,
# less room for the graph and the metadata.
SINGLE_FILE_MAX_BYTES = 2**31 - 2**26


def tensor_bytes(proto) -> int:
    """Bytes of the initializers and constant tensors (ModelProto.ByteSize fails past 2 GB)."""
    constants = [a.t for node in proto.graph.node for a in node.attribute if a.HasField("t")]
    return sum(t.ByteSize() for t in [*proto.graph.initializer, *constants])


PROFILES = ("geopeft", "deepness")


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None,
                seed: int = 0, single_file_max_bytes: int = SINGLE_FILE_MAX_BYTES, profile: str = "geopeft",
                force: bool = False, quantize: str | None = None, precision: str | None = None,
                trust_checkpoint: bool = False) -> dict:
    """``profile``: ``geopeft`` (normalised input, for GeoPEFT's predict) or ``deepness``;
    ``quantize``: ``int8`` (dynamic) or ``int8-static`` for an int8 model (geopeft profile);
    ``precision``: ``fp16`` for a float16 model with float32 input/output (geopeft profile, not
    with ``quantize``); ``bf16`` is refused (see ``engine.export.half``);
    ``force``: export for Deepness a model not trained on uint8 pixels, or keep an int8/fp16 model
    that agrees with fp32 on fewer than 98 % of pixels (with a warning)."""
    reporter = reporter or Reporter("quiet")
    import onnx
    import onnxruntime as ort
    import torch

    from engine.models.segmentor import Probabilities
    from engine.tuning import merge

    if not str(out).lower().endswith(".onnx"):
        raise EngineError(f"--out {out} should end in .onnx")
    if profile not in PROFILES:
        raise EngineError(f"unknown export profile {profile!r}", hint=f"use one of {', '.join(PROFILES)}")
    if quantize is not None and quantize not in quantization.MODES:
        raise EngineError(f"unknown quantisation {quantize!r}", hint=f"use one of {', '.join(quantization.MODES)}")
    if quantize and profile != "geopeft":
        raise EngineError(f"--quantize is for the geopeft profile, not {profile}",
                          hint="export for Deepness without --quantize")
    if precision == "bf16":
        half.refuse_bf16()
    if precision not in (None, "fp32", "fp16"):
        raise EngineError(f"unknown export precision {precision!r}", hint="use fp16 (or leave it out for fp32)")
    fp16 = precision == "fp16"
    if fp16 and quantize:
        raise EngineError("--fp16 and --quantize exclude each other: the model is either float16 (for GPUs) "
                          "or int8 (for CPUs); nothing written", hint="pass only one of them")
    if fp16 and profile != "geopeft":
        raise EngineError(f"--fp16 is for the geopeft profile, not {profile}",
                          hint="export for Deepness without --fp16")
    card, folder = read_card(model_dir)
    if profile == "deepness":
        deepness.check_source_dtype(card, force, reporter)
    steps = 5 if quantize or fp16 else 4
    reporter.progress("export", 1, steps, "loading the trained model")
    trained = Probabilities(load_trained_model(card, folder, reporter, trust_checkpoint)).eval()
    merged = merge(copy.deepcopy(trained)).eval()
    c, s = len(card["input"]["bands"]), int(card["chip_size"])
    rng = np.random.default_rng(seed)
    if profile == "deepness":
        # The exported model takes what Deepness feeds (8-bit pixels ÷ 255); the reference is
        # the trained model on GeoPEFT's own normalisation of the same pixels, so the parity
        # check below covers the input conversion too.
        pixels = rng.integers(0, 256, (3, c, s, s))
        x = torch.from_numpy((pixels * (1.0 / 255)).astype(np.float32))
        x_model = torch.from_numpy(deepness.normalised(pixels, card))
        merged = deepness.wrap_input(merged, card["input"]["mean"], card["input"]["std"])
    else:
        x = x_model = torch.from_numpy(rng.standard_normal((3, c, s, s)).astype(np.float32))
    with torch.inference_mode():
        reference = trained(x_model).numpy()
        merged_out = merged(x).numpy()
    merge_diff = float(np.abs(reference - merged_out).max())
    export_card = dict(card, export={"merged": True, "opset": OPSET, "input": "input",
                                     "output": "probabilities", "layout": "NCHW float32, normalised"})
    if profile == "deepness":
        export_card["export"].update(profile="deepness", layout="NCHW float32, 8-bit values / 255")
    reporter.progress("export", 2, steps, "exporting to ONNX")
    out = Path(out)
    data_file = out.with_name(out.name + ".data")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The staging folder holds the files under their final names, so the data file's location
    # recorded inside the model is right after the rename; it is removed whatever happens.
    # (its name carries the PID: the next job on ``out`` removes it if this one is killed)
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.{os.getpid()}-", suffix=".partial",
                                     dir=out.parent) as staging:
        staged, staged_data = Path(staging) / out.name, Path(staging) / data_file.name
        raw = Path(staging) / "torch_export.onnx"  # beside it any external files torch writes
        torch.onnx.export(merged, (x[:1],), str(raw), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["probabilities"],
                          dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}})
        proto = onnx.load(str(raw))
        if profile == "deepness":
            deepness.limit_versions(proto)
            extra_meta = deepness.metadata(card, reporter)
        else:
            extra_meta = {"model_type": "Segmentor",
                          "class_names": json.dumps({str(i): c["name"] for i, c in enumerate(card["classes"])})}
        card_key = deepness.CARD_KEY if profile == "deepness" else ONNX_CARD_KEY

        def save(proto) -> bool:
            """Write ``proto`` at ``staged`` with the card as it stands; True when the weights went
            to the data file."""
            del proto.metadata_props[:]
            for key, value in {card_key: json.dumps(export_card), **extra_meta}.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            proto.doc_string = f"GeoPEFT {card['backbone']['name']} + {card['decoder']} ({card['tuning']['method']})"
            to_data_file = tensor_bytes(proto) > single_file_max_bytes
            onnx.save_model(proto, str(staged), save_as_external_data=to_data_file, all_tensors_to_one_file=True,
                            location=data_file.name)
            return to_data_file

        external = save(proto)
        del proto
        onnx.checker.check_model(str(staged))  # by path: works past 2 GB too
        reporter.progress("export", 3, steps, "checking parity with PyTorch")
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {"input": x.numpy()})[0]
        del session
        diff = float(np.abs(reference - onnx_out).max())
        if diff > PARITY_TOLERANCE:
            raise EngineError(f"ONNX output differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE:g}); "
                              "nothing written", hint="please report this model configuration")
        reduced = None  # the int8 or fp16 model replacing the fp32 one, and its agreement with it
        if quantize or fp16:
            candidate = Path(staging) / ("int8.onnx" if quantize else "fp16.onnx")
            if quantize:
                reporter.progress("export", 4, steps, "quantising to int8 and comparing with fp32")
                reduced = quantization.quantize_int8(staged, candidate, card, reporter, quantize, external=external,
                                                     seed=seed)
                label, option = reduced["quantize"], "--quantize"
                export_card["export"].update(quantize=label, layout="NCHW float32, normalised (int8 weights inside)")
            else:
                reporter.progress("export", 4, steps, "converting to float16 and comparing with fp32")
                reduced = half.half_precision(staged, candidate, card, reporter, external=external, seed=seed)
                label, option = "fp16", "--fp16"
                export_card["export"].update(
                    precision="fp16", float32_nodes=reduced["float32_nodes"],
                    layout="NCHW float32, normalised (float16 weights and activations inside)")
            agreement.check_agreement(reduced, label, force, reporter, option)  # refuses: nothing written
            export_card["export"]["agreement"] = {k: reduced[k] for k in ("argmax_agreement", "max_prob_diff",
                                                                          "chips", "num_chips")}
            proto = onnx.load(str(candidate))  # its weights too, from its own data file if any
            # The fp32 weights are not part of the reduced model, and onnx appends to an existing data file.
            staged_data.unlink(missing_ok=True)
            external = save(proto)
            del proto
            onnx.checker.check_model(str(staged))
        if external:
            os.chmod(staged_data, 0o666 & ~current_umask())  # onnx writes it owner-only
            os.replace(staged_data, data_file)
        elif data_file.exists():  # an earlier, larger export's data: it belongs to the replaced model
            data_file.unlink()
        os.replace(staged, out)
    size = out.stat().st_size + (data_file.stat().st_size if external else 0)
    done = (reduced.get("quantize") or reduced["precision"]) if reduced else "fp32"
    reporter.progress("export", steps, steps, f"parity OK: max abs diff {diff:.2e}"
                      + (f"; {done} agrees on {reduced['argmax_agreement']:.2%} of pixels" if reduced else ""))
    checked, step = (("ONNX on random 8-bit pixels ÷ 255 vs PyTorch on the same pixels normalised",
                      "merge and input conversion") if profile == "deepness"
                     else ("ONNX parity with PyTorch on random input", "merge alone"))
    reporter.info(f"{checked} (batch 3): max abs diff {diff:.2e} "
                  f"({step}: {merge_diff:.2e}; tolerance {PARITY_TOLERANCE:g})")
    if external:
        reporter.info(f"the weights are in {data_file.name}: keep it beside {out.name} (move and copy them together)")
        reporter.artifact("onnx", str(out), data_file=str(data_file))
    else:
        reporter.artifact("onnx", str(out))
    return {"out": str(out), "data_file": str(data_file) if external else None, "max_abs_diff": diff,
            "merge_max_abs_diff": merge_diff, "size_bytes": size, "opset": OPSET,
            "profile": profile, "quantize": reduced.get("quantize") if reduced else None, "precision": done,
            **({"argmax_agreement": reduced["argmax_agreement"], "max_prob_diff": reduced["max_prob_diff"],
                "agreement_chips": reduced["chips"]} if reduced else {})}
