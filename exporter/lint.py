"""Graph lint: check a Q/DQ ONNX graph against the documented rules of an export target profile.

    x ─► Cast ─► Q ─► DQ ─► Conv ─► Add ─► Cast ─► y     every rule is one small function over a
                            ▲        ▲                     GraphIndex built once; every violation
            W_int8 ─► DQ ───┘   r ─► Q ─► DQ               names the node (or tensor) and the fix

TensorRT targets (backend "trt") follow NVIDIA's explicit-quantization rules for TensorRT 10: int8
symmetric Q/DQ with constant scales, per-channel weights, quantized Conv/Gemm/MatMul inputs, quantized
residuals for the Conv+Add fusion, and a strongly typed graph in the profile's float type. ort-cpu
follows ONNX Runtime's QDQ fusion conditions (uint8 activations, int8 weights, a Q on every Conv output
for QLinearConv). Everything is decided from the graph's structure and types, never from node names, so
graphs made by other tools lint too. Only the top-level graph is checked (not If/Loop subgraphs).

The GraphIndex the rules read, and the lookups they share, are built in exporter.lint_index.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper

from calibration.profiles import get_profile
from exporter.lint_index import (
    FLOAT,
    INT8,
    INT32,
    UINT8,
    GraphIndex,
    Violation,
    _at,
    _attr,
    _is_weight,
    _label,
    _ops,
    _param,
    _produced_by,
    _q_type,
    _source,
    _tname,
    _values,
    _weight_of,
    index_graph,
)

__all__ = [
    "RULES",
    "GraphIndex",
    "Violation",
    "index_graph",
    "lint_bundle",
    "lint_model",
    "lint_single_engine",
    "rule_conv_output",
    "rule_opset",
    "rule_per_channel",
    "rule_qdq_constant",
    "rule_qdq_pair",
    "rule_qdq_shared",
    "rule_qdq_type",
    "rule_quantized_input",
    "rule_residual_add",
    "rule_strongly_typed",
    "rule_zero_point",
]

_FLOATS = (FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
_FLOAT_TYPE = {"float32": FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_QUANT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_TYPED_OPS = (*_QUANT_OPS, "InstanceNormalization", "Softmax")
# explicit integer kernels (runtime.single_engine): {op: {quantized input slot: its scale and zero-point slots}};
# MatMulIntegerToFloat's B is an activation too where an attention product is quantized
_FUSED_INPUT = {"QLinearConv": {0: (1, 2)}, "QGemm": {0: (1, 2)}, "MatMulIntegerToFloat": {0: (2, 4), 1: (3, 5)}}
_FLOAT32_PARAMS = {("Resize", 1), ("Resize", 2)}  # roi / scales: ONNX wants float32 there in any graph


def _nbits_bias(ix: GraphIndex, node: onnx.NodeProto, slot: int) -> bool:
    """Whether input `slot` of `node` is a Gemm's bias added after its MatMulNBits (exporter.nbits)."""
    return node.op_type == "Add" and _produced_by(ix, node.input[1 - slot], "MatMulNBits") is not None


def _int4_weight_only(ix: GraphIndex, node: onnx.NodeProto) -> bool:
    """A MatMul / Gemm whose weight is DequantizeLinear of an INT4 constant on a TensorRT profile: TensorRT's
    weight-only INT4 (exporter.int4), whose activation input stays float."""
    w = node.input[1] if len(node.input) > 1 else ""
    dq = _produced_by(ix, w, "DequantizeLinear")
    src = ix.constants.get(dq.input[0]) if dq is not None else None
    return ix.profile.backend == "trt" and src is not None and src.data_type == TensorProto.INT4


