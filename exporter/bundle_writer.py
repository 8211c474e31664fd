"""Write a bundle: one Q/DQ graph per timestep group, weights stored once in `weights.bin`, a manifest
with the sha256 of every file. Written into a temp directory that is renamed at the end.

Group graphs differ only in activation scales, zero points and the int32 biases that sit on their
accumulator grid. Group 0 is stored whole (`group_0.onnx`, a standard ONNX graph with external data);
every other group as an overlay (`group_<g>.overlay.onnx`): an ONNX file holding just the initializers
that differ from group 0, which the runtime substitutes into group 0's graph. Disk therefore grows by a
few kilobytes per group, not by a graph's structure."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference
from tqdm.auto import tqdm

from calibration.config import parse_bits
from calibration.model_io import LoadedModel
from calibration.profiles import get_profile
from calibration.quantizers import quantize_bias
from calibration.result import CalibrationResult
from calibration.shortcut import apply_splits
from exporter.components import write_components
from exporter.large_model import convert_version, fits_in_protobuf
from exporter.onnx_export import export_float
from exporter.precision import to_float_type
from exporter.publish import OWNER, check_output, publish, stage
from exporter.qdq import LayerQuant, insert_attention_qdq, insert_qdq, insert_residual_qdq
from exporter.simplify import fold_shapes
from runtime.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, MANIFEST, sha256_file
from runtime.errors import BundleError, ExportError
from runtime.sampler import noise_streams_record

WEIGHTS = "weights.bin"
_ALIGN = 64
_MIN_EXTERNAL = 1024  # shared initializers this large must be equal in every group graph
_MIN_REFERENCE = 64  # shared initializers this large go to weights.bin (smaller: an inline copy is cheaper)
_PER_GROUP = ("/bias/int", "/bias/scale")  # large, yet per group: they depend on the group's input scale


def layer_table(model: LoadedModel, result: CalibrationResult, group: int) -> dict[str, LayerQuant]:
    profile = get_profile(result.config.target)
    acts = result.group_activations(group)
    table = {}
    for layer in result.layers:
        if layer.name not in result.weights:
            continue
        w_int, w_scale = result.weights[layer.name]
        act_in = acts[f"{layer.name}:input"]
        bias = model.unet.get_submodule(layer.name).bias
        b_int = b_scale = None
        if bias is not None and profile.quantize_bias:
            b_int, b_scale = (t.numpy() for t in quantize_bias(bias.cpu(), act_in.scale, w_scale))
        table[layer.name] = LayerQuant(
            layer.op, w_int.numpy(), w_scale.numpy(), act_in, acts.get(f"{layer.name}:output"), b_int, b_scale,
            layer.shares if layer.shares in result.weights else None,
        )  # fmt: skip
    return table


class SharedWeights:
    """One weights file for every group graph: an initializer equal in all of them is stored once and
    referenced (ONNX external data); those that differ between groups stay inline in each graph."""

    def __init__(self) -> None:
        self.blob, self.index = bytearray(), {}

    def externalize(self, models: list[onnx.ModelProto]) -> None:
        tables = [{t.name: t for t in m.graph.initializer} for m in models]
        for name, tensor in tables[0].items():
            copies = [table.get(name) for table in tables]
            if any(c is None for c in copies):
                raise ExportError(f"initializer {name}: missing from some group graphs; they must share structure")
            raw = tensor.raw_data
            if any(c.raw_data != raw or list(c.dims) != list(tensor.dims) for c in copies[1:]):
                # an int32 bias and its scale sit on the accumulator grid s_in·s_w, and s_in is per group
                if len(raw) >= _MIN_EXTERNAL and not name.endswith(_PER_GROUP):
                    raise ExportError(f"initializer {name}: differs between group graphs; weights must be shared")
                continue
            if len(raw) < _MIN_REFERENCE:
                continue
            offset = self._store(name, raw)
            for c in copies:
                c.ClearField("raw_data")
                c.data_location = onnx.TensorProto.EXTERNAL
                del c.external_data[:]
                for key, value in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = c.external_data.add()
                    entry.key, entry.value = key, value

    def _store(self, name: str, raw: bytes) -> int:
        self.blob.extend(b"\0" * (-len(self.blob) % _ALIGN))
        offset = len(self.blob)
        self.blob.extend(raw)
        self.index[name] = (offset, len(raw))
        return offset


def overlay(base: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The initializers of `model` that differ from `base`, as an ONNX file without nodes; None when the
    graphs differ in anything but initializer values (then the group is stored whole)."""
    same = (
        len(base.graph.node) == len(model.graph.node)
        and all(a == b for a, b in zip(base.graph.node, model.graph.node, strict=True))
        and list(base.graph.input) == list(model.graph.input)
        and list(base.graph.output) == list(model.graph.output)
        and [t.name for t in base.graph.initializer] == [t.name for t in model.graph.initializer]
    )
    if not same:
        return None
    diff = [t for a, t in zip(base.graph.initializer, model.graph.initializer, strict=True) if a != t]
    graph = onnx.helper.make_graph([], f"{model.graph.name}-overlay", [], [], diff)
    return onnx.helper.make_model(graph, opset_imports=list(base.opset_import), ir_version=base.ir_version)


