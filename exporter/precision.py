"""Pass: make a float32 graph strongly typed in float16 or bfloat16 (TensorRT 10/11 strongly typed networks
take every tensor's type from the graph, so the graph itself must be in the precision it runs in).

    sample(fp32) ─► Cast(fp16) ─► … every float tensor, weight, bias and Q/DQ scale in fp16 … ─► Cast(fp32) ─► eps
    timestep ─► Cast ─► Mul ─► Sin/Cos ─► Concat (fp32: the sinusoidal embedding) ─► Cast(fp16) ─► Q ─► …

The sinusoidal timestep embedding (t up to 1000 times frequencies) stays in float32, where fp16 would lose
the phase; the region is everything computed from the `timestep` input before its first Q/DQ, Conv or
Gemm/MatMul, and it meets the rest of the graph through a Cast. Inputs the ONNX spec pins to float32
(Resize scales) stay float32. Q/DQ scales are checked for representability in the new type.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.large_model import infer_shapes
from runtime.errors import ExportError

FLOAT_TYPES = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16, "float32": TensorProto.FLOAT}
_STOP = {"QuantizeLinear", "DequantizeLinear", "Conv", "ConvTranspose", "Gemm", "MatMul", "Clip"}
_KEEP_FP32 = {("Resize", 2), ("Resize", 1), ("Upsample", 1)}  # (op, input index) the spec types as float32
_SCALE_RTOL = 2.0**-10  # a Q/DQ scale must survive the cast to within fp16's relative precision


def _embedding_region(graph: onnx.GraphProto, source: str, constants: set[str]) -> set[int]:
    """Indices of the nodes computed from `source` alone (with constants and tensor shapes, e.g. the batch
    size the timestep is expanded to), before the first _STOP op."""
    known, derived, region = {source} | constants, {source}, set()
    for i, node in enumerate(graph.node):  # graphs are topologically sorted
        if node.op_type == "Shape":
            known.update(node.output)
            continue
        ins = [x for x in node.input if x]
        if node.op_type in _STOP or not ins or any(x not in known for x in ins):
            continue
        known.update(node.output)
        if any(x in derived for x in ins):
            region.add(i)
            derived.update(node.output)
    return region


def _convert_tensor(t: TensorProto, dtype: int) -> TensorProto:
    values = numpy_helper.to_array(t).astype(np.float32)
    if dtype == TensorProto.BFLOAT16:
        out = helper.make_tensor(t.name, dtype, values.shape, values.flatten().tolist())
    else:
        out = numpy_helper.from_array(values.astype(np.float16), t.name)
    return out


def _check_scale(name: str, t: TensorProto, dtype: int) -> None:
    values = numpy_helper.to_array(t).astype(np.float64)
    if dtype == TensorProto.BFLOAT16:
        cast = numpy_helper.to_array(_convert_tensor(t, dtype)).astype(np.float64)
        tol = 2.0**-7
    else:
        cast, tol = values.astype(np.float16).astype(np.float64), _SCALE_RTOL
    bad = ~np.isfinite(cast) | (cast <= 0) | (np.abs(cast - values) > tol * np.abs(values))
    if bad.any():
        v = values.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]]
        raise ExportError(
            f"Q/DQ scale {name}: {v:.3g} is not representable in {TensorProto.DataType.Name(dtype).lower()} "
            "(outside its normal range); use the trt-fp32 target or recalibrate with wider ranges"
        )


def to_float_type(model: onnx.ModelProto, float_type: str) -> onnx.ModelProto:
    """A copy of `model` with every float32 tensor outside the timestep embedding in `float_type`."""
    dtype = FLOAT_TYPES[float_type]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if dtype == TensorProto.FLOAT:
        return out
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    constants = set(inits) | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    region = _embedding_region(g, "timestep", constants)
    inferred = infer_shapes(model).graph.value_info
    floats = {v.name for v in inferred if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    region_tensors = {o for i in region for o in g.node[i].output if o in floats}
    fp32_uses: set[str] = set()  # float initializers read where float32 is needed
    scales: set[str] = set()
    for i, node in enumerate(g.node):
        for k, x in enumerate(node.input):
            if i in region or (node.op_type, k) in _KEEP_FP32:
                fp32_uses.add(x)
            elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and k == 1:
                scales.add(x)
    renames = _convert_initializers(g, inits, dtype, fp32_uses, scales)
    kept = {n.output[0] for n in g.node if n.op_type == "Constant" and n.output[0] in fp32_uses}
    casts = []
    for i, node in enumerate(g.node):
        if i in region:
            continue
        for k, x in enumerate(node.input):
            if (node.op_type, k) in _KEEP_FP32:
                continue
            if x in renames:
                node.input[k] = renames[x]
            elif x in region_tensors or x in kept:  # the embedding meets the rest: one Cast per tensor
                node.input[k] = _cast_once(casts, x, dtype)
        _retype_node(node, dtype)
    _retype_io(g, dtype, casts)
    g.node.extend(casts)
    del g.value_info[:]
    _toposort(g)
    return out


def _convert_initializers(g, inits: dict, dtype: int, fp32_uses: set[str], scales: set[str]) -> dict[str, str]:
    """Float initializers (and Constant nodes) to `dtype`; one read both ways keeps a float32 copy under its
    name and gets a converted one. Returns {old name: converted name} for the copies."""
    renames = {}
    for name, t in list(inits.items()):
        if t.data_type != TensorProto.FLOAT:
            continue
        if name in scales:
            _check_scale(name, t, dtype)
        converted = _convert_tensor(t, dtype)
        if name in fp32_uses:
            converted.name = f"{name}/{TensorProto.DataType.Name(dtype).lower()}"
            g.initializer.append(converted)
            renames[name] = converted.name
        else:
            t.CopyFrom(converted)
    for node in g.node:
        if node.op_type != "Constant" or node.output[0] in fp32_uses:
            continue
        for a in node.attribute:
            if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_convert_tensor(a.t, dtype))
    return renames


def _retype_node(node: onnx.NodeProto, dtype: int) -> None:
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = dtype
        elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(_convert_tensor(a.t, dtype))


def _cast_once(casts: list, x: str, dtype: int) -> str:
    name = f"{x}/cast"
    if not any(c.output[0] == name for c in casts):
        casts.append(helper.make_node("Cast", [x], [name], name=f"{x}/Cast", to=dtype))
    return name


def _retype_io(g: onnx.GraphProto, dtype: int, casts: list) -> None:
    """Float32 graph inputs feed the graph through a Cast to `dtype`; float outputs leave through a Cast back."""
    for inp in g.input:
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT or inp.name == "timestep":
            continue
        cast = _cast_once(casts, inp.name, dtype)
        for node in g.node:
            for k, x in enumerate(node.input):
                if x == inp.name and (node.op_type, k) not in _KEEP_FP32:
                    node.input[k] = cast
    for out in g.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{out.name}/{TensorProto.DataType.Name(dtype).lower()}"
        for node in g.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if x == out.name else x for x in node.input]
        casts.append(helper.make_node("Cast", [inner], [out.name], name=f"{out.name}/Cast", to=TensorProto.FLOAT))


def _toposort(g: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before it is read (the inserted Casts)."""
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for node in pending:
            if all(x in ready for x in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"float-type pass: node {rest[0].name} reads a tensor nothing produces")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
