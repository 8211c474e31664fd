"""One ONNX Runtime session for every timestep group of an `ort-cpu` bundle.

A bundle's group graphs differ only in their activation quantization parameters (the scale and zero point of
each Q/DQ point) and in the int32 biases, whose scale s_x·s_w follows the input scale. The single graph keeps
group 0's structure and every weight as a constant, stacks each initializer that differs between groups into a
table [G, ...], and selects a row with Gather(table, group), `group` being a graph input (an int64 scalar).

ONNX Runtime fuses Q/DQ around Conv, Gemm and MatMul into integer kernels only when their scales are constants,
so the fusion is written out here, into the kernels its own QDQ fusion picks for these graphs:

    Q(x) → DQ → Conv(DQ(W), DQ(B)) → Q      ⇒  QLinearConv(x_q, s_x, z_x, W, s_w, z_w, s_y, z_y, B)
    Q(x) → DQ → Gemm(DQ(W), DQ(B))          ⇒  com.microsoft.QGemm(x_q, s_x, z_x, W, s_w, z_w, B), float out
    Q(x) → DQ → MatMul(DQ(W))               ⇒  com.microsoft.MatMulIntegerToFloat(x_q, W, s_x, s_w, z_x, z_w)

These kernels read their scales and zero points at every call and pack their constant weights once, so one
packed copy of the weights serves every group. The Q and DQ nodes left between the layers take the gathered
parameters as they are.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BundleError

GROUP_INPUT = "group"
MS_DOMAIN = "com.microsoft"


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    for o in graph.output:
        out.setdefault(o.name, []).append(None)
    return out


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def fuse_integer_layers(model) -> dict[str, int]:
    """Rewrite DQ→Conv/Gemm/MatMul(→Q) patterns into explicit integer kernels in place; returns counts."""
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = _consumers(g)

    def dq(name: str):
        n = producer.get(name)
        return n if n is not None and n.op_type == "DequantizeLinear" else None

    counts = {"QLinearConv": 0, "QGemm": 0, "MatMulIntegerToFloat": 0}
    drop: set[int] = set()
    replace: dict[int, object] = {}
    dqs: list = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x_dq, w_dq = dq(node.input[0]), dq(node.input[1])
        b_dq = dq(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if x_dq is None or w_dq is None or len(x_dq.input) < 3 or len(w_dq.input) < 3:
            continue
        xq, xs, xz = x_dq.input
        w, ws, wz = w_dq.input
        if node.op_type == "Conv":
            outs = consumers.get(node.output[0], [])
            q = outs[0] if len(outs) == 1 and outs[0] is not None and outs[0].op_type == "QuantizeLinear" else None
            if q is None or (len(node.input) > 2 and node.input[2] and b_dq is None):
                continue
            inputs = [xq, xs, xz, w, ws, wz, q.input[1], q.input[2]] + ([b_dq.input[0]] if b_dq is not None else [])
            fused = helper.make_node("QLinearConv", inputs, [q.output[0]], name=node.name + "/QLinearConv",
                                     **_attrs(node))  # fmt: skip
            drop.add(id(q))
        elif node.op_type == "Gemm":
            a = _attrs(node)
            if a.get("transA", 0) or a.get("beta", 1.0) != 1.0 or (len(node.input) > 2 and b_dq is None):
                continue
            inputs = [xq, xs, xz, w, ws, wz] + ([b_dq.input[0]] if b_dq is not None else [])
            fused = helper.make_node("QGemm", inputs, [node.output[0]], name=node.name + "/QGemm", domain=MS_DOMAIN,
                                     alpha=float(a.get("alpha", 1.0)), transB=int(a.get("transB", 0)))  # fmt: skip
        else:
            fused = helper.make_node("MatMulIntegerToFloat", [xq, w, xs, ws, xz, wz], [node.output[0]],
                                     name=node.name + "/MatMulIntegerToFloat", domain=MS_DOMAIN)  # fmt: skip
        replace[id(node)] = fused
        counts[fused.op_type] += 1
        dqs.extend(d for d in (x_dq, w_dq, b_dq) if d is not None)
    for d in dqs:  # a DQ read only by fused layers goes (one shared by q/k/v once all three are fused)
        if all(c is not None and id(c) in replace for c in consumers.get(d.output[0], [])):
            drop.add(id(d))
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    if counts["QGemm"] or counts["MatMulIntegerToFloat"]:
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _values(model) -> dict[str, tuple]:
    """{name: (array or None, external key)}: inline initializers as arrays; external ones by their location."""
    from onnx import TensorProto, numpy_helper

    out = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            out[t.name] = (None, tuple((e.key, e.value) for e in t.external_data))
        else:
            out[t.name] = (numpy_helper.to_array(t), None)
    return out


def varying_initializers(bundle, groups: list[int]) -> tuple[object, list[str], list[dict]]:
    """(group `groups[0]`'s ModelProto, the initializers whose values differ between the groups, each group's
    {name: (array or None, external key)}). Refuses groups whose graphs differ in structure or in which external
    weights they read: one engine can serve only groups that differ in inline constants."""
    models = [bundle.group_model(g) for g in groups]
    values = [_values(m) for m in models]
    base = models[0]
    for g, m, v in zip(groups[1:], models[1:], values[1:], strict=True):
        if set(v) != set(values[0]) or [n.op_type for n in m.graph.node] != [n.op_type for n in base.graph.node]:
            raise BundleError(f"{bundle.root}: group {g}'s graph differs from group {groups[0]}'s in structure; "
                              "one engine needs groups that differ only in their quantization parameters")  # fmt: skip
    differ = []
    for name, (arr, ext) in values[0].items():
        for v in values[1:]:
            other, other_ext = v[name]
            if ext is not None or other_ext is not None:
                if ext != other_ext:
                    raise BundleError(f"{bundle.root}: weight {name!r} is not shared by every group")
            elif arr.shape != other.shape or arr.dtype != other.dtype or not np.array_equal(arr, other):
                differ.append(name)
                break
    return base, differ, values


def single_graph(bundle, groups: list[int] | None = None):
    """(ModelProto, tables) serving every group in `groups` (default: all): group 0's graph with the integer
    layers fused and each initializer that differs between groups turned into a graph input; `tables` holds
    those inputs' values, {name: array [G, ...]} in the order of `groups`."""
    import onnx
    from onnx import helper

    if bundle.manifest["target"] != "ort-cpu":
        raise BundleError(f"{bundle.root}: one engine for all groups needs an ort-cpu bundle (this one is "
                          f"{bundle.manifest['target']})")  # fmt: skip
    groups = sorted(g["id"] for g in bundle.manifest["groups"]) if groups is None else groups
    base, differ, values = varying_initializers(bundle, groups)
    model = onnx.ModelProto()
    model.CopyFrom(base)
    counts = fuse_integer_layers(model)
    used = {i for n in model.graph.node for i in n.input}
    differ = [n for n in differ if n in used]
    keep = [t for t in model.graph.initializer if t.name in used and t.name not in differ]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    tables = {name: np.stack([v[name][0] for v in values]) for name in differ}
    for name, table in tables.items():
        dtype = helper.np_dtype_to_tensor_dtype(table.dtype)
        model.graph.input.append(helper.make_tensor_value_info(name, dtype, list(table.shape[1:])))
    model.doc_string = (f"dqc single engine for groups {groups}: {len(tables)} per-group inputs; fused "
                        + ", ".join(f"{k} {v}" for k, v in counts.items()))  # fmt: skip
    return model, tables


