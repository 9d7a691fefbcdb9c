"""``export --fp16``: a float16 copy of the exported fp32 ONNX model, for GPUs (CUDA/TensorRT).

Weights and activations are float16; the model's input and output stay float32
(``keep_io_types``), so ``predict`` and any other caller feed float32 as for the fp32 model. The
conversion is onnxruntime's own (``onnxruntime.transformers.float16.convert_float_to_float16``).
The convolutions that see the input bands (the patch embedding, the UNet stem: see
``quantize.input_facing_convs``), and the few nodes between them and the input, stay float32, as
in ``int8-static``.

Two small fix-ups after the library's conversion, both on the graph's wiring only:

- with ``keep_io_types`` the converter casts the float32 input to float16 once, for every
  consumer, blocked (float32) nodes included, which then cast it back to float32: the "float32"
  first convolutions would still see the bands rounded to float16. The float32-kept nodes are
  reconnected to the float32 tensors those round trips started from, and the dead casts pruned;
- the converter appends its casts at the end of the node list, which ``onnx.checker`` rejects
  (nodes must be topologically sorted): the graph is sorted (onnxruntime's ``OnnxModel``).

onnxruntime's CPU provider runs the fp16 model (checked at export: the comparison with fp32 runs
on it); where it lacks a float16 kernel it inserts casts and runs that op in float32, so on CPU the
model is no faster than fp32 (use ``--quantize int8`` there). On CUDA the float16 kernels run.

``--bf16`` is refused (``refuse_bf16``): checked with onnxruntime 1.31 (CPU provider), bfloat16
has no CPU kernel for MatMul, Add, Mul, Div, Sqrt, Erf, Relu or Softmax (session creation fails
with NOT_IMPLEMENTED, and onnxruntime inserts no casts for bfloat16 as it does for float16), and at
the export's opset 17 the ONNX standard does not allow bfloat16 for Conv, ConvTranspose or
MaxPool at all (the model is invalid); the float16 converter has no bfloat16 mode either (its
``use_bfloat16_as_blocked_nodes_dtype`` only retypes the nodes kept out of float16). A bf16 model
could therefore be neither loaded nor compared with fp32 here: not shipped untested.
"""
from __future__ import annotations

from pathlib import Path

from engine.export.agreement import compare, sample_chips
from engine.export.quantize import input_facing_convs
from engine.protocol import EngineError, Reporter

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16

def refuse_bf16() -> None:
    """Why ``--bf16`` is refused (see the module's docstring for the evidence)."""
    raise EngineError(
        "--bf16 is not supported: onnxruntime has no bfloat16 kernels on its CPU provider for the ops of these "
        "models (MatMul, Add, Mul, Softmax, Erf: the session cannot be created) and ONNX opset 17 does not allow "
        "bfloat16 convolutions, so a bf16 model could not even be checked against fp32; nothing written",
        hint="use --fp16 (float16 weights and activations, float32 input and output) for GPUs, "
             "or --quantize int8 for CPUs")


def _float32_region(graph) -> tuple[list, set[str]]:
    """(the input-facing convolutions, the names of the nodes to keep float32: those convolutions
    and the nodes on their data path from the graph input, e.g. the patch embedding's Unsqueeze and
    Cast)."""
    producers = {out: node for node in graph.node for out in node.output}
    input_names = {i.name for i in graph.input}
    convs = input_facing_convs(graph)
    keep: set[str] = set()

    def from_input(tensor: str, seen: set[str]) -> bool:
        """Whether ``tensor`` is computed from the graph input alone (plus constants); adds the
        nodes computing it to ``keep``."""
        if tensor in input_names:
            return True
        node = producers.get(tensor)
        if node is None or node.op_type == "Constant" or node.name in seen:
            return False
        seen.add(node.name)
        if any(from_input(t, seen) for t in node.input if t):
            keep.add(node.name)
            return True
        return False

    for conv in convs:
        keep.add(conv.name)
        from_input(conv.input[0], set())
    return convs, keep


def _reconnect_float32(graph, keep: set[str]) -> None:
    """Feed the float32-kept nodes the float32 tensor a Cast(float16) → Cast(float32) round trip
    started from, when that tensor is float32 for sure: the graph input (``keep_io_types``) or the
    output of another kept node."""
    producers = {out: node for node in graph.node for out in node.output}
    float32 = {i.name for i in graph.input} | {out for node in graph.node if node.name in keep
                                               for out in node.output}

    def cast_to(node) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    for node in graph.node:
        if node.name not in keep:
            continue
        for i, tensor in enumerate(node.input):
            back = producers.get(tensor)
            if cast_to(back) != FLOAT:
                continue
            half = producers.get(back.input[0])
            if cast_to(half) == FLOAT16 and half.input[0] in float32:
                node.input[i] = half.input[0]


def convert_fp16(fp32: Path, out: Path, external: bool) -> dict:
    """Write the float16 model of ``fp32`` at ``out``; returns the names of the nodes kept float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    graph_only = onnx.load(str(fp32), load_external_data=False)
    convs, keep = _float32_region(graph_only.graph)
    del graph_only
    if not convs:
        raise EngineError("found no convolution fed the input bands to keep in float32 (patch embedding, UNet stem)",
                          hint="please report this model configuration; export without --fp16 meanwhile")
    # By path: the shape inference it needs runs on files past 2 GB too.
    proto = convert_float_to_float16(str(fp32), keep_io_types=True, node_block_list=sorted(keep))
    _reconnect_float32(proto.graph, keep)
    model = OnnxModel(proto)
    model.prune_graph(allow_remove_graph_inputs=False)  # the round-trip casts nothing reads any more
    model.topological_sort()
    onnx.save_model(proto, str(out), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=out.name + ".data")
    return {"float32_nodes": sorted(keep), "float32_convs": [c.name for c in convs]}


def half_precision(fp32: Path, out: Path, card: dict, reporter: Reporter, external: bool = False,
                   seed: int = 0) -> dict:
    """Write the fp16 model of ``fp32`` at ``out``; returns ``precision``, the agreement with fp32
    on chips (``chips``, ``num_chips``, ``max_prob_diff``, ``argmax_agreement``) and the nodes kept
    float32."""
    chips, source = sample_chips(card, seed=seed)
    kept = convert_fp16(fp32, out, external)
    return {"precision": "fp16", **kept, **compare(fp32, out, chips, source, reporter, "fp16")}
