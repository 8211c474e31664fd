"""Building TensorRT plans for `dqc build` (driven by tools/deploy/build.py): `BuildConfig`, `PlanBuilder` (one plan per
group graph), the INT8 check of a built plan (`int8_fallbacks`), `inspect_plan` and `gpu_info`. The pieces the
runtime side shares (BuildError, the lazy TensorRT import, the per-process logger) live in runtime.tensorrt.

TensorRT is imported inside functions through `_import_trt`, so a missing TensorRT says so in one line. As in
Polygraphy, constructors only store arguments and nothing touches the GPU before a plan is built.

Batch profile: every plan has one optimization profile over the batch dimension, min = batch_sizes[0],
opt = opt_batch (default: the middle entry), max = batch_sizes[-1]. The batch is the *engine call's* batch:
classifier-free guidance runs cond and uncond in one call, so the engine sees twice the sampler's --batch-size.
The default (1, 16, 32) serves `dqc sample --batch-size 16` with guidance (32 per call), without it (16) and any
smaller last batch (down to 1).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from numbers import Integral
from pathlib import Path

from runtime.errors import ConfigError
from runtime.tensorrt import (
    BACKENDS,
    DEFAULT_BATCH_SIZES,
    BuildError,
    _deserialize,
    _device_memory,
    _import_trt,
    _logger,
)
from runtime.trt_refit import ENGINE_MODES


@dataclass(frozen=True)
class BuildConfig:
    """How `dqc build` builds plans. `batch_sizes` are engine-call batches (twice the sampling batch with
    guidance); the profile spans their first to last entry, tuned for `opt_batch` (default: the middle entry)."""

    backend: str = "trt"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    opt_batch: int | None = None
    workspace_mb: int = 4096
    verify_int8: bool = True
    engines: str = "auto"  # runtime.trt_refit.ENGINE_MODES: refit one plan per precision, or a plan per group

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} (--backend): dqc build supports {list(BACKENDS)}")
        if self.engines not in ENGINE_MODES:
            raise ConfigError(
                f"engines={self.engines!r} (--trt-engines): use refit (one plan per precision, its Q/DQ scales "
                "refitted at each group switch), per-group (a plan per group) or auto (refit where the groups "
                "differ only in Q/DQ scales)"
            )
        sizes = tuple(self.batch_sizes) if isinstance(self.batch_sizes, (list, tuple)) else ()
        if not sizes or not all(_is_int(b) and b >= 1 for b in sizes) or list(sizes) != sorted(set(sizes)):
            raise ConfigError(
                f"batch_sizes={self.batch_sizes!r} (--batch-sizes): must be positive integers in increasing order, "
                f"e.g. {','.join(map(str, DEFAULT_BATCH_SIZES))} (with guidance the engine sees twice --batch-size)"
            )
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in sizes))
        if self.opt_batch is not None and not (_is_int(self.opt_batch) and sizes[0] <= self.opt_batch <= sizes[-1]):
            raise ConfigError(
                f"opt_batch={self.opt_batch!r} (--opt-batch): must be an integer in [{sizes[0]}, {sizes[-1]}]"
            )
        if not _is_int(self.workspace_mb) or self.workspace_mb < 1:
            raise ConfigError(f"workspace_mb={self.workspace_mb!r} (--workspace-mb): must be a positive integer (MiB)")
        if not isinstance(self.verify_int8, bool):
            raise ConfigError(f"verify_int8={self.verify_int8!r}: must be True or False")

    @property
    def profile_batches(self) -> tuple[int, int, int]:
        """(min, opt, max) of the batch dimension."""
        sizes = self.batch_sizes
        return sizes[0], self.opt_batch if self.opt_batch is not None else sizes[len(sizes) // 2], sizes[-1]

    def to_dict(self) -> dict:
        return {**asdict(self), "batch_sizes": list(self.batch_sizes)}

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        return cls(**{**d, "batch_sizes": tuple(d.get("batch_sizes", DEFAULT_BATCH_SIZES))})


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def profile_shapes(name: str, shape: tuple[int, ...], batches: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of one network input: the batch dimension (0) from `batches`, the others from the
    network's own shape, which must be static."""
    if len(shape) == 0:
        raise BuildError(f"network input {name!r} is a scalar; every input needs a leading batch dimension")
    dynamic = [i for i, d in enumerate(shape[1:], 1) if d < 0]
    if dynamic:
        raise BuildError(
            f"network input {name!r} has shape {tuple(shape)}: dimensions {dynamic} are dynamic, only the batch "
            "dimension may be; recompile the bundle (dqc compile exports a fixed sample shape)"
        )
    return tuple((b, *shape[1:]) for b in batches)


