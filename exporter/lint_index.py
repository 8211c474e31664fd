"""The graph index the lint rules read: one pass over a model (after shape inference) into lookup tables.

    model ─► infer shapes/types ─► GraphIndex(producers, consumers, constants, types, shapes, ...)

Also the small lookups the rules share (a node's label, an attribute, a constant's values, the weight a
DequantizeLinear reads) and Violation, what every rule returns. The rules themselves are in exporter.lint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.profiles import TargetProfile

INT8, UINT8, INT32, FLOAT = TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32, TensorProto.FLOAT


@dataclass(frozen=True)
class Violation:
    rule: str  # short id, e.g. "qdq-zero-point"
    node: str  # the ONNX node name (or tensor/initializer name when no node)
    message: str  # what is wrong and how to fix it


@dataclass(frozen=True)
class GraphIndex:
    """Everything the rules look up, computed once from the model (after shape inference)."""

    profile: TargetProfile
    opset: int
    nodes: tuple[onnx.NodeProto, ...]
    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]  # tensor → [(node, input slot)]
    constants: dict[str, TensorProto]  # initializers (not graph inputs), Constant outputs, Identity of those
    inputs: frozenset[str]
    outputs: frozenset[str]
    types: dict[str, int]  # tensor → TensorProto element type
    shapes: dict[str, tuple]  # tensor → dims (int, symbolic str or None)
    inference_error: str | None  # strict shape inference failure (TensorRT targets only)


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _tname(dtype: int) -> str:
    return "float32" if dtype == FLOAT else TensorProto.DataType.Name(dtype).lower()


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _values(t: TensorProto) -> np.ndarray | None:
    """A small constant's values; None when they live in external data that was not loaded."""
    return None if t.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(t)


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.array(helper.get_attribute_value(a), dtype))
    return None


def _infer(model: onnx.ModelProto, strict: bool) -> tuple[onnx.ModelProto, str | None]:
    """The model with inferred types; with `strict`, also the strict inference's error (None when it passes)."""
    errors, error = (onnx.shape_inference.InferenceError, onnx.checker.ValidationError), None
    for mode in (True, False) if strict else (False,):
        try:
            return onnx.shape_inference.infer_shapes(model, strict_mode=mode), error
        except errors as e:
            error = str(e).strip() if mode else error
    return model, error


def index_graph(model: onnx.ModelProto, profile: TargetProfile) -> GraphIndex:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inferred, error = _infer(model, strict=profile.backend == "trt")
    g = inferred.graph
    inputs = frozenset(i.name for i in g.input)
    constants = {t.name: t for t in g.initializer if t.name not in inputs}
    producers, consumers = {}, {}
    for node in g.node:  # ONNX graphs are topologically sorted
        for slot, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, slot))
        for name in node.output:
            producers[name] = node
        if node.op_type == "Constant" and (t := _constant_tensor(node)) is not None:
            constants[node.output[0]] = t
        elif node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    types, shapes = {}, {}
    for vi in (*g.input, *g.value_info, *g.output):
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tt.shape.dim
            )
    for name, t in constants.items():
        types[name], shapes[name] = t.data_type, tuple(t.dims)
    outputs = frozenset(o.name for o in g.output)
    return GraphIndex(
        profile, opset, tuple(g.node), producers, consumers, constants, inputs, outputs, types, shapes, error
    )


def _ops(ix: GraphIndex, *ops: str) -> list[onnx.NodeProto]:
    return [n for n in ix.nodes if n.op_type in ops]


def _source(ix: GraphIndex, name: str) -> str:
    if name in ix.inputs:
        return f"graph input {name}"
    p = ix.producers.get(name)
    return f"{name} (output of {p.op_type} {_label(p)})" if p is not None else f"{name} (produced by no node)"


def _produced_by(ix: GraphIndex, name: str, op: str) -> onnx.NodeProto | None:
    p = ix.producers.get(name)
    return p if p is not None and p.op_type == op else None


def _weight_of(ix: GraphIndex, dq: onnx.NodeProto) -> TensorProto | None:
    """The constant a DequantizeLinear dequantizes (directly, or through a Q of a float constant)."""
    if dq.input[0] in ix.constants:
        return ix.constants[dq.input[0]]
    q = _produced_by(ix, dq.input[0], "QuantizeLinear")
    return ix.constants.get(q.input[0]) if q is not None else None


def _is_weight(ix: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Q of a constant, or a DQ of a constant (or of a Q of one)."""
    return node.input[0] in ix.constants if node.op_type == "QuantizeLinear" else _weight_of(ix, node) is not None


def _param(node: onnx.NodeProto, slot: int) -> str | None:
    return node.input[slot] if len(node.input) > slot and node.input[slot] else None


def _q_type(ix: GraphIndex, q: onnx.NodeProto) -> int:
    """A QuantizeLinear's output type: its zero point's type, else output_dtype, else uint8 (ONNX default)."""
    zp = _param(q, 2)
    return ix.types.get(zp, 0) if zp is not None else _attr(q, "output_dtype", 0) or UINT8


def _at(rule: str, node: onnx.NodeProto, msg: str) -> Violation:
    """A violation at `node`; the message starts with the node's op type and name."""
    return Violation(rule, _label(node), f"{node.op_type} {_label(node)}: {msg}")
