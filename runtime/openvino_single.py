"""One OpenVINO compiled model for all timestep groups of a precision (runtime.single_engine does this for ONNX
Runtime).

OpenVINO runs a Q/DQ pair in int8 only when its scale and zero point are constants: a FakeQuantize with
run-time ranges stays float (measured 6× slower, docs/RESULTS.md issue 23). So group g's activation quantizer is
written as group 0's constant one applied to an affinely mapped input, exact in the integers because z_g − z_0
is one:

    Q_0(x·s_0/s_g + (z_g − z_0)·s_0) = clamp(⌊x/s_g⌉ + z_g) = Q_g(x),
    s_g·(q − z_g) = a·s_0·(q − z_0) + c,   a = s_g/s_0,   c = s_g·(z_0 − z_g).

A Conv, MatMul or Gemm reading the pair carries the affine map to its output, W·(a·D + c) = a·(W·D) + c·ΣW, so
the constant Q/DQ stays in front of the layer (OpenVINO fuses it into an int8 kernel over weights packed once)
and the layer is followed by a multiply by a and an add of c·ΣW + b_g. That holds at every output position only
if every input position holds a·D + c: a Conv's zero padding is made explicit in front of the map (a padded 0
maps to code z_g, group g's zero). Any other reader of the pair gets a·D + c itself. The per-group values (s_0/s_g,
(z_g − z_0)·s_0, a, c, c·ΣW + b_g, and any other initializer that differs between the groups, e.g. the b-bit Clip
bounds) are inputs of the one graph, set per call.

Outputs differ from the per-group graphs only where x·(s_0/s_g)/s_0 and x/s_g round to different sides of a
code boundary in float32, and by the float reassociation of a·(W·D); tests/test_openvino_single.py bounds both.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BundleError

_LINEAR = ("Conv", "MatMul", "Gemm")


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _key(node) -> str:
    """A node's identity across reads of the graph (protobuf hands out new wrapper objects): its first output."""
    return node.output[0]