# --- INT8 verification: a pure function of TensorRT's layer information (ProfilingVerbosity.DETAILED JSON) ---

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")  # TensorRT >= 10 layer metadata, one per fused ONNX node


def engine_layers(engine_info: dict) -> list[dict]:
    """The "Layers" of IEngineInspector.get_engine_information(JSON); refuses names-only information."""
    layers = engine_info.get("Layers") if isinstance(engine_info, dict) else engine_info
    if not isinstance(layers, list):
        raise BuildError("engine information has no 'Layers' list; it is not TensorRT's layer-information JSON")
    if any(not isinstance(layer, dict) for layer in layers):
        raise BuildError(
            "engine information lists layer names only (the plan was built without ProfilingVerbosity.DETAILED), so "
            "layer precisions cannot be checked; rebuild with dqc build, which sets DETAILED"
        )
    return layers


def _implements(layer: dict, node: str) -> bool:
    """Whether an engine layer implements ONNX node `node`: its metadata lists it, or its name does as a whole
    word ("a + b + c" fusions, "{ForeignNode[a...b]}" regions; "/x/Conv" is not "/x/Conv_1")."""
    if node in _ONNX_LAYER.findall(str(layer.get("Metadata", ""))):
        return True
    word = r"(?:^|[\s(\[{,])" + re.escape(node) + r"(?=$|[\s)\]},+]|\.\.\.)"
    return re.search(word, str(layer.get("Name", ""))) is not None


def _input_format(layer: dict) -> str | None:
    first = (layer.get("Inputs") or [None])[0]
    return first.get("Format/Datatype") if isinstance(first, dict) else None


def int8_fallbacks(engine_info: dict, quantized_nodes: list[dict]) -> list[dict]:
    """The quantized ONNX nodes (manifest "quantized_nodes") that the engine does not run in INT8: status "float"
    when a layer implementing the node takes a non-Int8 first input (its dequantized activation), "unverified"
    when no layer names the node. Reformat layers (copies between formats) are not the node's compute."""
    layers = [layer for layer in engine_layers(engine_info) if layer.get("LayerType") != "Reformat"]
    out = []
    for q in quantized_nodes:
        found = [layer for layer in layers if _implements(layer, q["node"])]
        if not found:
            out.append({**q, "status": "unverified", "reason": "no engine layer names this node"})
            continue
        floats = [layer for layer in found if "int8" not in str(_input_format(layer) or "").lower()]
        if floats:
            layer = floats[0]
            out.append({**q, "status": "float", "engine_layer": layer.get("Name"), "input": _input_format(layer)})
    return out


# --- building ---


def _parser_errors(parser) -> str:
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() if hasattr(e, "node_name") else e.node()  # node_name(): TensorRT >= 8.6
        errors.append(f"node {node or '?'}: {e.desc()}")
    return "; ".join(errors) or "no parser errors recorded"