def rule_qdq_type(ix: GraphIndex) -> list[Violation]:
    """Activation Q/DQ in the profile's type (int8 symmetric or uint8), weights int8, int32 biases where allowed."""
    p, out = ix.profile, []
    act = INT8 if p.activation_signed else UINT8
    for q in _ops(ix, "QuantizeLinear"):
        weight = _is_weight(ix, q)
        want, got = (INT8 if weight else act), _q_type(ix, q)
        if got != want:
            what = "weights" if weight else "activations"
            msg = f"outputs {_tname(got)}; target {p.name} quantizes {what} to {_tname(want)}"
            out.append(_at("qdq-type", q, f"{msg}: give it a zero point of type {_tname(want)}"))
    for dq in _ops(ix, "DequantizeLinear"):
        src = ix.constants.get(dq.input[0])
        if src is None or src.data_type == INT8:
            continue  # fed by a Q (checked above) or by a computed tensor (qdq-pair)
        users = ix.consumers.get(dq.output[0], [])
        bias = bool(users) and all(c.op_type in ("Conv", "ConvTranspose", "Gemm") and s == 2 or _nbits_bias(ix, c, s)
                                   for c, s in users)  # fmt: skip
        if src.data_type == INT32 and bias and p.quantize_bias:
            continue
        if src.data_type == TensorProto.INT4 and users and all(s == 1 and _int4_weight_only(ix, c) for c, s in users):
            continue
        fix = "keep the bias a float initializer" if src.data_type == INT32 and bias else "quantize it to int8"
        msg = f"dequantizes {dq.input[0]} of type {_tname(src.data_type)}; target {p.name} takes int8 there: {fix}"
        out.append(_at("qdq-type", dq, msg))
    return out


def rule_zero_point(ix: GraphIndex) -> list[Violation]:
    """Zero points 0: every one on a symmetric (int8) profile, the weights' (and biases') on any profile."""
    out = []
    for n in _ops(ix, *_QDQ):
        zp, weight = _param(n, 2), _is_weight(ix, n)
        t = ix.constants.get(zp or "")
        v = _values(t) if t is not None and (ix.profile.activation_signed or weight) else None
        if v is not None and np.any(v != 0):
            bad = sorted({int(x) for x in v.ravel() if x != 0})[:4]
            what = "weights" if weight else "activations"
            msg = f"zero point {zp} holds {bad}; target {ix.profile.name} needs symmetric {what} (zero point 0)"
            out.append(_at("qdq-zero-point", n, msg + ": recalibrate with a symmetric quantizer"))
    return out


def _check_scale(ix: GraphIndex, n: onnx.NodeProto, t: TensorProto) -> list[Violation]:
    v = _values(t).astype(np.float64)
    if not np.all(np.isfinite(v) & (v > 0)):
        bad = [float(x) for x in v.ravel() if not (np.isfinite(x) and x > 0)][:4]
        return [_at("qdq-constant", n, f"scale {t.name} holds {bad}; scales must be finite and > 0: recalibrate")]
    if ix.profile.float_type == "float16" and not np.all(np.isfinite(half := v.astype(np.float16)) & (half > 0)):
        msg = f"scale {t.name} (min {v.min():.3g}, max {v.max():.3g}) becomes 0 or inf in float16"
        return [_at("qdq-constant", n, msg + ": clamp the scales to [6e-8, 65504] before the cast")]
    return []


def rule_qdq_constant(ix: GraphIndex) -> list[Violation]:
    """Scales and zero points are constants (initializers or Constant nodes); scales finite, > 0, representable."""
    out = []
    for n in _ops(ix, *_QDQ):
        for slot, role in ((1, "scale"), (2, "zero point")):
            name = _param(n, slot)
            if name is None:
                continue
            t = ix.constants.get(name)
            if t is None:
                msg = f"{role} is {_source(ix, name)}, not a constant"
                out.append(_at("qdq-constant", n, msg + "; make it an initializer (or a Constant node)"))
            elif _values(t) is None:
                msg = f"{role} {name} is external data that was not loaded, so its values were not checked"
                out.append(_at("unchecked", n, msg + "; lint the model with its external data (lint_bundle does)"))
            elif slot == 1:
                out += _check_scale(ix, n, t)
    return out


def _same_params(ix: GraphIndex, q: onnx.NodeProto, dq: onnx.NodeProto) -> bool:
    """Same scale and zero point (one tensor, or equal values; values not loaded count as equal, qdq-constant
    reports them) and, for per-channel scales, the same axis."""
    for slot in (1, 2):
        a, b = _param(q, slot), _param(dq, slot)
        if a == b:
            continue
        ta, tb = ix.constants.get(a or ""), ix.constants.get(b or "")
        if ta is None or tb is None:
            return False
        va, vb = _values(ta), _values(tb)
        if va is not None and vb is not None and (va.dtype != vb.dtype or not np.array_equal(va, vb)):
            return False
    scale = ix.constants.get(q.input[1])
    return scale is None or len(scale.dims) == 0 or _attr(q, "axis", 1) == _attr(dq, "axis", 1)


