"""Cross-attention keys and values once per request.

In a text-conditioned UNet the prompt embedding enters only through the cross-attention projections:
K = c·W_k and V = c·W_v (with the Q/DQ of c), which are the same at every denoising step of a request.
`split_prompt_part` cuts a group graph in two: the prompt part, the nodes up to those projections that depend
on `encoder_hidden_states` and on nothing that changes between steps, and the step part, which takes the
prompt part's outputs as inputs. `PromptPart` runs the prompt part when the embedding changes and
hands its outputs to every step; the steps then skip those projections. Both parts are the group graph's own
nodes, so a step computes what the whole graph computes.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import EngineError

PROMPT_INPUT = "encoder_hidden_states"
_LAYERS = ("MatMul", "Gemm", "Conv", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "QLinearMatMul")


def _needed(nodes: list, outputs: set[str]) -> list:
    """The nodes of `nodes` (topologically ordered) that `outputs` depend on, in order."""
    want, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in want for o in node.output):
            keep.append(node)
            want.update(i for i in node.input if i)
    return keep[::-1]


def split_prompt_part(model, params: set[str] | frozenset = frozenset()):
    """(prompt_model, step_model, cut) for a graph with an `encoder_hidden_states` input, or None when nothing
    but the input itself would move (no node depends on the prompt alone).

    A node belongs to the prompt part when one of its inputs depends on the prompt and every other is an
    initializer, a constant, or one of `params` (graph inputs fixed for a request, e.g. a single engine's
    per-group quantization parameters). `cut`: the prompt part's outputs the step part reads, in graph order;
    the step part takes them as inputs in place of `encoder_hidden_states`."""
    import onnx
    from onnx import helper

    g = model.graph
    inputs = {i.name for i in g.input}
    if PROMPT_INPUT not in inputs:
        return None
    fixed = {t.name for t in g.initializer} | set(params) | {""}
    prompt, constant = {PROMPT_INPUT}, set()
    prompt_nodes, step_nodes = [], []
    for node in g.node:
        has_graph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        ins = list(node.input)
        if not has_graph and all(i in fixed or i in constant for i in ins) and not any(i in params for i in ins):
            constant.update(node.output)  # Constant nodes and what is folded from initializers alone
            step_nodes.append(node)
        elif not has_graph and any(i in prompt for i in ins) and all(i in prompt or i in fixed or i in constant
                                                                      for i in ins):  # fmt: skip
            prompt.update(node.output)
            prompt_nodes.append(node)
        else:
            step_nodes.append(node)
    # The part ends at the projections' outputs: the reshapes and scalings after them stay in the step, where
    # ONNX Runtime fuses them as it does in the whole graph (a 1/√d scaling folded into the attention MatMul
    # rounds differently from one applied to K beforehand), so a step computes exactly what the graph does.
    ends = {o for n in prompt_nodes if n.op_type in _LAYERS for o in n.output}
    moved = {id(n) for n in _needed(prompt_nodes, ends)}
    if not moved:
        return None
    prompt_nodes = [n for n in prompt_nodes if id(n) in moved]
    step_nodes = [n for n in g.node if id(n) not in moved]
    read = {i for n in step_nodes for i in n.input} | {o.name for o in g.output}
    produced = [o for n in prompt_nodes for o in n.output]
    cut = [o for o in produced if o in read] + ([PROMPT_INPUT] if PROMPT_INPUT in read else [])
    known = _value_types(model)
    missing = [c for c in cut if not known.get(c, (0,))[0] or known[c][1] is None]
    if missing:
        raise EngineError(f"the prompt part's outputs {missing[:3]} have no inferable type and rank")
    types = {c: helper.make_tensor_value_info(c, *known[c]) for c in cut}
    types.update({v.name: v for v in g.input})

    def part(nodes: list, graph_inputs: list, outputs: list, name: str):
        used = {i for n in nodes for i in n.input} | {o.name for o in outputs}
        inits = [t for t in g.initializer if t.name in used]
        sub = helper.make_graph(nodes, name, graph_inputs, outputs, inits)
        return helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)

    prompt_keep = _needed(_ordered(g.node, prompt_nodes, constant), set(cut))
    prompt_ins = [v for v in g.input if v.name == PROMPT_INPUT or v.name in {i for n in prompt_keep for i in n.input}]
    prompt_model = part(prompt_keep, prompt_ins, [types[c] for c in cut], f"{g.name}-prompt")
    step_keep = _needed(step_nodes, {o.name for o in g.output})
    step_reads = {i for n in step_keep for i in n.input}
    step_ins = [v for v in g.input if v.name != PROMPT_INPUT and v.name in step_reads | {"sample", "timestep"}]
    step_ins += [types[c] for c in cut]
    step_model = part(step_keep, step_ins, list(g.output), f"{g.name}-step")
    return prompt_model, step_model, cut


def _value_types(model) -> dict[str, tuple[int, list | None]]:
    """{tensor: (ONNX element type, dims or None)}: ONNX shape inference, and for what it cannot type (the
    com.microsoft integer kernels of a single engine and what follows them) the kernels' float output of shape
    A[:-1] + [N], a Cast's target, a Q's zero point, else the first input's type."""
    import onnx

    def dims(v):
        if not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]

    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    out = {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in [*inferred, *g.input, *g.output]}
    out.update({t.name: (t.data_type, list(t.dims)) for t in g.initializer})
    for node in g.node:
        for o in node.output:
            if out.get(o, (0,))[0]:
                continue
            first = out.get(node.input[0], (0, None)) if node.input else (0, None)
            if node.op_type in ("MatMulIntegerToFloat", "QGemm"):
                w_at = 1 if node.op_type == "MatMulIntegerToFloat" else 3
                w = out.get(node.input[w_at], (0, None))[1]
                trans = any(a.name == "transB" and a.i for a in node.attribute)
                n = None if not w else (w[0] if trans else w[-1])
                shape = None if first[1] is None else [*first[1][:-1], n]
                out[o] = (out.get(node.input[2 if w_at == 1 else 1], (0,))[0], shape)
            elif node.op_type == "Cast":
                out[o] = (next(a.i for a in node.attribute if a.name == "to"), first[1])
            elif node.op_type == "QuantizeLinear" and len(node.input) > 2:
                out[o] = (out.get(node.input[2], (0,))[0], first[1])
            elif node.op_type == "DequantizeLinear":
                out[o] = (out.get(node.input[1], (0,))[0], first[1])
            else:
                out[o] = (first[0], None)
    return out


