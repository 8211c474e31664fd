"""Pass: insert Q/DQ pairs and integer weights into a float ONNX graph, with calibrated scales.

    before:   x ──► Conv(W, B) ──► y                    (W, B float initializers)
    after:    x ─► Q ─► DQ ─► Conv ─► Q ─► DQ ─► y       (ort-cpu: output Q/DQ on convs)
                              ▲   ▲
              W_int8 ─► DQ ───┘   └── DQ ◄─ B_int32      (per-channel axis 0; bias scale s_x·s_w)

Linear layers (Gemm with transB=1, or MatMul with a [in, out] constant) get the input Q/DQ and the weight
DQ; their outputs stay float unless the profile says otherwise. The pass decides every edit first,
then applies them; a node whose weight already comes from a DequantizeLinear is left alone
(idempotent). Nodes are matched to torch layers by the exporter's scope names ("/unet/<path>/<Op>").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from calibration.profiles import TargetProfile
from calibration.quantizers import ActParams
from runtime.errors import ExportError

QUANT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerQuant:
    """Everything the pass needs for one layer: integer weights and the activation quantizers."""

    op: str  # "conv" | "linear"
    w_int: np.ndarray  # int8, torch layout: conv (O, I, kh, kw), linear (O, I)
    w_scale: np.ndarray  # float32 (O,)
    act_in: ActParams
    act_out: ActParams | None
    bias_int: np.ndarray | None  # int32 (O,) when the profile quantizes the bias
    bias_scale: np.ndarray | None
    shares: str | None = None  # the earlier layer that reads the same input tensor (one Q/DQ for both)


def layer_name(node: gs.Node, scope: str = "unet") -> str:
    """'/unet/down_blocks.0/resnets.0/conv1/Conv' → 'down_blocks.0.resnets.0.conv1'."""
    parts = node.name.strip("/").split("/")
    if len(parts) < 3 or parts[0] != scope:
        return ""
    return ".".join(parts[1:-1])


def _act_type(p: ActParams) -> type:
    return np.uint8 if p.qmin >= 0 else np.int8


_CONTAINER = {np.uint8: (0, 255), np.int8: (-128, 127)}


def _clip(x: gs.Tensor, p: ActParams, name: str, out: gs.Variable | None = None) -> tuple[gs.Node, gs.Variable]:
    """Float Clip to the b-bit grid's end points (q_min − z)·s and (q_max − z)·s: exact grid values, so
    Q(Clip(x)) = clamp(⌊x/s⌉ + z, q_min, q_max), the b-bit quantizer, inside an 8-bit container."""
    lo = np.array((p.qmin - p.zero_point) * p.scale, dtype=np.float32)
    hi = np.array((p.qmax - p.zero_point) * p.scale, dtype=np.float32)
    y = out if out is not None else gs.Variable(f"{name}/clipped", dtype=np.float32)
    node = gs.Node(
        "Clip",
        f"{name}/Clip",
        inputs=[x, gs.Constant(f"{name}/clip_min", lo), gs.Constant(f"{name}/clip_max", hi)],
        outputs=[y],
    )
    return node, y


def _qdq(x: gs.Tensor, p: ActParams, name: str, out: gs.Variable | None = None) -> tuple[list[gs.Node], gs.Variable]:
    """Q/DQ pair for an activation. Below 8 bits a Clip restricts the values to the b-bit grid: before the
    Q on a layer input (so DQ → layer → Q still fuses into an integer kernel), after the DQ on a layer
    output (`out` given)."""
    narrow = (p.qmin, p.qmax) != _CONTAINER[_act_type(p)]
    nodes = []
    if narrow and out is None:
        clip, x = _clip(x, p, f"{name}/in")
        nodes.append(clip)
    scale = gs.Constant(f"{name}/scale", np.array(p.scale, dtype=np.float32))
    zp = gs.Constant(f"{name}/zero_point", np.array(p.zero_point, dtype=_act_type(p)))
    q = gs.Variable(f"{name}/q", dtype=_act_type(p))
    dq = out if out is not None and not narrow else gs.Variable(f"{name}/dq", dtype=np.float32)
    nodes += [
        gs.Node("QuantizeLinear", f"{name}/Q", inputs=[x, scale, zp], outputs=[q]),
        gs.Node("DequantizeLinear", f"{name}/DQ", inputs=[q, scale, zp], outputs=[dq]),
    ]
    if narrow and out is not None:
        clip, dq = _clip(dq, p, f"{name}/out", out=out)
        nodes.append(clip)
    return nodes, dq


def _dq_const(name: str, values: np.ndarray, scale: np.ndarray, axis: int) -> tuple[gs.Node, gs.Variable]:
    zp = np.zeros(scale.shape, dtype=values.dtype)
    out = gs.Variable(f"{name}/dq", dtype=np.float32)
    node = gs.Node(
        "DequantizeLinear",
        f"{name}/DQ",
        attrs={"axis": axis},
        inputs=[
            gs.Constant(f"{name}/int", values),
            gs.Constant(f"{name}/scale", scale.astype(np.float32)),
            gs.Constant(f"{name}/zero_point", zp),
        ],
        outputs=[out],
    )
    return node, out


def _weight_layout(node: gs.Node, q: LayerQuant) -> tuple[np.ndarray, int]:
    """Integer weights in the node's own layout and their channel axis; checks the match."""
    w = node.inputs[1]
    if not isinstance(w, gs.Constant):
        raise ExportError(f"node {node.name}: weight input {w.name} is not a constant initializer")
    if node.op == "MatMul":
        w_int, axis = q.w_int.T, 1
    else:
        if node.op == "Gemm" and (node.attrs.get("transB", 0) != 1 or node.attrs.get("transA", 0) != 0):
            raise ExportError(f"node {node.name}: Gemm with transA/transB other than (0, 1) is not supported")
        w_int, axis = q.w_int, 0
    fp = np.asarray(w.values, dtype=np.float32)
    if fp.shape != w_int.shape:
        raise ExportError(
            f"node {node.name}: weight shape {fp.shape} does not match the calibrated layer {w_int.shape}"
        )
    shape = [1] * fp.ndim
    shape[axis] = -1
    deq = w_int.astype(np.float32) * q.w_scale.reshape(shape)
    if np.linalg.norm(fp - deq) > 0.5 * np.linalg.norm(fp) + 1e-12:
        raise ExportError(
            f"node {node.name}: calibrated weights do not match the graph's weights; "
            "was the calibration result made from this model?"
        )
    return np.ascontiguousarray(w_int), axis