def residual_table(result: CalibrationResult, group: int) -> dict:
    """{resnet: quantizer of its skip Add's residual input} for profiles that quantize residuals."""
    suffix = ":residual"
    return {p.removesuffix(suffix): a for p, a in result.group_activations(group).items() if p.endswith(suffix)}


def attention_table(result: CalibrationResult, group: int) -> dict:
    """{attention: {q, k, probs, v: quantizer}} where the attention products are quantized."""
    from calibration.qmodules import ATTENTION

    acts = result.group_activations(group)
    names = {p.rpartition(":")[0] for p in acts if p.endswith(":probs")}
    return {a: {s.lstrip(":"): acts[a + s] for s in ATTENTION} for a in sorted(names)}


def _group_graph(
    fp: onnx.ModelProto, table: dict[str, LayerQuant], residuals: dict, attentions: dict, result: CalibrationResult,
    w4_linear: str = "int8",
) -> tuple[onnx.ModelProto, dict]:  # fmt: skip
    profile = get_profile(result.config.target)
    graph = gs.import_onnx(fp)
    report = insert_qdq(graph, table, profile)
    report["quantized"] += insert_residual_qdq(graph, residuals)
    products = insert_attention_qdq(graph, attentions)
    report["quantized"] += products
    quantized = {p["node"] for p in products}
    report["float"] = [f for f in report["float"] if f["node"] not in quantized]
    model = gs.export_onnx(graph)
    model.opset_import[0].version = fp.opset_import[0].version
    model.ir_version = fp.ir_version
    model = to_float_type(model, profile.float_type)
    if w4_linear == "int4":  # TensorRT's weight-only INT4 Linears (exporter.int4)
        from exporter.int4 import to_int4_weights

        report["w4_linear"] = to_int4_weights(model)
    elif w4_linear != "int8":  # 4-bit Linear weights packed for ONNX Runtime's MatMulNBits (exporter.nbits)
        from exporter.nbits import to_matmul_nbits

        report["w4_linear"] = to_matmul_nbits(model, parse_bits(result.config.bits).weight,
                                              accuracy_level=W4_LINEAR[w4_linear])  # fmt: skip
    if fits_in_protobuf(model):  # a larger one is checked as written, weights in weights.bin (check_staged)
        check_graph(model, profile)
    return model, report


# --w4-linear → MatMulNBits accuracy_level (ort-cpu); int4: TensorRT's weight-only INT4 (trt targets)
W4_LINEAR = {"int8": None, "nbits": 0, "nbits-int8": 4, "int4": None}


def check_w4_linear(choice: str, configs: list) -> None:
    """Refuse a --w4-linear choice the bundle cannot take, before any work."""
    if choice not in W4_LINEAR:
        raise ExportError(f"--w4-linear {choice!r}: use one of {list(W4_LINEAR)}")
    if choice == "int8":
        return
    for cfg in configs:
        if parse_bits(cfg.bits).weight != 4:
            raise ExportError(f"--w4-linear {choice}: --bits {cfg.bits} has {parse_bits(cfg.bits).weight}-bit weights; "
                              "it stores 4-bit weights (W4A8, W4A4)")  # fmt: skip
        if choice == "int4":
            if get_profile(cfg.target).backend != "trt":
                raise ExportError(f"--w4-linear int4: target {cfg.target}; INT4 weight-only Linears are TensorRT's "
                                  "(--target trt, trt-bf16, trt-fp32); on ONNX Runtime use nbits")  # fmt: skip
            continue
        if cfg.target != "ort-cpu":
            raise ExportError(f"--w4-linear {choice}: target {cfg.target}; MatMulNBits is an ONNX Runtime kernel "
                              "(--target ort-cpu)")  # fmt: skip


