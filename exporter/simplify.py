"""Passes: fold the shape arithmetic of a graph exported with a dynamic batch, and inline the If nodes whose
condition is a shape fact.

    x ─► Shape ─► Gather ─► Unsqueeze ─┐
                      (constants) ─────┴► Concat ─► Reshape(x, ·)      becomes      Reshape(x, [0, 8, 4096])
    q ─► Shape ─► Slice ─► Cast ─► Sqrt ─► Div ─► Mul(scores, ·)       becomes      Mul(scores, 0.0625)

The TorchScript exporter computes every Reshape target, and values like attention's 1/√d, from tensors'
runtime shapes (Shape → Gather/Slice → …), because the batch is dynamic. The pass runs the graph at several
batch sizes and reads every value computed from shapes and constants alone: one that is the same at every
batch becomes a constant; a Reshape target that differs only in its first entry, which is the batch and the
input's own first dimension, becomes a constant with 0 there (Reshape copies input dimension 0 for a 0 when
allowzero = 0). The shape subgraphs left without consumers are removed. ONNX Runtime then runs a few hundred
nodes fewer per call and can fuse what the constants feed (MatMul with its scale).

    Shape(x) ─► Gather(1) ─► Equal(·, 1) ─► If ─┬ then: Squeeze(x, 1)      becomes      Identity(x)
                                                └ else: Identity(x)

`squeeze(dim)` on a dimension the exporter cannot see (diffusers' PixArt output) becomes an If on the runtime
size; ONNX Runtime type-checks both branches when it loads the graph and refuses the Squeeze of a dimension it
knows is not 1. The pass evaluates each If condition computed from shapes alone (on a graph holding only the
nodes that compute it, which loads), and where it is the same at every batch puts the taken branch in the If's
place.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

_BATCHES = (1, 2, 3)


def _shape_region(g: onnx.GraphProto, constants: set[str]) -> list[onnx.NodeProto]:
    """Shape nodes and the nodes computed from their outputs and constants alone, in graph order."""
    known, region = set(constants), []
    for node in g.node:
        ins = [x for x in node.input if x]
        if node.op_type == "Shape" or (
            node.op_type != "Constant" and ins and all(x in known for x in ins) and any(x not in constants for x in ins)
        ):
            region.append(node)
            known.update(node.output)
    return region


def _run(model: onnx.ModelProto, names: list[str], batches: tuple[int, ...]) -> list[list[np.ndarray]]:
    """The values of `names` when the graph runs at each batch size (random float inputs, zero integer
    inputs); one session, the model's outputs replaced by `names` while it is built."""
    import onnxruntime as ort

    from exporter.large_model import ort_session
    from runtime.engine import session_options

    opts = session_options(ort, optimize=False)  # keep every tensor as named
    opts.log_severity_level = 3
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    try:
        session = ort_session(model, opts)
    finally:
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    runs = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        feeds = {}
        for inp in session.get_inputs():
            shape = [batch if not isinstance(d, int) else d for d in inp.shape]
            if inp.type == "tensor(float)":
                feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
            else:
                feeds[inp.name] = np.zeros(shape, np.int64 if inp.type == "tensor(int64)" else np.int32)
        runs.append(session.run(names, feeds))
    return runs