def rule_qdq_pair(ix: GraphIndex) -> list[Violation]:
    """Each Q feeds only DQs with its own scale/zero point; each DQ of an activation is fed by a Q."""
    out = []
    for q in _ops(ix, "QuantizeLinear"):
        if q.output[0] in ix.outputs:
            out.append(_at("qdq-pair", q, f"its output {q.output[0]} is a graph output; add the matching DQ"))
        for c, slot in ix.consumers.get(q.output[0], []):
            if slot in _FUSED_INPUT.get(c.op_type, {}):  # an explicit integer kernel reads the quantized input
                if [c.input[i] for i in _FUSED_INPUT[c.op_type][slot]] != list(q.input[1:3]):
                    out.append(_at("qdq-pair", c, f"reads {_label(q)}'s output with other scale/zero point "
                                   "inputs than the Q's; use the Q's"))  # fmt: skip
            elif c.op_type != "DequantizeLinear":
                out.append(_at("qdq-pair", q, f"feeds {c.op_type} {_label(c)}; a Q may feed only DequantizeLinear"))
            elif not _same_params(ix, q, c):
                out.append(_at("qdq-pair", c, f"uses other scale/zero point/axis than its Q {_label(q)}; use the Q's"))
    for dq in _ops(ix, "DequantizeLinear"):
        x = dq.input[0]
        quantized = _produced_by(ix, x, "QuantizeLinear") or _produced_by(ix, x, "QLinearConv")
        if x not in ix.constants and quantized is None:
            out.append(_at("qdq-pair", dq, f"dequantizes {_source(ix, x)}, not a Q's output; pair it with a Q"))
    return out


def rule_qdq_shared(ix: GraphIndex) -> list[Violation]:
    """A tensor read by several quantized layers is quantized once: one Q (after one b-bit Clip, if any) whose
    DQ they all read. TensorRT fuses the q/k/v projections only when they share it; ORT quantizes once. Only
    Qs that feed a layer's input count (a residual-Add Q/DQ on the same tensor is a placement of its own)."""
    out, seen = [], {}
    for q in _ops(ix, "QuantizeLinear"):
        dqs = [c for c, _ in ix.consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]
        if not any(c.op_type in _QUANT_OPS and slot == 0 for d in dqs for c, slot in ix.consumers.get(d.output[0], [])):
            continue
        x = q.input[0]
        clip = _produced_by(ix, x, "Clip")
        if clip is not None:
            x = clip.input[0]
        if x in ix.constants:
            continue  # a weight
        first = next((p for p in seen.get(x, []) if _same_params(ix, p, q)), None)
        if first is not None:
            msg = f"quantizes {_source(ix, x)} again, with the parameters of {_label(first)}"
            out.append(_at("qdq-shared", q, msg + ": let every reader take that Q's DQ (one Q/DQ per tensor)"))
        seen.setdefault(x, []).append(q)
    return out


def rule_per_channel(ix: GraphIndex) -> list[Violation]:
    """Weight DQs per output channel: Conv axis 0, ConvTranspose 1, Gemm 0 (transB) / 1, MatMul the last."""
    out = []
    for n in _ops(ix, *_QUANT_OPS):
        dq = _produced_by(ix, n.input[1], "DequantizeLinear") if len(n.input) > 1 else None
        w = _weight_of(ix, dq) if dq is not None else None
        scale = ix.constants.get(dq.input[1]) if w is not None else None
        if scale is None:
            continue
        rank, dims = len(w.dims), list(scale.dims)
        # output channels: Conv [O, I, ...] 0, ConvTranspose [I, O, ...] 1, Gemm B [N, K] (transB) or [K, N],
        # MatMul [.., in, out] the last
        axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if _attr(n, "transB", 0) else 1}.get(n.op_type, rank - 1)
        got = _attr(dq, "axis", 1)
        got = got + rank if got < 0 else got
        if len(dims) != 1 or dims[0] != w.dims[axis] or (dims[0] > 1 and got != axis):
            kind = "a per-tensor scale" if int(np.prod(dims)) == 1 else f"scale shape {dims} with axis={got}"
            msg = f"weight DQ of {n.op_type} {_label(n)} has {kind}; it needs axis={axis} and {w.dims[axis]} scales"
            out.append(_at("weight-per-channel", dq, f"{msg} (one per output channel of weight {list(w.dims)})"))
    return out