def check_graph(model: onnx.ModelProto | Path, profile) -> None:
    """The ONNX checker and, for strongly typed profiles, strict type inference (a model or a graph file)."""
    if isinstance(model, Path):
        onnx.checker.check_model(str(model))
        if profile.float_type != "float32":
            with tempfile.TemporaryDirectory(prefix="dqc-check-") as tmp:
                shape_inference.infer_shapes_path(str(model), str(Path(tmp) / "inferred.onnx"), check_type=True,
                                                  strict_mode=True)  # fmt: skip
        return
    onnx.checker.check_model(model)
    if profile.float_type != "float32":  # strongly typed: every tensor's type must check
        shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def _manifest(model: LoadedModel, results: list[CalibrationResult], groups: list[dict], report: dict, files: dict,
              macs: int) -> dict:  # fmt: skip
    result = results[0]
    cfg = result.config
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "model": result.model,
        "input_spec": model.spec.to_dict(),
        "null_class": model.null_class,
        "schedule": model.schedule.to_dict(),
        "calibration": {
            "sampler": cfg.sampler,
            "steps": cfg.steps,
            "eta": cfg.eta,
            "guidance": cfg.guidance,
            "seed": cfg.seed,
            "noise": noise_streams_record(),
            "samples": cfg.calib_samples,
            "timesteps": cfg.calib_timesteps,
            "method": cfg.method,
            "selection": cfg.timestep_selection,
            "weight_range": cfg.weight_range,
            "weight_rounding": cfg.weight_rounding,
            "act_iters": cfg.act_iters,
            "shortcut_splits": result.splits,
            "groups": result.num_groups,
            "activation_range": cfg.activation_range,
            "stats": result.stats,
            "config": json.loads(cfg.to_json()),
        },
        "bits": cfg.bits,
        "target": cfg.target,
        "target_description": get_profile(cfg.target).description,
        "groups": groups,
        "timestep_to_group": [int(g) for g in result.group_of_t],
        "quantized_macs_per_sample": macs,
        "precisions": {r.config.bits: _precision(r, groups, macs) for r in results},
        "precision_plan": None,
        "ptqd": None,
        "quantized_nodes": report["quantized"],
        "float_nodes": report["float"] + result.skipped,
        "shared_input_qdq": report.get("shared_inputs", {}),  # layer → the layer whose input Q/DQ it reads
        "w4_linear": report.get("w4_linear"),  # MatMulNBits layers (exporter.nbits), None: int8 containers
        "files": files,
    }


def _precision(result: CalibrationResult, groups: list[dict], macs: int) -> dict:
    """A precision variant's own route over its groups, and the bit operations of one prediction."""
    ids = [g["id"] for g in groups if g["bits"] == result.config.bits]
    bits = result.config.parsed_bits
    return {
        "groups": ids,
        "timestep_to_group": [ids[int(g)] for g in result.group_of_t],
        "bops_per_sample": macs * bits.weight * bits.activation,
    }