def plan(graph: gs.Graph, table: dict[str, LayerQuant]) -> tuple[list[tuple[gs.Node, str]], list[dict]]:
    """Decide: which nodes get quantized (with their layer), and which stay float and why."""
    todo, floating = [], []
    for node in graph.nodes:
        if node.op not in QUANT_OPS:
            continue
        name = layer_name(node)
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if node.op == "MatMul" and not isinstance(weight, gs.Constant):
            if isinstance(weight, gs.Variable) and weight.inputs and weight.inputs[0].op == "DequantizeLinear":
                continue  # already quantized
            floating.append(
                {
                    "node": node.name,
                    "op": node.op,
                    "reason": "activation×activation MatMul (attention scores/values): no weight to quantize; "
                    "the ort-cpu profile keeps it float",
                }
            )
        elif isinstance(weight, gs.Variable) and weight.inputs and weight.inputs[0].op == "DequantizeLinear":
            continue
        elif name in table:
            todo.append((node, name))
        else:
            floating.append(
                {
                    "node": node.name,
                    "op": node.op,
                    "reason": f"no calibrated layer named {name!r} (not a torch Conv2d/Linear)",
                }
            )
    return todo, floating


def _same_attrs(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, gs.Constant) or isinstance(vb, gs.Constant):
            if not (isinstance(va, gs.Constant) and isinstance(vb, gs.Constant) and _same_values(va, vb)):
                return False
        elif isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
            if not np.array_equal(va, vb):
                return False
        elif va != vb:
            return False
    return True