class PlanBuilder:
    """Builds serialized plans (strongly typed networks: the graph's own FP16/BF16/INT8 types, no precision flags)
    with one builder and one timing cache shared by every group: the group graphs differ only in scales, so later
    groups reuse the first one's tactic timings. `timing_cache` is a serialized cache to start from."""

    def __init__(self, config: BuildConfig, timing_cache: bytes | None = None) -> None:
        self.config, self.initial_cache = config, timing_cache
        self.cache_reused: bool | None = None  # whether `timing_cache` was accepted (None: none given)
        self._builder = self._cache = None

    def _activate(self):
        trt, _ = _import_trt()
        if self._builder is None:
            self._builder = trt.Builder(_logger(trt))
        return trt

    def build(self, model: bytes, path: Path, what: str, refittable: list[str] | tuple = ()) -> bytes:
        """Plan of a serialized ONNX model whose external data lies next to `path`. `refittable`: initializer names
        (Q/DQ scales, runtime.trt_refit) the plan must let a Refitter change; every other weight stays a constant
        TensorRT may fold (BuilderFlag.REFIT_INDIVIDUAL)."""
        trt = self._activate()
        typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # absent: always strongly typed
        network = self._builder.create_network(0 if typed is None else 1 << int(typed))
        parser = trt.OnnxParser(network, _logger(trt))  # owns the weights the network uses: keep it to the end
        if not parser.parse(model, path=str(path)):
            raise BuildError(f"{what}: TensorRT cannot parse the graph: {_parser_errors(parser)}; check the graph "
                             "with `dqc lint BUNDLE --target trt`")  # fmt: skip
        config = self._builder.create_builder_config()
        if refittable:
            unmarked = [name for name in refittable if not network.mark_weights_refittable(name)]
            if unmarked:
                raise BuildError(f"{what}: TensorRT does not hold {len(unmarked)} per-group scales as named weights "
                                 f"(first: {unmarked[:3]}), so they cannot be refitted; build per-group plans with "
                                 "`dqc build BUNDLE --trt-engines per-group`")  # fmt: skip
            config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.config.workspace_mb << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # int8_fallbacks reads per-layer formats
        self._use_timing_cache(config)
        profile = self._builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            profile.set_shape(
                tensor.name, *profile_shapes(tensor.name, tuple(tensor.shape), self.config.profile_batches)
            )
        config.add_optimization_profile(profile)
        plan = self._builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildError(
                f"{what}: TensorRT could not build an engine (its log above says why); a larger --workspace-mb or "
                "`dqc lint BUNDLE --target trt` may help"
            )
        return bytes(plan)

    def _use_timing_cache(self, config) -> None:
        if self._cache is None:
            self._cache = self._first_cache(config)
        config.set_timing_cache(self._cache, ignore_mismatch=False)

    def _first_cache(self, config):
        """The given timing cache when this GPU and TensorRT accept it, else an empty one (`cache_reused` says)."""
        if self.initial_cache:
            try:
                cache = config.create_timing_cache(self.initial_cache)
                self.cache_reused = bool(config.set_timing_cache(cache, ignore_mismatch=False))
            except (RuntimeError, TypeError, ValueError):  # unreadable bytes
                self.cache_reused = False
            if self.cache_reused:
                return cache
        return config.create_timing_cache(b"")

    def timing_cache(self) -> bytes:
        return bytes(self._cache.serialize()) if self._cache is not None else b""


def inspect_plan(plan: bytes, what: str) -> tuple[dict, int]:
    """(layer information as DETAILED JSON, device memory of one context) of a serialized plan."""
    trt, engine = _deserialize(plan, what)
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)), _device_memory(engine)


def gpu_info() -> dict | None:
    """Name and compute capability of the current CUDA device, read through polygraphy's libcudart handle;
    None when they cannot be read."""
    import ctypes

    _, cuda = _import_trt()
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    props = ctypes.create_string_buffer(16384)  # cudaDeviceProp begins with char name[256]; larger than any layout
    try:
        lib = cuda.wrapper().handle
        get_props = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties  # CUDA 12: _v2
        failed = lib.cudaGetDevice(ctypes.byref(dev)) or get_props(props, dev)
        failed = failed or lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, dev)  # ComputeCapabilityMajor
        failed = failed or lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ComputeCapabilityMinor
    except (AttributeError, OSError):
        return None
    if failed:
        return None
    return {"name": props.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}