def quantized_macs(model: LoadedModel, result: CalibrationResult) -> int:
    """Multiply-accumulates of the quantized Conv/Linear layers in one prediction of one sample."""
    import numpy as np
    import torch

    from runtime.engine import TorchEngine, example_cond

    total = [0]

    def count(module, inputs, output) -> None:
        if isinstance(module, torch.nn.Conv2d):
            total[0] += output.numel() * module.in_channels // module.groups * module.weight[0, 0].numel()
        else:
            total[0] += output.numel() * module.in_features

    hooks = [model.unet.get_submodule(name).register_forward_hook(count) for name in result.weights]
    try:
        spec = model.spec
        x, t = np.zeros((1, *spec.sample_shape), np.float32), np.array([spec.num_train_timesteps // 2])
        TorchEngine(model.wrapper(), spec).infer(x, t, example_cond(spec, 1))
    finally:
        for h in hooks:
            h.remove()
    return int(total[0])


def write_bundle(
    model: LoadedModel,
    result: CalibrationResult | list[CalibrationResult],
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    before_publish: Callable[[Path], object] | None = None,
    text_encoder: str = "fp32",
    w4_linear: str = "int8",
) -> Path:
    """Export one Q/DQ graph per group and write the bundle directory atomically (exporter.publish): it
    appears whole or not at all, and never over anything but a bundle it was told to replace. A list of
    results writes one engine set per precision (step-aware mixed precision): the first is the bundle's main
    precision, every graph after group 0 an overlay of it, and the weights must be the same in all of them.
    `before_publish(staged_dir)` completes the staged bundle (e.g. PTQD statistics) before it appears.
    `text_encoder`: the precision of a text pipeline's text encoder, fp32 or w8a8 (exporter.components).
    `w4_linear` (4-bit weights, ort-cpu): int8 (weights on the 4-bit grid in int8 containers), nbits (packed 4-bit
    MatMulNBits, float32 compute) or nbits-int8 (the same, activations requantized to int8 per block at run time)
    for every Linear (exporter.nbits)."""
    results = result if isinstance(result, list) else [result]
    out = Path(out)
    check_w4_linear(w4_linear, [r.config for r in results])
    for r in results:
        if r.model["weight_sha256"] != model.weight_sha256:
            raise ExportError(
                f"calibration result was made from another model (weight hash differs from {model.source}); "
                "recalibrate this model"
            )
    bits = [r.config.bits for r in results]
    if len(set(bits)) != len(bits):
        raise ExportError(f"precision variants {bits}: each precision once")
    if any(r.splits != results[0].splits for r in results):
        raise ExportError("precision variants split different shortcut convolutions; calibrate them alike")
    check_output(out, overwrite)
    model = dataclasses.replace(model, unet=apply_splits(model.unet, results[0].splits))  # Q-Diffusion split
    fp = export_float(model)
    opset = get_profile(results[0].config.target).opset
    if fp.opset_import[0].version != opset:
        fp = convert_version(fp, opset)
    fp = fold_shapes(fp)
    tmp = stage(out)
    try:
        shared, groups, graphs, report = SharedWeights(), [], [], {}
        jobs = [(r, g) for r in results for g in range(r.num_groups)]
        for r, g in tqdm(jobs, desc="export", disable=not progress, leave=False):
            graph, report = _group_graph(fp, layer_table(model, r, g), residual_table(r, g), attention_table(r, g), r,
                                         w4_linear)  # fmt: skip
            graphs.append(graph)
            groups.append({"id": len(groups), "bits": r.config.bits})
        try:
            shared.externalize(graphs)
        except ExportError as e:
            if len(results) == 1:
                raise
            raise ExportError(
                f"precision variants {bits}: {e}. The variants share one copy of the weights: pair precisions "
                "with the same weight bits and weight calibration (e.g. W4A8 with W4A4)"
            ) from e
        for entry, graph in zip(groups, graphs, strict=True):
            g = entry["id"]
            delta = overlay(graphs[0], graph) if g else None
            entry["file"] = f"group_{g}.onnx"
            if delta is not None:
                entry |= {"file": f"group_{g}.overlay.onnx", "base": "group_0.onnx"}
            onnx.save(graph if delta is None else delta, str(tmp / entry["file"]))
        (tmp / WEIGHTS).write_bytes(shared.blob)
        if not fits_in_protobuf(fp):  # too large to check in memory: check the written graphs
            profile = get_profile(results[0].config.target)
            for entry in groups:
                if "base" not in entry:
                    check_graph(tmp / entry["file"], profile)
        components = write_components(model, tmp, text_encoder)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                 if p.is_file() and p.name != OWNER}  # fmt: skip
        manifest = _manifest(model, results, groups, report, files, quantized_macs(model, results[0]))
        if components:
            manifest["components"] = components
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if before_publish is not None:
            before_publish(tmp)
        publish(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def add_ptqd(bundle_dir: str | Path, tables: dict, *, samples: int, switch_t: int | None = None) -> Path:
    """Store PTQD statistics, {precision: PtqdTables}, in a bundle (`ptqd_<precision>.safetensors`) and,
    for a bundle with two precisions, its mixed-precision plan: the switch timestep from PTQD's SNR
    criterion (runtime.ptqd.switch_timestep) unless `switch_t` overrides it, and the route the runtime
    follows by default. The tensor files are written first, then the manifest is replaced atomically, so
    an interruption leaves the bundle as it was."""
    import numpy as np
    from safetensors.numpy import save_file

    from runtime.bundle import load_bundle

    root = Path(bundle_dir)
    bundle = load_bundle(root)
    manifest = bundle.manifest
    precisions = manifest["precisions"]
    unknown = sorted(set(tables) - set(precisions))
    if unknown:
        raise BundleError(f"{root}: PTQD statistics for {unknown}, but the bundle holds {sorted(precisions)}")
    entries = {}
    for bits, tab in tables.items():
        name = f"ptqd_{bits}.safetensors"
        tensors = {"timesteps": tab.timesteps.astype(np.int64), "k": tab.k.astype(np.float64),
                   "bias": tab.bias.astype(np.float64), "sigma_q": tab.sigma_q.astype(np.float64),
                   "eps_power": np.asarray(tab.eps_power, np.float64)}  # fmt: skip
        tmp = root / f".{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, root / name)
        manifest["files"][name] = sha256_file(root / name)
        entries[bits] = {
            "file": name,
            "sampler": tab.sampler,
            "steps": tab.steps,
            "eta": tab.eta,
            "samples": samples,
            "other_step_counts": "nearest gathered timestep",
            "k_fallback": list(tab.k_fallback),
        }
    manifest["ptqd"] = entries
    if len(precisions) > 1:
        manifest["precision_plan"] = precision_plan(bundle, tables, switch_t)
        manifest["timestep_to_group"] = bundle.route(switch_t=manifest["precision_plan"]["switch_t"],
                                                     plan=manifest["precision_plan"]).tolist()  # fmt: skip
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)
    return root


def _finite(values) -> list[float | None]:
    """JSON numbers; None where infinite (a step without quantization noise)."""
    return [round(float(v), 6) if abs(v) != float("inf") else None for v in values]


def precision_plan(bundle, tables: dict, switch_t: int | None) -> dict:
    """Which precision runs which steps (PTQD Eq. 15, or `switch_t`), the criterion's values per step and
    the bit operations saved against running the high precision at every step."""
    from runtime.ptqd import state_snr, switch_timestep

    precisions = bundle.manifest["precisions"]
    if len(precisions) != 2:
        raise BundleError(f"mixed precision needs exactly two precisions, the bundle holds {sorted(precisions)}")
    high, low = sorted(precisions, key=lambda b: precisions[b]["bops_per_sample"], reverse=True)
    if set(tables) != {high, low}:
        raise BundleError(f"the mixed-precision switch needs PTQD statistics of {high} and {low}")
    ts = tables[low].timesteps
    snr_f = state_snr(bundle.schedule, ts, tables[low].steps)
    flow = getattr(bundle.schedule, "kind", None) == "flow"
    snr = {bits: tables[bits].snr() for bits in (low, high)}
    chosen = switch_timestep(ts, snr[low], snr_f)
    switch = chosen if switch_t is None else int(switch_t)
    if not 0 <= switch <= bundle.spec.num_train_timesteps:
        raise BundleError(f"--switch-t {switch}: must be in [0, {bundle.spec.num_train_timesteps}]")
    n_low = int((ts >= switch).sum())
    b_low, b_high = precisions[low]["bops_per_sample"], precisions[high]["bops_per_sample"]
    return {
        "low": low,
        "high": high,
        "switch_t": switch,
        "switch_t_criterion": chosen,
        "overridden": switch_t is not None,
        "rule": "low precision at timesteps t >= switch_t, high below",
        "criterion": (
            "flow analogue of PTQD Eq. 15: low while (1+k)^2 E[v^2] / sigma_q^2 of the low precision >= "
            "(1-sigma)^2/sigma^2"
            if flow
            else "PTQD Eq. 15: low while (1+k)^2 E[eps^2] / sigma_q^2 of the low precision >= abar/(1-abar)"
        ),
        "steps": {low: n_low, high: len(ts) - n_low},
        "bop_saving": round(1 - (n_low * b_low + (len(ts) - n_low) * b_high) / (len(ts) * b_high), 4),
        "snr": {"timesteps": ts.tolist(), "diffusion": _finite(snr_f), **{b: _finite(v) for b, v in snr.items()}},
    }


def ort_optimized_op_counts(graph_path: str | Path, optimized_path: str | Path) -> dict[str, int]:
    """Load a graph in ONNX Runtime (CPU, all optimizations), save the optimized model, count its ops. Its
    initializers go to `<optimized_path>.data` beside it: a model past protobuf's 2 GiB (the SD-1.5-shaped UNet)
    cannot be written as one message, and only the nodes are read back."""
    import onnxruntime as ort

    from runtime.engine import session_options

    opts = session_options(ort)
    opts.optimized_model_filepath = str(optimized_path)
    opts.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", Path(optimized_path).name + ".data"
    )
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    opts.log_severity_level = 3  # the "hardware specific optimizations" notice is expected here
    ort.InferenceSession(str(graph_path), opts, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(str(optimized_path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def integer_op_summary(counts: dict[str, int]) -> dict[str, int]:
    integer = (
        "QLinearConv",
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
    )
    return {
        "integer": int(sum(counts.get(k, 0) for k in integer)),
        "float_conv": counts.get("Conv", 0) + counts.get("FusedConv", 0),
        "float_matmul_gemm": counts.get("MatMul", 0) + counts.get("Gemm", 0) + counts.get("FusedMatMul", 0),
        "quantize_nodes": counts.get("QuantizeLinear", 0),
        "dequantize_nodes": counts.get("DequantizeLinear", 0),
    }