def dequantized(node, array) -> np.ndarray:
    """The float tensor a DequantizeLinear of constants computes, (w − zero point)·scale along its axis, in float64
    (exact for float32 scales: rounded to float32 it equals the float32 arithmetic); `array(name)` reads a value."""
    w = array(node.input[0]).astype(np.float64)
    scale = array(node.input[1]).astype(np.float64)
    zero = array(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    if np.ndim(scale):
        axis = _attr(node, "axis", 1) % w.ndim
        shape = [-1 if d == axis else 1 for d in range(w.ndim)]
        scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
    return (w - zero) * scale


def affine_graph(bundle, groups: list[int]):
    """(ModelProto with its weights inline, tables) serving every group in `groups` on OpenVINO: group
    `groups[0]`'s graph rewritten as the module docstring says; `tables` holds the graph's per-group inputs,
    {name: float array [G, ...]} in the order of `groups`. Raises BundleError where the groups differ in more
    than their constants, or an activation quantizer is not per-tensor."""
    from onnx import helper, numpy_helper

    from runtime.single_engine import varying_initializers

    _, differ, values = varying_initializers(bundle, groups)
    differ = set(differ)
    model = bundle.group_model(groups[0], load_weights=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    cache: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = numpy_helper.to_array(inits[name])
        return cache[name]

    def per_group(name: str) -> list[np.ndarray]:
        return [v[name][0] if name in differ else array(name) for v in values]

    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, list[tuple[object, int]]] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, []).append((n, i))

    def constant_weight(name: str):
        """The DequantizeLinear of constant, group-independent weights that produces `name`, or None."""
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        if any(i not in inits or i in differ for i in dq.input if i):
            return None
        return dq

    pairs = []  # (Q node, its DQ nodes)
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or not set(q.input[1:]) & differ:
            continue
        dqs = [n for n, _ in readers.get(q.output[0], [])]
        if not dqs or any(d.op_type != "DequantizeLinear" or list(d.input[1:]) != list(q.input[1:]) for d in dqs):
            raise BundleError(
                f"{bundle.root}: quantizer {q.name or q.output[0]} is not read by DequantizeLinear "
                "nodes with its own scale and zero point; one OpenVINO engine cannot serve its groups"
            )
        if any(i not in inits for i in q.input[1:] if i) or array(q.input[1]).size != 1:
            raise BundleError(f"{bundle.root}: activation quantizer {q.name or q.output[0]} is not per-tensor; "
                              "one OpenVINO engine needs per-tensor activation scales")  # fmt: skip
        pairs.append((q, dqs))

    tables: dict[str, np.ndarray] = {}
    new_inits: list = []
    folded_bias: set[str] = set()
    plans: dict[str, list] = {}  # Q node -> nodes to emit in its place
    rewritten: dict[str, list] = {}  # layer node -> nodes to emit in its place
    skip: set[str] = set()

    def const(name: str, value) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def table(name: str, rows: list) -> str:
        tables[name] = np.stack([np.asarray(r, np.float32) for r in rows])
        return name

    for q, dqs in pairs:
        tag = q.output[0]
        s = [float(np.asarray(v).reshape(())) for v in per_group(q.input[1])]
        zname = q.input[2] if len(q.input) > 2 and q.input[2] else None
        z = [float(np.asarray(v).reshape(())) for v in per_group(zname)] if zname else [0.0] * len(groups)
        a = [s[g] / s[0] for g in range(len(groups))]
        c = [s[g] * (z[0] - z[g]) for g in range(len(groups))]
        m_in = table(f"{tag}/ov_m", [s[0] / s[g] for g in range(len(groups))])
        k_in = table(f"{tag}/ov_k", [(z[g] - z[0]) * s[0] for g in range(len(groups))])
        a_in = None
        emit: list = []
        chains: dict[tuple | None, str] = {}

        def chain(pads: tuple | None, q=q, tag=tag, m_in=m_in, k_in=k_in, emit=emit, chains=chains) -> str:
            """group 0's Q/DQ on the mapped input (padded first for a Conv with `pads`); its output name."""
            if pads in chains:
                return chains[pads]
            key = "" if pads is None else "_p" + "_".join(map(str, pads))
            src = q.input[0]
            if pads is not None:
                nd = len(pads) // 2
                full = [0, 0, *pads[:nd], 0, 0, *pads[nd:]]
                emit.append(helper.make_node("Pad", [src, const(f"{tag}/ov_pads{key}", np.array(full, np.int64)),
                                                     const(f"{tag}/ov_zero{key}", np.float32(0))],
                                             [f"{tag}/ov_padded{key}"]))  # fmt: skip
                src = f"{tag}/ov_padded{key}"
            emit.append(helper.make_node("Mul", [src, m_in], [f"{tag}/ov_scaled{key}"]))
            emit.append(helper.make_node("Add", [f"{tag}/ov_scaled{key}", k_in], [f"{tag}/ov_mapped{key}"]))
            params = list(q.input[1:])  # group 0's constant scale and zero point
            emit.append(helper.make_node("QuantizeLinear", [f"{tag}/ov_mapped{key}", *params], [f"{tag}/ov_q{key}"]))
            emit.append(helper.make_node("DequantizeLinear", [f"{tag}/ov_q{key}", *params], [f"{tag}/ov_dq{key}"]))
            chains[pads] = f"{tag}/ov_dq{key}"
            return chains[pads]

        others, outputs = [], []
        for d in dqs:
            skip.add(_key(d))
            if d.output[0] in graph_outputs:
                outputs.append(d.output[0])
            for node, idx in readers.get(d.output[0], []):
                weight = constant_weight(node.input[1]) if idx == 0 and len(node.input) > 1 else None
                linear = node.op_type in _LINEAR and weight is not None
                if node.op_type == "Conv":
                    linear = linear and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
                if node.op_type == "Gemm":
                    linear = linear and not _attr(node, "transA", 0)
                if node.op_type == "MatMul":
                    linear = linear and array(weight.input[0]).ndim == 2
                if not linear:
                    others.append((node, idx))
                    continue
                if _key(node) in rewritten:
                    raise BundleError(f"{bundle.root}: layer {node.name} reads two group-dependent quantizers")
                a_in = a_in or table(f"{tag}/ov_a", a)
                w = dequantized(weight, array)
                bias_name = node.input[2] if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 else ""
                if node.op_type == "Conv":
                    pads = tuple(int(p) for p in _attr(node, "pads", []) or [])
                    src = chain(pads if any(pads) else None)
                    sums = w.sum(axis=tuple(range(1, w.ndim)))
                    shape = [1, -1] + [1] * (w.ndim - 2)
                    scale = 1.0
                elif node.op_type == "MatMul":
                    src, sums, shape, scale = chain(None), w.sum(axis=0), [-1], 1.0
                else:
                    src = chain(None)
                    sums = w.sum(axis=1) if _attr(node, "transB", 0) else w.sum(axis=0)
                    shape, scale = [-1], float(_attr(node, "alpha", 1.0))
                beta = float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
                bias = [np.zeros_like(sums)] * len(groups)
                if bias_name:
                    bdq = producer.get(bias_name)
                    if bias_name in inits:
                        bias = [array(bias_name).astype(np.float64) * beta for _ in groups]
                    elif bdq is not None and bdq.op_type == "DequantizeLinear" and len(readers[bias_name]) == 1 and all(
                        i in inits for i in bdq.input if i
                    ):  # fmt: skip
                        bias = []
                        for v in values:

                            def group_array(n, v=v):
                                return v[n][0] if n in differ else array(n)

                            bias.append(dequantized(bdq, group_array).reshape(-1) * beta)
                        folded_bias.add(_key(bdq))
                    else:
                        raise BundleError(f"{bundle.root}: the bias of {node.name} is neither a constant nor its own "
                                          "dequantized integer tensor; one OpenVINO engine cannot fold it")  # fmt: skip
                cb = table(f"{node.output[0]}/ov_cb",
                           [(scale * c[g] * sums + bias[g]).reshape(shape) for g in range(len(groups))])  # fmt: skip
                layer = helper.make_node(node.op_type, [src, node.input[1]], [f"{node.output[0]}/ov_int"],
                                         name=node.name)  # fmt: skip
                for at in node.attribute:
                    if at.name in ("pads", "beta"):
                        continue
                    layer.attribute.append(at)
                rewritten[_key(node)] = [
                    layer,
                    helper.make_node("Mul", [f"{node.output[0]}/ov_int", a_in], [f"{node.output[0]}/ov_scaled"]),
                    helper.make_node("Add", [f"{node.output[0]}/ov_scaled", cb], [node.output[0]]),
                ]
        if others or outputs:  # readers that are not linear in the pair, and graph outputs: a·D + c itself
            a_in = a_in or table(f"{tag}/ov_a", a)
            c_in = table(f"{tag}/ov_c", c)
            src = chain(None)
            emit.append(helper.make_node("Mul", [src, a_in], [f"{tag}/ov_back_scaled"]))
            emit.append(helper.make_node("Add", [f"{tag}/ov_back_scaled", c_in], [f"{tag}/ov_back"]))
            for node, idx in others:
                node.input[idx] = f"{tag}/ov_back"
            emit.extend(helper.make_node("Identity", [f"{tag}/ov_back"], [name]) for name in outputs)
        plans[_key(q)] = emit

    nodes = []
    for n in graph.node:
        if _key(n) in skip or _key(n) in folded_bias:
            continue
        nodes.extend(plans.get(_key(n), rewritten.get(_key(n), [n])))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    handled = {i for q, _ in pairs for i in q.input[1:] if i}
    rest = sorted((differ & used) - handled)  # e.g. the b-bit Clip bounds: run-time inputs as they are
    for name in rest:
        tables[name] = np.stack([np.asarray(v[name][0]) for v in values])
    keep = [t for t in graph.initializer if t.name in used and t.name not in rest]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for name, t in tables.items():
        graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(t.dtype),
                                                         list(t.shape[1:])))  # fmt: skip
    model.doc_string = f"dqc one OpenVINO engine for groups {groups}: {len(pairs)} group-dependent quantizers"
    if model.ByteSize() > 2**31 - 2**24:  # handed to OpenVINO as one serialized graph: protobuf's 2 GiB limit
        raise BundleError(f"{bundle.root}: the one graph for groups {groups} would pass 2 GiB with its weights "
                          "inline; its groups run on one compiled model each")  # fmt: skip
    return model, tables