def _ordered(nodes, prompt_nodes: list, constant: set[str]) -> list:
    """The prompt nodes with the constant nodes they read, in graph order."""
    chosen = {id(n) for n in prompt_nodes}
    return [n for n in nodes if id(n) in chosen or (n.output and all(o in constant for o in n.output))]


class PromptPart:
    """The prompt part of one graph as a session (`open_session()`, called on first use, returns an object with
    ONNX Runtime's `run(output_names, feeds)`) and the outputs it gave for the last embedding of each key (a
    group, for a single engine serving several): `substitute(feeds)` swaps `encoder_hidden_states` for those
    outputs, running the part only when the embedding changed. `param_names`: the part's other inputs, taken
    from `substitute`'s `params`."""

    def __init__(self, cut: list[str], open_session, param_names: list[str] | tuple = ()) -> None:
        self.cut, self._open, self.param_names = list(cut), open_session, list(param_names)
        self._session, self._cache = None, {}
        self.runs = 0  # how often the prompt part ran (once per request and group)

    def substitute(self, feeds: dict, params: dict | None = None, key=None) -> dict:
        cond = feeds.pop(PROMPT_INPUT)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape != cond.shape or not np.array_equal(cached[0], cond):
            if self._session is None:
                self._session = self._open()
            run_feeds = {PROMPT_INPUT: cond} | {n: (params or {})[n] for n in self.param_names}
            outs = self._session.run(self.cut, run_feeds)
            cached = (cond.copy(), dict(zip(self.cut, outs, strict=True)))
            self._cache[key] = cached
            self.runs += 1
        return feeds | cached[1]

    def clear(self) -> None:
        """Forget the cached outputs (the next call runs the prompt part again)."""
        self._cache.clear()