def rule_quantized_input(ix: GraphIndex) -> list[Violation]:
    """Conv/Gemm/MatMul with a constant weight: quantized weight and a dequantized input 0 (else: float fallback)."""
    out = []
    for n in _ops(ix, *_QUANT_OPS):
        w = n.input[1] if len(n.input) > 1 else ""
        if w in ix.constants:
            if ix.constants[w].data_type in _FLOATS:
                msg = f"weight {w} is a float constant, so the node falls back to float"
                out.append(_at("quantized-input", n, msg + "; store it as int8 with a per-channel DequantizeLinear"))
            continue
        dq = _produced_by(ix, w, "DequantizeLinear")
        if dq is None or _weight_of(ix, dq) is None:
            continue  # activation × activation: may stay float
        if _produced_by(ix, n.input[0], "DequantizeLinear") is None and not _int4_weight_only(ix, n):
            msg = f"input 0 is {_source(ix, n.input[0])}, not a DequantizeLinear, so the node runs in float"
            out.append(_at("quantized-input", n, msg + "; put a Q/DQ pair on it"))
    return out


def _broadcasts(ix: GraphIndex, other: str, conv_out: str) -> bool:
    """True when `other` is known to broadcast against the conv output (a bias-like add, not a residual)."""
    a, b = ix.shapes.get(other), ix.shapes.get(conv_out)
    if a is None or b is None:
        return False
    return len(a) < len(b) or any(x == 1 and y != 1 for x, y in zip(a, b, strict=False))


def rule_residual_add(ix: GraphIndex) -> list[Violation]:
    """An Add of a Conv output and a same-shape residual: the residual is dequantized (TensorRT fuses it)."""
    if not ix.profile.residual_input:
        return []
    out = []
    for add in _ops(ix, "Add"):
        convs = [_produced_by(ix, x, "Conv") for x in add.input]
        if len(add.input) != 2 or not any(convs):
            continue
        if all(convs):
            msg = f"both inputs come straight from Conv {_label(convs[0])} and Conv {_label(convs[1])}"
            out.append(_at("residual-add", add, msg + "; put a Q/DQ pair on the residual one"))
            continue
        conv, other = (add.input[0], add.input[1]) if convs[0] else (add.input[1], add.input[0])
        if other in ix.constants or _produced_by(ix, other, "DequantizeLinear") or _broadcasts(ix, other, conv):
            continue
        msg = f"residual input {_source(ix, other)} is not dequantized; put a Q/DQ pair on it so TensorRT fuses"
        out.append(_at("residual-add", add, f"{msg} the Add into Conv {_label(ix.producers[conv])}"))
    return out


def rule_conv_output(ix: GraphIndex) -> list[Violation]:
    """ort-cpu: a quantized Conv's output feeds one Q (directly or through one Clip), so ORT forms QLinearConv."""
    if not ix.profile.conv_output:
        return []
    out = []
    for n in _ops(ix, "Conv"):
        dq = _produced_by(ix, n.input[1], "DequantizeLinear") if len(n.input) > 1 else None
        if dq is None or _weight_of(ix, dq) is None:
            continue
        users = ix.consumers.get(n.output[0], [])
        if len(users) == 1 and users[0][0].op_type == "Clip" and n.output[0] not in ix.outputs:
            users = ix.consumers.get(users[0][0].output[0], [])
        if len(users) != 1 or users[0][0].op_type != "QuantizeLinear" or n.output[0] in ix.outputs:
            got = sorted({f"{c.op_type} {_label(c)}" for c, _ in users})
            got += ["the graph output"] if n.output[0] in ix.outputs else []
            msg = f"quantized, but its output feeds {got or 'nothing'}; ORT forms QLinearConv only with one Q there"
            out.append(_at("conv-output", n, msg + " (directly or through one Clip): add the output Q/DQ pair"))
    return out


def rule_opset(ix: GraphIndex) -> list[Violation]:
    """The default-domain opset is at least the profile's."""
    p = ix.profile
    if ix.opset >= p.opset:
        return []
    msg = f"the model imports opset {ix.opset}; target {p.name} needs ≥ {p.opset} (Q/DQ with float16/bfloat16 scales"
    skipped = "; the strongly-typed checks were skipped" if p.backend == "trt" else ""
    return [Violation("opset", "graph", f"{msg} need 19): re-export with opset_version={p.opset}{skipped}")]