def single_engine(bundle, groups: list[int], weights, *, prompt_cache: bool = False, **session) -> SingleEngine:
    """The SingleEngine of `groups` over the bundle's shared weights (SharedInitializers); `session`: OrtEngine's
    options (providers, threads, prepack, spin); `prompt_cache`: text graphs compute the cross-attention K/V once
    per prompt embedding and group."""
    from runtime.engine import OrtEngine

    graph, tables = single_graph(bundle, groups)
    prompt = None
    if prompt_cache:  # the cross-attention K/V once per prompt and group (runtime.prompt_cache)
        from runtime.prompt_cache import split_prompt_part

        split = split_prompt_part(graph, params=set(tables))
        if split is not None:
            prompt_model, graph, cut = split
            prompt = (prompt_model, cut)
    used = {t.name for t in graph.graph.initializer}
    engine = OrtEngine(graph.SerializeToString(), bundle.spec, external_dir=bundle.root,
                       initializers=weights.subset(used), name=f"{bundle.root} (one engine for groups {groups})",
                       prompt=prompt, **session)  # fmt: skip
    return SingleEngine(engine, tables, groups)


class SingleEngine:
    """One ONNX Runtime session for all groups. The group's parameters are bound to the session's inputs once
    per group switch (an IOBinding of OrtValues made at load), so a call costs what a per-group session's does;
    `for_group(g)` is the Engine a group's timesteps use."""

    def __init__(self, session_engine, tables: dict[str, np.ndarray], groups: list[int]) -> None:
        self.engine, self.groups, self.spec = session_engine, list(groups), session_engine.spec
        self._tables, self._values, self._io, self._bound = tables, None, None, None
        self._prompt_params: dict = {}

    def _activate(self):
        if self._io is None:
            import onnxruntime as ort

            session = self.engine.activate()
            reads = {i.name for i in session.get_inputs()}  # with a prompt part, some tables feed only that
            self._values = {g: {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t[i]))
                                for k, t in self._tables.items() if k in reads}
                            for i, g in enumerate(self.groups)}  # fmt: skip
            part = self.engine.prompt  # its per-group inputs, made once
            names = [] if part is None else part.param_names
            self._prompt_params = {g: {k: np.ascontiguousarray(self._tables[k][i]) for k in names}
                                   for i, g in enumerate(self.groups)}  # fmt: skip
            self._io = session.io_binding()
        return self.engine.activate()

    def infer(self, group: int, sample, timestep, cond=None) -> np.ndarray:
        from runtime.engine import EngineError, _describe, input_feeds

        feeds = input_feeds(self.spec, sample, timestep, cond)
        session = self._activate()
        io = self._io
        if group not in self._values:
            raise EngineError(f"{self.engine.name}: no group {group} (this engine serves {self.groups})")
        if self.engine.prompt is not None:
            try:
                feeds = self.engine.prompt.substitute(feeds, self._prompt_params[group], key=group)
            except Exception as e:
                raise EngineError(f"{self.engine.name}: ONNX Runtime failed to run its prompt part "
                                  f"({_describe(e)})") from None  # fmt: skip
        if self._bound != group:
            for name, value in self._values[group].items():
                io.bind_ortvalue_input(name, value)
            self._bound = group
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output("eps")
        try:
            session.run_with_iobinding(io)
        except Exception as e:
            raise EngineError(f"{self.engine.name}: ONNX Runtime failed to run it ({_describe(e)})") from None
        return io.copy_outputs_to_cpu()[0]

    def for_group(self, group: int) -> GroupEngine:
        return GroupEngine(self, group)


class GroupEngine:
    """The Engine of one group of a SingleEngine: the same session, that group's parameters."""

    def __init__(self, single: SingleEngine, group: int) -> None:
        self.single, self.group, self.spec = single, group, single.spec

    @property
    def name(self) -> str:
        return f"{self.single.engine.name} (group {self.group})"

    @property
    def prompt(self):
        """The shared session's prompt part (runtime.prompt_cache), or None."""
        return self.single.engine.prompt

    @property
    def spin(self) -> bool:
        """Whether the shared session's worker threads spin-wait between calls."""
        return self.single.engine.spin

    def infer(self, sample, timestep, cond=None) -> np.ndarray:
        return self.single.infer(self.group, sample, timestep, cond)
