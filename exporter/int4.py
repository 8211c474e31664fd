"""Really 4-bit Linear weights on TensorRT: INT4 weight-only quantization of the Linear layers.

TensorRT runs INT4 weights as weight-only quantization only: DequantizeLinear of an INT4 initializer (symmetric,
zero point 0, per output channel) feeding a MatMul / Gemm that computes in the graph's float type, its activation
input unquantized (W4A16 for those layers). dqc's W4 weights already sit on the 4-bit grid in int8 containers,
so the weights change type, not value:

    Q(x) → DQ → MatMul(DQ(W int8 ∈ [−8, 7], s))      becomes      x → MatMul(DQ(W int4, s))

and the file holds two weights per byte. The Linear's input Q/DQ goes (the Convs keep theirs, and their int8
containers: TensorRT has no INT4 convolution). INT4 tensors need opset 21; its QuantizeLinear / DequantizeLinear
add the INT4 types and block quantization to opset 19's, and the other operators of dqc's graphs change between
19 and 21 only by the types they accept. The fake-quant reference of such a bundle is the calibrated one with the
Linear inputs' quantizers off (CalibrationResult.reference_model(..., float_linear_inputs=True)).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.simplify import _drop_dead
from runtime.errors import ExportError

INT4_OPSET = 21
# operators whose opset-20/21 versions change more than the accepted types: a graph holding one is not moved to 21
_CHANGED_BY_21 = ("GridSample", "DFT")


def _int4(name: str, values: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer in raw bytes (so it goes to the shared weights file like the others): two values per
    byte, the first in the low nibble (ONNX's and TensorRT's packing), an odd count padded with 0."""
    flat = (values.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


def _activation_source(producer: dict, name: str) -> str | None:
    """The float tensor behind a Linear input's Q/DQ pair (through the b-bit Clip below 8 bits), or None when the
    input is not a Q/DQ pair's output."""
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    x = q.input[0]
    clip = producer.get(x)
    return clip.input[0] if clip is not None and clip.op_type == "Clip" and clip.name.endswith("/in/Clip") else x


def to_int4_weights(model: onnx.ModelProto) -> dict[str, int]:
    """In place: every MatMul / Gemm whose weight is DQ(int8 initializer on the 4-bit grid, per-channel, zero point
    0) reads it as INT4, and its activation input without its Q/DQ; the model moves to opset 21. Returns
    {"INT4": count}."""
    g = model.graph
    for node in g.node:
        if node.op_type in _CHANGED_BY_21:
            raise ExportError(f"INT4 weights need opset 21, and the graph's {node.op_type} {node.name} changed "
                              "meaning there")  # fmt: skip
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    converted: dict[str, str] = {}  # int8 weight → its int4 initializer
    count = 0
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(x in inits for x in dq.input[:3]):
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        zero = numpy_helper.to_array(inits[dq.input[2]])
        if w.dtype != np.int8 or w.ndim != 2 or np.any(zero != 0):
            continue
        if w.min() < -8 or w.max() > 7:
            raise ExportError(f"{node.name}: weight {dq.input[0]} holds values outside the 4-bit grid [−8, 7]")
        if dq.input[0] not in converted:
            base = dq.input[0].removesuffix("/int")
            converted[dq.input[0]] = f"{base}/int4"
            g.initializer.extend([_int4(f"{base}/int4", w), _int4(f"{base}/int4_zero_point", zero)])
        dq.input[0], dq.input[2] = converted[dq.input[0]], converted[dq.input[0]] + "_zero_point"
        source = _activation_source(producer, node.input[0])
        if source is not None:
            node.input[0] = source
        count += 1
    if not count:
        return {"INT4": 0}
    _drop_dead(g)  # the Linears' activation Q/DQ pairs, the int8 containers
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, INT4_OPSET)
    model.ir_version = max(model.ir_version, 10)  # INT4 tensors: IR version 10
    return {"INT4": count}