class GraphSource:
    """The one graph for OpenVinoEngine: its serialized bytes until the first read, and rebuilt by `rebuild()` (a
    ModelProto) at any later read (a profile). The bytes hold every int8 weight inline; once OpenVINO has compiled
    them the engine has no use for them, and keeping them would cost a second copy of the weights."""

    def __init__(self, data: bytes, rebuild) -> None:
        self.data, self.rebuild = data, rebuild

    def __call__(self) -> bytes:
        data, self.data = self.data, None
        return data if data is not None else self.rebuild().SerializeToString()


class OpenVinoSingle:
    """One compiled model for `groups`; `for_group(g)` is the Engine of group g's timesteps (its inputs set per
    call)."""

    def __init__(self, engine, tables: dict[str, np.ndarray], groups: list[int]) -> None:
        self.engine, self.groups, self.spec = engine, list(groups), engine.spec
        # np.array, not np.ascontiguousarray: a 0-d value stays 0-d, the shape of the graph's input
        self.params = {g: {k: np.array(t[i], copy=True) for k, t in tables.items()} for i, g in enumerate(groups)}
        self._bound: int | None = None

    def infer(self, group: int, sample, timestep, cond=None) -> np.ndarray:
        from runtime.engine import EngineError

        if group not in self.params:
            raise EngineError(f"{self.engine.name}: no group {group} (this engine serves {self.groups})")
        if self._bound != group:
            self.engine.bind(self.params[group])
            self._bound = group
        return self.engine.infer(sample, timestep, cond)

    def for_group(self, group: int) -> OpenVinoGroup:
        return OpenVinoGroup(self, group)


class OpenVinoGroup:
    """The Engine of one group of an OpenVinoSingle: the same compiled model, that group's inputs."""

    def __init__(self, single: OpenVinoSingle, group: int) -> None:
        self.single, self.group, self.spec = single, group, single.spec
        self.prompt = None

    @property
    def name(self) -> str:
        return f"{self.single.engine.name} (group {self.group})"

    def infer(self, sample, timestep, cond=None) -> np.ndarray:
        return self.single.infer(self.group, sample, timestep, cond)

    def profile(self, sample, timestep, cond=None, runs: int = 5) -> dict:
        """OpenVINO's per-node counters of the shared model with this group's inputs (OpenVinoEngine.profile)."""
        return self.single.engine.profile(sample, timestep, cond, runs, params=self.single.params[self.group])

    def __getattr__(self, name: str):  # threads, execution_precision, config, weights: the shared model's
        if name in ("single", "group", "spec", "prompt"):
            raise AttributeError(name)
        return getattr(self.single.engine, name)
