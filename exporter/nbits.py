"""Really 4-bit Linear weights on ONNX Runtime: `MatMulNBits` (com.microsoft) in place of DQ(int8 W) → MatMul/Gemm.

Below 8 bits dqc stores weights on the b-bit grid in int8 containers, so a W4 graph is as large and as fast as a
W8 one. ONNX Runtime's MatMulNBits holds 4-bit weights packed two per byte, with a float scale per block of
`block_size` rows of K, and dequantizes them in its GEMM. dqc's weights have one scale per output channel, which
is the blockwise form with every block of a column sharing its scale, so the conversion is exact:

    W[k, n] = s_n · q[k, n],  q ∈ [−8, 7]   ⇒   B[n, k] = q[k, n] + 8 (uint4, zero point 8), scales[n, b] = s_n

The activation input stays as the graph computes it (the static Q/DQ of the ort-cpu placement, so its values lie
on the calibrated grid). `accuracy_level` 0 (default) multiplies in float32 and matches the fake-quant reference
to float rounding; 4 quantizes the activation again per block to int8 at run time (ORT's int8 kernels), which
moves the numbers (measured in docs/RESULTS.md). A Gemm's bias (an int32 DQ in the ort-cpu placement) becomes an
Add after the MatMulNBits.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.errors import ExportError

MS_DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 4)  # 0: float32 compute (exact), 4: int8 compute (activations requantized per block)


def _block_size(k: int) -> int:
    """The largest power of two in [16, 128] not above K (16 when K < 16; the tail block is padded)."""
    size = 16
    while size * 2 <= min(k, 128):
        size *= 2
    return size


def pack_int4(q: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """q [K, N] int on [−8, 7] → (B [N, k_blocks, block / 2] uint8, k_blocks): column n's values q[:, n] + 8,
    two per byte (element 2j in the low nibble, 2j + 1 in the high one), K padded with the zero point to whole
    blocks."""
    k, n = q.shape
    blocks = -(-k // block)
    u = np.full((blocks * block, n), 8, np.uint8)
    u[:k] = (q.astype(np.int16) + 8).astype(np.uint8)
    per_block = u.T.reshape(n, blocks, block)
    return (per_block[..., 0::2] | (per_block[..., 1::2] << 4)).astype(np.uint8), blocks


def to_matmul_nbits(model: onnx.ModelProto, bits: int, accuracy_level: int = 0) -> dict[str, int]:
    """In place: every MatMul / Gemm whose weight is DQ(int8 initializer on the `bits`-bit grid, per-output-channel
    scale, zero point 0) becomes MatMulNBits (+ Add of the Gemm's bias). Returns {"MatMulNBits": count}."""
    if bits != 4:
        raise ExportError(f"MatMulNBits weights: {bits}-bit weights; dqc emits them for 4-bit weights (W4…)")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"MatMulNBits accuracy_level {accuracy_level}: use one of {ACCURACY_LEVELS}")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    replace: dict[int, list] = {}
    new_inits = []
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(x in inits for x in dq.input[1:3]):
            continue
        if dq.input[0] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        trans_b = node.op_type == "Gemm" and attrs.get("transB", 0) == 1
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0):  # fmt: skip
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        scale, zero = (numpy_helper.to_array(inits[x]) for x in dq.input[1:3])
        axis = {a.name: helper.get_attribute_value(a) for a in dq.attribute}.get("axis", 1)
        if w.dtype != np.int8 or w.ndim != 2 or np.any(zero != 0) or axis % 2 != (0 if trans_b else 1):
            continue
        q = w.T if trans_b else w  # [K, N]
        if q.min() < -8 or q.max() > 7:
            raise ExportError(f"{node.name}: weight {dq.input[0]} holds values outside the 4-bit grid [−8, 7]")
        k, n = q.shape
        block = _block_size(k)
        packed, blocks = pack_int4(q, block)
        s = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (n,))
        base = dq.input[0].removesuffix("/int")
        b_name, s_name = f"{base}/nbits", f"{base}/nbits_scale"
        new_inits += [numpy_helper.from_array(packed, b_name),
                      numpy_helper.from_array(np.repeat(s[:, None], blocks, 1).reshape(-1), s_name)]  # fmt: skip
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        out = node.output[0]
        mm_out = f"{out}/nbits" if bias else out
        nodes = [helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], [mm_out], name=f"{node.name}/NBits",
                                  domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block,
                                  accuracy_level=accuracy_level)]  # fmt: skip
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}/bias"))
        replace[id(node)] = nodes
    if not replace:
        return {"MatMulNBits": 0}
    nodes = [m for x in g.node for m in replace.get(id(x), [x])]
    outputs = {o.name for o in g.output}
    used = {i for x in nodes for i in x.input} | outputs
    nodes = [x for x in nodes if x.op_type != "DequantizeLinear" or x.output[0] in used]  # the int8 weights' DQs
    used = {i for x in nodes for i in x.input} | outputs
    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name in used] + new_inits
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return {"MatMulNBits": len(replace)}
