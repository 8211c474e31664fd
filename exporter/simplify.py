"""Pass: static Reshape targets in a graph exported with a dynamic batch.

    x ─► Shape ─► Gather ─► Unsqueeze ─┐
                      (constants) ─────┴► Concat ─► Reshape(x, ·)      becomes      Reshape(x, [0, 8, 4096])

The TorchScript exporter computes every Reshape target from the input's runtime shape (Shape → Gather →
Unsqueeze → Concat), because the batch is dynamic. Where ONNX shape inference (with data propagation) knows
every output dimension but the first, and the first is the input's own batch dimension, the target is a
constant with 0 in front (Reshape copies input dimension 0 for a 0 when allowzero = 0). The shape subgraphs
left without consumers are removed. ONNX Runtime then runs a few hundred nodes fewer per call, which is a
large share of a small model's time at batch 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def _dims(value_info: onnx.ValueInfoProto | None) -> list | None:
    if value_info is None or not value_info.type.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in value_info.type.tensor_type.shape.dim
    ]


def static_reshapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose batch-preserving Reshapes have constant targets; idempotent."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {v.name: v for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    constants = {t.name for t in g.initializer}
    for node in g.node:
        if node.op_type != "Reshape" or node.input[1] in constants:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        src, dst = _dims(shapes.get(node.input[0])), _dims(shapes.get(node.output[0]))
        if not src or not dst or not isinstance(src[0], str) or dst[0] != src[0]:
            continue
        if not all(isinstance(d, int) and d > 0 for d in dst[1:]):
            continue
        target = numpy_helper.from_array(np.array([0, *dst[1:]], np.int64), f"{node.output[0]}/static_shape")
        g.initializer.append(target)
        constants.add(target.name)
        node.input[1] = target.name
    _drop_dead(g)
    return out


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (the orphaned shape computations) and unused initializers."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(x for x in node.input if x)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)