def _same_values(a: gs.Constant, b: gs.Constant) -> bool:
    va, vb = np.asarray(a.values), np.asarray(b.values)
    return va.dtype == vb.dtype and va.shape == vb.shape and np.array_equal(va, vb)


def equivalent(a: gs.Tensor, b: gs.Tensor, depth: int = 4) -> bool:
    """Whether two tensors provably hold the same values: one tensor, equal constants, or the same output of
    the same op (equal attributes) on equivalent inputs, looking at most `depth` producers back (each
    resnet's SiLU of the one time embedding is its own node in the exported graph)."""
    if a is b:
        return True
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return isinstance(a, gs.Constant) and isinstance(b, gs.Constant) and _same_values(a, b)
    if depth == 0 or len(a.inputs) != 1 or len(b.inputs) != 1:
        return False
    pa, pb = a.inputs[0], b.inputs[0]
    if (
        pa.op != pb.op
        or pa.domain != pb.domain
        or len(pa.inputs) != len(pb.inputs)
        or not _same_attrs(pa.attrs, pb.attrs)
    ):
        return False
    if [o.name for o in pa.outputs].index(a.name) != [o.name for o in pb.outputs].index(b.name):
        return False
    return all(equivalent(x, y, depth - 1) for x, y in zip(pa.inputs, pb.inputs, strict=True))


def insert_qdq(graph: gs.Graph, table: dict[str, LayerQuant], profile: TargetProfile) -> dict:
    """Quantize every planned node in place; returns {"quantized": [...], "float": [...], "shared_inputs":
    {layer: the layer whose input Q/DQ it reads}}. A layer that shares its input quantizer with an earlier one
    (LayerQuant.shares) and provably reads the same values reads that layer's Q/DQ: one per tensor."""
    todo, floating = plan(graph, table)
    inputs: dict[str, tuple[gs.Tensor, gs.Variable]] = {}  # layer → (its float input, its input DQ's output)
    shared = {}
    for node, name in sorted(todo, key=lambda item: table[item[1]].shares is not None):  # owners first
        q = table[name]
        w_int, axis = _weight_layout(node, q)
        owner = inputs.get(q.shares) if q.shares is not None else None
        if owner is not None and table[q.shares].act_in != q.act_in:
            raise ExportError(f"layer {name}: shares its input quantizer with {q.shares} but their parameters "
                              f"differ ({q.act_in} vs {table[q.shares].act_in}); recalibrate")  # fmt: skip
        if owner is not None and equivalent(owner[0], node.inputs[0]):
            new, x = [], owner[1]
            shared[name] = q.shares
        else:
            new, x = _qdq(node.inputs[0], q.act_in, f"{name}/input")
        inputs[name] = (node.inputs[0], x)
        dq_w, w = _dq_const(f"{name}/weight", w_int, q.w_scale, axis)
        new.append(dq_w)
        node.inputs[0], node.inputs[1] = x, w
        if len(node.inputs) > 2 and q.bias_int is not None:
            dq_b, b = _dq_const(f"{name}/bias", q.bias_int, q.bias_scale, 0)
            new.append(dq_b)
            node.inputs[2] = b
        if q.act_out is not None:
            y = node.outputs[0]
            y_float = gs.Variable(f"{name}/output/float", dtype=np.float32)
            node.outputs[0] = y_float
            out_nodes, _ = _qdq(y_float, q.act_out, f"{name}/output", out=y)
            new.extend(out_nodes)
        graph.nodes.extend(new)
    graph.cleanup().toposort()
    return {"quantized": [{"node": n.name, "op": n.op, "layer": name} for n, name in todo], "float": floating,
            "shared_inputs": shared}  # fmt: skip