def inline_shape_ifs(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (changed in place) with each If whose condition is computed from shapes and constants alone, and
    is the same at batches 1, 2, 3, replaced by the nodes of the branch it takes."""
    g = model.graph
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    made = {o for n in _shape_region(g, constants) for o in n.output}
    ifs = [n for n in g.node if n.op_type == "If" and n.input[0] in made]
    if not ifs:
        return model
    conds = list(dict.fromkeys(n.input[0] for n in ifs))
    runs = _run(_cone(model, conds), conds, _BATCHES)
    taken = {}
    for i, name in enumerate(conds):
        values = {bool(np.asarray(r[i]).reshape(-1)[0]) for r in runs}
        if len(values) == 1:
            taken[name] = values.pop()
    nodes = []
    for node in g.node:
        if node.op_type == "If" and node.input[0] in taken:
            branch = next(
                a.g for a in node.attribute if a.name == ("then_branch" if taken[node.input[0]] else "else_branch")
            )
            nodes.extend(_inlined(g, node, branch))
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    _drop_dead(g)
    return model


def _cone(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A model of the nodes (and initializers) that compute `names` from the graph inputs, nothing else."""
    g = model.graph
    needed, keep = set(names), []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(x for x in node.input if x)
    graph = onnx.helper.make_graph(list(reversed(keep)), "cone", list(g.input), [],
                                   [t for t in g.initializer if t.name in needed])  # fmt: skip
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _inlined(g: onnx.GraphProto, node: onnx.NodeProto, branch: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The branch's nodes computing the If's outputs: its own tensors renamed under the If's name, its outputs
    renamed to the If's, its initializers moved to the graph."""
    prefix = f"{node.name or node.output[0]}/"
    rename = {t.name: prefix + t.name for t in branch.initializer}
    rename |= {o: prefix + o for n in branch.node for o in n.output if o}
    rename |= {out.name: mine for out, mine in zip(branch.output, node.output, strict=True) if out.name in rename}
    for t in branch.initializer:
        moved = onnx.TensorProto()
        moved.CopyFrom(t)
        moved.name = rename[t.name]
        g.initializer.append(moved)
    nodes = []
    for n in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = prefix + n.name
        copy.input[:] = [rename.get(x, x) for x in n.input]
        copy.output[:] = [rename.get(x, x) for x in n.output]
        nodes.append(copy)
    for out, mine in zip(branch.output, node.output, strict=True):  # a branch that returns an outer tensor as is
        if out.name not in rename:
            nodes.append(onnx.helper.make_node("Identity", [out.name], [mine], name=prefix + "identity_" + mine))
    return nodes


def _batch_dim_first(shapes: dict, tensor: str) -> bool:
    v = shapes.get(tensor)
    dims = v.type.tensor_type.shape.dim if v is not None and v.type.tensor_type.HasField("shape") else []
    return bool(dims) and bool(dims[0].dim_param) and not dims[0].HasField("dim_value")


def fold_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with its batch-independent shape values constant and its batch-preserving Reshape
    targets [0, d1, …]; idempotent. A model past the protobuf limit is changed in place (no second copy of
    its weights)."""
    from exporter.large_model import fits_in_protobuf, infer_shapes

    if fits_in_protobuf(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = model
    g = out.graph
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    region = _shape_region(g, constants)
    made = {o for n in region for o in n.output}
    inside = {id(n) for n in region}
    outside = {}  # tensor → its consumers outside the region
    for node in g.node:
        if id(node) not in inside:
            for k, x in enumerate(node.input):
                if x in made:
                    outside.setdefault(x, []).append((node, k))
    wanted = sorted(outside)
    if not wanted:
        return out
    runs = _run(out, wanted, _BATCHES)
    inferred = infer_shapes(out).graph
    shapes = {v.name: v for v in (*inferred.value_info, *inferred.input)}
    for i, name in enumerate(wanted):
        values = [np.asarray(r[i]) for r in runs]
        constant = _constant(values, outside[name], shapes)
        if constant is None:
            continue
        tensor = numpy_helper.from_array(constant, f"{name}/folded")
        g.initializer.append(tensor)
        for node, k in outside[name]:
            node.input[k] = tensor.name
    _drop_dead(g)
    return out


def _constant(values: list[np.ndarray], uses: list, shapes: dict) -> np.ndarray | None:
    """The constant that can stand for a shape value seen at every batch, or None."""
    first = values[0]
    if all(v.shape == first.shape and v.dtype == first.dtype and np.array_equal(v, first) for v in values[1:]):
        return first

    # a Reshape target [B, d1, …] whose B is the batch the input carries in its own first dimension
    def batch_preserving(node: onnx.NodeProto, k: int) -> bool:
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        return node.op_type == "Reshape" and k == 1 and not allowzero and _batch_dim_first(shapes, node.input[0])

    reshape_only = all(batch_preserving(node, k) for node, k in uses)
    if not reshape_only or first.ndim != 1 or first.dtype != np.int64:
        return None
    if not all(v.shape == first.shape and np.array_equal(v[1:], first[1:]) and v[0] == b
               for v, b in zip(values, _BATCHES, strict=True)):  # fmt: skip
        return None
    return np.concatenate([[0], first[1:]]).astype(np.int64)


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (the orphaned shape computations) and unused initializers."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(x for x in node.input if x)
            needed.update(_subgraph_reads(node))  # an If / Loop body reads outer tensors by name
    del g.node[:]
    g.node.extend(reversed(keep))
    used = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The tensor names the node's subgraphs (If branches, Loop / Scan bodies) read, at any depth."""
    names: set[str] = set()
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for n in sub.node:
                names.update(x for x in n.input if x)
                names.update(_subgraph_reads(n))
    return names
