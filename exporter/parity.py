"""Parity of a shipped graph with its PyTorch fake-quant reference.

`layer_parity` checks each quantized layer in isolation: the backend (ONNX Runtime with all optimizations, or
OpenVINO's CPU plugin; integer kernels on both) exposes the float value entering each layer's input Q and the
layer's (dequantized) output;
the reference layer is fed the same float input. This separates modeling errors (scales, zero points,
bias, placement) from the rounding flips that a requantized network amplifies end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from runtime.engine import example_cond


def probe_model(graph: Path | onnx.ModelProto, layers: list[str]) -> tuple[onnx.ModelProto, dict]:
    if isinstance(graph, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(graph)
    else:
        model = onnx.load(str(graph))
    producers = {n.name: n for n in model.graph.node}
    made_by = {o: n for n in model.graph.node for o in n.output}
    layer_nodes = {}
    for n in model.graph.node:  # exporter scope names: "/unet/<module path>/<Op>"
        parts = n.name.strip("/").split("/")
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(parts) >= 3 and parts[0] == "unet":
            layer_nodes.setdefault(".".join(parts[1:-1]), n)
    probes = {}
    for name in layers:
        layer_node = layer_nodes.get(name)
        dq = made_by.get(layer_node.input[0]) if layer_node is not None else None
        q_in = made_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q_in is None or q_in.op_type != "QuantizeLinear":
            continue
        clip = made_by.get(q_in.input[0])  # below 8 bits: Clip → Q (a shared Q/DQ may carry another layer's name)
        if clip is not None and clip.op_type == "Clip" and clip.name.endswith("/input/in/Clip"):
            q_in = clip
        out_dq = producers.get(f"{name}/output/out/Clip") or producers.get(f"{name}/output/DQ")  # b < 8: the Clip
        post = (out_dq or layer_node).output[0]
        if layer_node.op_type == "MatMul":  # a Linear's bias is the Add that follows its MatMul
            post = next((n.output[0] for n in model.graph.node if n.op_type == "Add" and post in n.input), post)
        probes[name] = (q_in.input[0], post)
    existing = {o.name for o in model.graph.output}
    for pre, post in probes.values():
        for tensor in (pre, post):
            if tensor not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=tensor))
                existing.add(tensor)
    return model, probes


def _quantized_layers(reference, scope: str) -> dict:
    """{layer name as in the graph: its reference module}; a shortcut conv wrapped with its resnet's residual
    quantizer (ResidualQuant.shortcut) keeps the shortcut's own name."""
    wrapped = {n for n, m in reference.named_modules() if type(m).__name__ == "ResidualQuant"}
    out = {}
    for name, module in reference.named_modules():
        if hasattr(module, "act_in"):
            parent = name.removesuffix(".shortcut")
            out[(parent if parent in wrapped else name).removeprefix(f"{scope}.")] = module
    return out


def run_probes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], backend: str) -> dict[str, np.ndarray]:
    """Every output of `model` (weights inside) on `backend`: ort or openvino."""
    if backend == "ort":
        import onnxruntime as ort

        from runtime.engine import session_options

        opts = session_options(ort)
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    if backend == "openvino":
        from runtime.cpu import int8_saturates
        from runtime.openvino import compile_config, core, dequantize_weights

        if int8_saturates():  # as the engine set runs it there: float layers on the bundle's weights
            dequantize_weights(model)
        compiled = core().compile_model(core().read_model(model.SerializeToString()), "CPU", compile_config())
        result = compiled(feeds)
        return {name: result[o] for o in compiled.outputs for name in o.get_names()}  # a tensor may have several
    raise ValueError(f"layer parity backend {backend!r}: use ort or openvino")


def layer_parity(
    graph: str | Path | onnx.ModelProto, reference, feeds: dict[str, np.ndarray], scope: str = "unet",
    backend: str = "ort",
) -> dict[str, dict]:  # fmt: skip
    """Per layer: fraction of output elements where engine and reference differ by more than half an
    output step (quantized outputs), and the relative error ‖Δ‖/‖y‖. `graph`: a graph file, or a model
    with its weights loaded (e.g. `Bundle.group_model(g, load_weights=True)`); `backend`: ort or openvino."""
    import torch

    modules = _quantized_layers(reference, scope)
    names = list(modules)
    model, probes = probe_model(graph if isinstance(graph, onnx.ModelProto) else Path(graph), names)
    values = run_probes(model, feeds, backend)
    report = {}
    for name, (pre, post) in probes.items():
        module = modules[name]
        with torch.no_grad():
            y_ref = module(torch.from_numpy(values[pre])).numpy()
        y = values[post]
        step = module.act_out.scale if module.act_out is not None else None
        diff = np.abs(y.astype(np.float64) - y_ref)
        report[name] = {
            "flipped": float(np.mean(diff > 0.5 * step)) if step else 0.0,
            "max_steps": float(diff.max() / step) if step else None,
            "rel_err": float(np.linalg.norm(diff) / max(np.linalg.norm(y_ref), 1e-12)),
        }
    return report


def noised_inputs(spec, schedule, t: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """x_t = √ā_t x_0 + √(1−ā_t) ε (flow: x_σ = (1 − σ) x_0 + σ ε at σ = t/T, fed as float32) with x_0 uniform in
    [−1, 1]: inputs on the diffusion marginal's scale."""
    rng = np.random.default_rng([seed, t])
    x0 = rng.uniform(-1, 1, (n, *spec.sample_shape))
    noise = rng.standard_normal(x0.shape)
    if getattr(schedule, "kind", None) == "flow":
        sigma = t / schedule.num_train_timesteps
        x, dtype = (1 - sigma) * x0 + sigma * noise, np.float32
    else:
        a = schedule.alphas_cumprod[t]
        x, dtype = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, np.int64
    feeds = {"sample": x.astype(np.float32), "timestep": np.full(n, t, dtype)}
    if spec.condition is not None:
        feeds[spec.condition] = example_cond(spec, n, rng)
    return feeds


def end_to_end_parity(
    engine, reference, fp, spec, schedule, timesteps=(5, 200, 400, 600, 800, 950), n: int = 8, seed: int = 0
) -> dict[str, float]:
    """‖ε_engine − ε_fq‖ / ‖ε_fq − ε_FP‖ (the parity ratio) and ‖ε_engine − ε_FP‖ / ‖ε_fq − ε_FP‖,
    summed over the given timesteps."""
    import torch

    parity = engine_err = ref_err = 0.0
    for t in timesteps:
        feeds = noised_inputs(spec, schedule, t, n, seed)
        args = [torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"])]
        cond = feeds.get(spec.condition)
        args.append(None if cond is None else torch.from_numpy(cond))
        with torch.no_grad():
            e_q, e_fp = reference(*args).numpy(), fp(*args).numpy()
        e_engine = engine.infer(feeds["sample"], feeds["timestep"], cond)
        parity += float(np.sum((e_engine - e_q) ** 2))
        engine_err += float(np.sum((e_engine - e_fp) ** 2))
        ref_err += float(np.sum((e_q - e_fp) ** 2))
    return {
        "parity_ratio": float(np.sqrt(parity / ref_err)),
        "engine_vs_reference_error": float(np.sqrt(engine_err / ref_err)),
        "reference_error_rel": float(np.sqrt(ref_err)),
    }