def _float_inputs(ix: GraphIndex, ft: int) -> list[Violation]:
    out = []
    for n in _ops(ix, *_QDQ, *_TYPED_OPS):
        names = n.input[1:2] if n.op_type in _QDQ else [x for x in n.input if x]
        bad = [f"{x} ({_tname(ix.types[x])})" for x in names if ix.types.get(x) in _FLOATS and ix.types[x] != ft]
        if bad:
            what = "scale" if n.op_type in _QDQ else "float inputs"
            msg = f"{what} {bad} must be {_tname(ft)}, the float type of target {ix.profile.name}"
            out.append(_at("strongly-typed", n, msg + ": cast them (or re-export in that type)"))
    return out


def _timestep_region(ix: GraphIndex, ft: int) -> tuple[set[int], set[str]]:
    """Nodes (ids) and tensors computing from the graph input 'timestep', up to its Cast to the float type."""
    tensors, nodes, fixed = ({"timestep"} if "timestep" in ix.inputs else set()), set(), set(ix.constants)
    for n in ix.nodes:  # topological order
        if all(x in fixed for x in n.input if x):
            fixed.update(n.output)  # computed from constants only (e.g. a weight DQ)
        if not any(x in tensors for x in n.input):
            continue
        if any(x not in tensors and x not in fixed and ix.types.get(x) in _FLOATS for x in n.input if x):
            continue  # mixes with a float activation: not the embedding any more
        nodes.add(id(n))
        if not (n.op_type == "Cast" and _attr(n, "to") == ft):
            tensors.update(n.output)
    return nodes, tensors


def _float32_tensors(ix: GraphIndex, ft: int) -> list[Violation]:
    region_nodes, region = _timestep_region(ix, ft)
    out, seen = [], set()
    for name, dtype in ix.types.items():
        users, p = ix.consumers.get(name, []), ix.producers.get(name)
        if dtype != FLOAT or name in region or (not users and name not in ix.outputs):
            continue
        if name in ix.inputs and all(c.op_type == "Cast" for c, _ in users):
            continue
        if name in ix.outputs and p is not None and p.op_type == "Cast":
            continue
        exempt = (id(c) in region_nodes or (c.op_type, s) in _FLOAT32_PARAMS or (c.op_type in _QDQ and s == 1)
                  for c, s in users)  # fmt: skip
        where = _label(p) if p is not None else name
        if (users and name not in ix.outputs and all(exempt)) or where in seen:
            continue
        seen.add(where)
        msg = f"tensor {_source(ix, name)} is float32 in a {_tname(ft)} graph; float32 is allowed only in the timestep"
        out.append(Violation("strongly-typed", where, f"{msg} embedding and at graph inputs/outputs next to a Cast"))
    return out


def rule_strongly_typed(ix: GraphIndex) -> list[Violation]:
    """TensorRT strongly typed: strict inference passes, every float is the profile's type (bar the exceptions)."""
    p = ix.profile
    if p.backend != "trt" or ix.opset < p.opset:
        return []  # below the profile's opset rule_opset reports; inference at the wrong opset is moot
    ft, out = _FLOAT_TYPE[p.float_type], []
    if ix.inference_error:
        m = re.search(r"node name: ([^)]*)\)", ix.inference_error)
        msg = f"strict shape/type inference fails: {ix.inference_error.splitlines()[0][:300]}"
        out.append(Violation("strongly-typed", m.group(1) if m else "graph", msg + "; make the tensor types agree"))
    out += _float_inputs(ix, ft)
    if p.float_type != "float32":
        out += _float32_tensors(ix, ft)
    return out


RULES = (rule_opset, rule_qdq_type, rule_zero_point, rule_qdq_constant, rule_qdq_pair, rule_qdq_shared,
         rule_per_channel, rule_quantized_input, rule_residual_add, rule_conv_output, rule_strongly_typed)  # fmt: skip


def lint_model(model: onnx.ModelProto, target: str) -> list[Violation]:
    """Every violation of target's rules in the model's top-level graph; [] when it is clean."""
    ix = index_graph(model, get_profile(target))
    return [v for rule in RULES for v in rule(ix)]


_FUSED = {"QLinearConv": (1, 2, 4, 5, 6, 7, 8), "QGemm": (1, 2, 4, 5, 6, 7, 8), "MatMulIntegerToFloat": (2, 3, 4, 5, 6)}