def _skip_add(graph: gs.Graph, block: str) -> tuple[gs.Node, int] | None:
    """The block's skip Add (residual + the output of a resnet's conv2 or a transformer block's proj_out) and
    the index of its residual input."""
    convs = (f"{block}.conv2", f"{block}.proj_out")
    for node in graph.nodes:
        if node.op != "Add" or layer_name(node) != block:
            continue
        for i, x in enumerate(node.inputs):
            producer = x.inputs[0] if isinstance(x, gs.Variable) and x.inputs else None
            while producer is not None and producer.op in ("DequantizeLinear", "QuantizeLinear", "Clip"):
                producer = producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None
            if producer is not None and producer.op == "Conv" and layer_name(producer) in convs:
                return node, 1 - i
    return None


def insert_residual_qdq(graph: gs.Graph, residuals: dict[str, ActParams]) -> list[dict]:
    """Q/DQ on the residual input of each block's skip Add (TensorRT fuses Conv + Add with an int8 residual):

        residual ─► Q ─► DQ ─► Add ◄─ conv2 (resnets) or proj_out (transformer blocks) ◄─ …

    `residuals`: {block module path: its quantizer}. Only that edge is quantized (the tensor may feed other
    nodes in float). Idempotent: an Add whose residual input already comes from a DequantizeLinear is left
    alone. Returns the quantized Adds."""
    todo = []
    for resnet, params in residuals.items():
        found = _skip_add(graph, resnet)
        if found is None:
            raise ExportError(f"block {resnet}: no skip Add of its conv2 / proj_out output found in the graph")
        node, i = found
        x = node.inputs[i]
        if isinstance(x, gs.Variable) and x.inputs and x.inputs[0].op == "DequantizeLinear":
            continue
        todo.append((node, i, resnet, params))
    for node, i, resnet, params in todo:
        new, dq = _qdq(node.inputs[i], params, f"{resnet}/residual")
        node.inputs[i] = dq
        graph.nodes.extend(new)
    graph.cleanup().toposort()
    return [{"node": node.name, "op": "Add", "layer": f"{resnet}:residual"} for node, _, resnet, _ in todo]


def _attention_products(graph: gs.Graph, attention: str) -> tuple[gs.Node, gs.Node]:
    """The score product (its output feeds a Softmax) and the value product (it reads that Softmax) of the
    attention module `attention`: its two MatMuls of activations."""
    products = [n for n in graph.nodes if n.op == "MatMul" and layer_name(n) == attention
                and not any(isinstance(x, gs.Constant) for x in n.inputs)]  # fmt: skip
    for scores in products:
        softmax = [c for c in scores.outputs[0].outputs if c.op == "Softmax"]
        if len(softmax) == 1:
            values = [c for c in softmax[0].outputs[0].outputs if c in products]
            if len(values) == 1 and values[0].inputs[0] is softmax[0].outputs[0]:
                return scores, values[0]
    raise ExportError(f"attention {attention}: no MatMul → Softmax → MatMul found in the graph; its attention "
                      "products cannot be quantized")  # fmt: skip


def insert_attention_qdq(graph: gs.Graph, attentions: dict[str, dict[str, ActParams]]) -> list[dict]:
    """Q/DQ on both inputs of each attention's two activation products (what ProductsProcessor models):

        q·√s ─► Q/DQ ─┐                           softmax ─► Q/DQ ─┐
        k·√s ─► Q/DQ ─┴► MatMul ─► Softmax ─►           v ─► Q/DQ ─┴► MatMul

    `attentions`: {attention module path: {"q", "k", "probs", "v": quantizer}}. Idempotent (inputs already
    dequantized are left alone). Returns the quantized MatMuls."""
    done = []
    for attention, params in attentions.items():
        scores, values = _attention_products(graph, attention)
        for node, names in ((scores, ("q", "k")), (values, ("probs", "v"))):
            if any(x.inputs and x.inputs[0].op == "DequantizeLinear" for x in node.inputs):
                continue
            for i, point in enumerate(names):
                new, dq = _qdq(node.inputs[i], params[point], f"{attention}/{point}")
                node.inputs[i] = dq
                graph.nodes.extend(new)
            done.append(
                {"node": node.name, "op": "MatMul", "layer": f"{attention}:{'scores' if node is scores else 'values'}"}
            )
    graph.cleanup().toposort()
    return done