def lint_single_engine(model: onnx.ModelProto, tables: dict[str, np.ndarray], target: str = "ort-cpu") -> dict:
    """The single engine's graph (runtime.single_engine): every per-group input only ever sets a quantization
    parameter (a Q/DQ scale or zero point, a b-bit Clip's bounds, a fused kernel's scale, zero point or bias),
    every float Conv/Gemm/MatMul with a quantized weight was fused, and each group's instance (its table rows
    substituted as constants) passes `target`'s rules. Returns {"graph": [...], group index: [...]} of
    violations as dicts."""
    from onnx import numpy_helper

    ix = index_graph(model, get_profile(target))
    graph = []
    for name in tables:
        for node, slot in ix.consumers.get(name, []):
            ok = slot in (1, 2) if node.op_type in (*_QDQ, "Clip") else slot in _FUSED.get(node.op_type, ())
            ok = ok or (node.op_type == "DequantizeLinear" and slot == 0 and tables[name].dtype == np.int32
                        and all(_nbits_bias(ix, c, s) for c, s in ix.consumers.get(node.output[0], [])))  # fmt: skip
            if not ok:
                msg = f"per-group input {name} feeds input {slot} of {node.op_type}, not a quantization parameter"
                graph.append(_at("single-engine", node, msg + "; only scales, zero points and biases may vary"))
    for n in _ops(ix, *_QUANT_OPS):
        w = n.input[1] if len(n.input) > 1 else ""
        if _produced_by(ix, w, "DequantizeLinear") is not None:
            graph.append(_at("single-engine", n, "a quantized layer left unfused; it would run in float with "
                             "per-group scales: fuse it (runtime.single_engine.fuse_integer_layers)"))  # fmt: skip
    out: dict = {"graph": [dataclasses.asdict(v) for v in graph]}
    for g in range(len(next(iter(tables.values()))) if tables else 0):
        instance = onnx.ModelProto()
        instance.CopyFrom(model)
        del instance.graph.input[:]
        instance.graph.input.extend(i for i in model.graph.input if i.name not in tables)
        instance.graph.initializer.extend(numpy_helper.from_array(t[g], k) for k, t in tables.items())
        out[g] = [dataclasses.asdict(v) for v in lint_model(instance, target)]
    return out


def _load_qdq_params(model: onnx.ModelProto, root: Path) -> None:
    """Read just the Q/DQ scales and zero points that live in external data (a few bytes each)."""
    names = {x for n in model.graph.node if n.op_type in _QDQ for x in n.input[1:3]}
    for t in model.graph.initializer:
        if t.name in names and t.data_location == TensorProto.EXTERNAL:
            external_data_helper.load_external_data_for_tensor(t, str(root))


def lint_bundle(bundle_dir: str | Path, target: str | None = None) -> dict:
    """Lint every group graph of a bundle (default target: the bundle's own); weights stay on disk."""
    from runtime.bundle import load_bundle

    if target is not None:
        get_profile(target)  # ConfigError naming the allowed targets, before any file is read
    bundle = load_bundle(bundle_dir)
    target = target or bundle.manifest["target"]
    groups = {}
    for entry in bundle.manifest["groups"]:
        model = bundle.group_model(entry["id"])
        _load_qdq_params(model, bundle.root)
        groups[entry["id"]] = [dataclasses.asdict(v) for v in lint_model(model, target)]
    total = sum(len(v) for v in groups.values())
    report = {"bundle": str(bundle.root), "target": target, "groups": groups, "violations": total}
    shared = bundle._single_groups(None) if target == "ort-cpu" else {}
    for ids in {tuple(v) for v in shared.values()}:
        from runtime.single_engine import single_graph

        graph, tables = single_graph(bundle, list(ids))
        _load_qdq_params(graph, bundle.root)
        found = lint_single_engine(graph, tables, target)
        report.setdefault("single_engines", {})[",".join(map(str, ids))] = found
        report["violations"] += sum(len(v) for v in found.values())
    if get_profile(target).backend == "trt":
        report["trt_refit"] = trt_refit_report(bundle)
    return report


def trt_refit_report(bundle) -> dict:
    """{"g1,g2,…": "refit" or why not} for each precision with several groups: whether one TensorRT plan can
    serve them by refitting its Q/DQ scales (runtime.trt_refit). Not a violation: `dqc build` falls back to a
    plan per group."""
    from runtime.tensorrt import BuildError
    from runtime.trt_refit import precision_groups, refit_tables

    out = {}
    for ids in precision_groups(bundle):
        if len(ids) > 1:
            try:
                _, tables = refit_tables(bundle, ids)
                out[",".join(map(str, ids))] = f"refit: {len(tables)} Q/DQ scales per group"
            except BuildError as e:
                out[",".join(map(str, ids))] = f"per-group: {e}"
    return out
