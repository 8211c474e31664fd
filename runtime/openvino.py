"""OpenVINO backend (the CPU plugin): `OpenVinoEngine`, the Engine contract on one compiled model, and
`openvino_engine_set` over a bundle's group graphs, routed by t like the ONNX Runtime sessions.

OpenVINO reads the bundle's Q/DQ ONNX graphs as they are. Its low-precision transformations turn each
Quantize → Dequantize → Conv/MatMul pattern into an integer kernel (u8 activations × s8 weights, as ONNX
Runtime's QLinearConv), and it runs everything else (GroupNorm, SiLU, softmax, the time embedding) in the
precision `INFERENCE_PRECISION_HINT` asks for: f32, or bf16 on CPUs with AVX-512 BF16 / AMX. `PRECISION_HINTS`
lists both; `DEFAULT_HINT` is the one docs/RESULTS.md measured best on quality and speed together.

On x86 CPUs without VNNI the plugin's int8 kernels saturate (`runtime.cpu`), so there the engine set hands
OpenVINO each graph with its weights dequantized to float (`dequantize_weights`): the activations keep their
Q/DQ, the convolutions and matmuls run in float on exactly the bundle's weights, and `OpenVinoEngine.weights`
says so (the run report records it).

`openvino` is imported inside functions, so a bundle run on ONNX Runtime needs none of it and a missing
install says so in one line. As in Polygraphy's runners, constructors only store arguments; the model is
read and compiled on the first `infer`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.cpu import int8_saturates
from runtime.engine import EngineSet, InputSpec, input_feeds
from runtime.errors import BundleError, EngineError
from runtime.openvino_single import dequantized
from runtime.prompt_cache import PROMPT_INPUT, PromptPart, split_prompt_part

MISSING_OPENVINO = (
    "the openvino backend needs OpenVINO, which is not installed: pip install openvino — or run the bundle on "
    "ONNX Runtime with --backend ort"
)
PRECISION_HINTS = ("f32", "bf16")
# bf16 saved 8 % at batch 8 and nothing at batch 1 on the CIFAR-10 shape (docs/RESULTS.md, issue 18); its
# quality cost on a trained model is not measured yet, so f32 stays the default
DEFAULT_HINT = "f32"
_PROCESS: dict = {}  # one openvino.Core per process: it owns the plugins and their thread pools


def import_openvino():
    """The openvino module; raises a one-line EngineError when it is missing."""
    try:
        import openvino
    except ImportError as e:
        raise EngineError(MISSING_OPENVINO) from e
    return openvino


def available() -> bool:
    try:
        import_openvino()
    except EngineError:
        return False
    return True


def openvino_version() -> str:
    return import_openvino().get_version()


def core():
    if "core" not in _PROCESS:
        _PROCESS["core"] = import_openvino().Core()
    return _PROCESS["core"]


def compile_config(hint: str | None = DEFAULT_HINT, threads: int = 0) -> dict:
    """The CPU plugin properties every dqc engine compiles with: latency mode (one stream, all threads on
    one request, as the sampler calls), the float parts' precision (None: the plugin's own choice, bf16 where
    the CPU has it), and `threads` (0: OpenVINO's default). Dynamic quantization is off: the plugin would
    otherwise requantize the float activations of MatMulNBits layers (exporter.nbits) to int8 per group at run
    time, which the bundle's graphs do not ask for (measured: outputs 0.18 apart on a tiny W4 DiT; with it off,
    equal to ONNX Runtime's)."""
    if hint is not None and hint not in PRECISION_HINTS:
        raise EngineError(f"--precision-hint {hint!r}: use one of {PRECISION_HINTS}")
    if threads < 0:
        raise EngineError(f"threads={threads}: must be ≥ 0 (0: OpenVINO's default)")
    config = {"PERFORMANCE_HINT": "LATENCY", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def release_freed_memory() -> None:
    """Hand the heap glibc keeps after large frees back to the system (malloc_trim): building a graph in memory
    frees tens of MB that would otherwise stay resident for the engine's life. Nothing to do off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing held to release
        pass


class OpenVinoEngine:
    """The Engine contract on one graph compiled by OpenVINO for the CPU. `graph`: an ONNX file (external
    weights are found beside it) or OpenVINO IR (.xml, its .bin beside it), or serialized ONNX bytes with the
    weights inside, or a callable that returns such bytes at each read (runtime.openvino_single.GraphSource).
    `hint`: the float parts' precision (None: the plugin's default)."""

    def __init__(
        self, graph: str | Path | bytes | Callable[[], bytes], spec: InputSpec, *, hint: str | None = DEFAULT_HINT,
        threads: int = 0, name: str | None = None, weights: str = "int8", prompt_cut: list[str] | None = None,
    ) -> None:  # fmt: skip
        self.graph = graph if isinstance(graph, bytes) or callable(graph) else Path(graph)
        self.name = name or (str(graph) if isinstance(self.graph, Path) else "ONNX graph")
        self.spec, self.config = spec, compile_config(hint, threads)
        self.weights = weights  # or "float": the graph's weights were dequantized for a CPU whose int8 saturates
        self._compiled = self._request = None
        self.prompt = None  # runtime.prompt_cache.PromptPart: the model read is cut at `prompt_cut`
        if prompt_cut:
            self.prompt = PromptPart(prompt_cut, self._open_prompt)

    def _read_whole(self):
        graph = self.graph() if callable(self.graph) else self.graph
        return core().read_model(graph if isinstance(graph, bytes) else str(graph))

    def _read(self):
        model = self._read_whole()
        return model if self.prompt is None else _cut(model, self.prompt.cut)[0]

    def _open_prompt(self):
        try:
            compiled = core().compile_model(_cut(self._read_whole(), self.prompt.cut)[1], "CPU", self.config)
        except Exception as e:
            raise EngineError(f"{self.name}: OpenVINO cannot compile its prompt part ({_describe(e)})") from None
        return _Runner(compiled.create_infer_request())

    def activate(self):
        if self._request is not None:
            return self._request
        ov = import_openvino()
        try:
            model = self._read()
        except Exception as e:
            raise EngineError(f"{self.name}: OpenVINO cannot read it ({_describe(e)})") from None
        names = {n: i.get_partial_shape() for i in model.inputs for n in i.get_names()}
        shape = names.get("sample")
        want = [int(d) for d in self.spec.sample_shape]
        if shape is None or shape.rank.is_dynamic or [d.get_length() for d in list(shape)[1:]] != want:
            raise EngineError(
                f"{self.name}: its sample input is {shape}, the input spec says (N, {', '.join(map(str, want))}); "
                "the bundle's manifest does not match its graph"
            )
        if len(model.outputs) != 1 or "eps" not in model.outputs[0].get_names():
            raise EngineError(f"{self.name}: the graph's outputs are not the one 'eps' every dqc graph has")
        try:
            self._compiled = core().compile_model(model, "CPU", self.config)
        except Exception as e:
            raise EngineError(f"{self.name}: OpenVINO {ov.get_version()} cannot compile it ({_describe(e)})") from None
        self._request = self._compiled.create_infer_request()
        if callable(self.graph):  # a graph built in memory: its freed buffers go back to the system
            release_freed_memory()
        return self._request

    @property
    def threads(self) -> int:
        """The worker threads the compiled model runs on."""
        self.activate()
        return int(self._compiled.get_property("INFERENCE_NUM_THREADS"))

    def profile(self, sample, timestep, cond=None, runs: int = 5, params: dict | None = None) -> dict:
        """Where the time goes: OpenVINO's per-node counters over `runs` calls (a separately compiled model with
        PERF_COUNT on), milliseconds per call summed by (node type, kernel), e.g. ("Convolution",
        "brgconv_avx512_amx_I8"): which kernels run int8 and on which instructions. `params`: as for `bind`."""
        import collections

        self.activate()  # the graph's checks, and its errors, first
        compiled = core().compile_model(self._read(), "CPU", self.config | {"PERF_COUNT": True})
        request = compiled.create_infer_request()
        feeds = input_feeds(self.spec, sample, timestep, cond) | (params or {})
        request.infer(feeds)  # warm-up
        per, count, total = collections.Counter(), collections.Counter(), 0.0
        for _ in range(runs):
            request.infer(feeds)
            total += request.latency
            for info in request.profiling_info:
                if info.status == info.Status.EXECUTED:
                    key = f"{info.node_type} / {info.exec_type}"
                    per[key] += info.real_time.total_seconds() * 1e3 / runs
                    count[key] += 1
        return {
            "run_ms": round(total / runs, 3),
            "kernel_ms": round(sum(per.values()), 3),
            "ops": {k: {"ms": round(ms, 3), "nodes": count[k] // runs} for k, ms in per.most_common()},
        }

    @property
    def execution_precision(self) -> str:
        """The float parts' precision the compiled model actually runs (the hint may be ignored by a CPU
        without bf16)."""
        self.activate()
        value = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

    def bind(self, params: dict[str, np.ndarray]) -> None:
        """Set further inputs that stay until bound again, e.g. a group's values on the graph shared by all groups
        (runtime.openvino_single): set once per group switch, not copied at every call."""
        ov = import_openvino()
        request = self.activate()
        try:
            for name, value in params.items():
                request.set_tensor(name, ov.Tensor(value, shared_memory=True))
        except Exception as e:
            raise EngineError(f"{self.name}: OpenVINO refused its inputs ({_describe(e)})") from None

    def infer(self, sample, timestep, cond=None) -> np.ndarray:
        feeds = input_feeds(self.spec, sample, timestep, cond)
        request = self.activate()
        try:
            if self.prompt is not None:
                feeds = self.prompt.substitute(feeds)
            request.infer(feeds)
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        except Exception as e:
            raise EngineError(f"{self.name}: OpenVINO failed to run it ({_describe(e)})") from None


def _cut(model, cut: list[str]):
    """(step model, prompt model) of an OpenVINO model read from a text graph: the tensors named in `cut`
    (runtime.prompt_cache.split_prompt_part) become parameters of the step model and the outputs of the prompt
    model, whose one parameter is encoder_hidden_states. Both hold the read model's nodes and weights."""
    ov = import_openvino()
    ports = {n: out for op in model.get_ordered_ops() for out in op.outputs() for n in out.get_names() if n in cut}
    missing = [n for n in cut if n not in ports]
    if missing:
        raise EngineError(f"the OpenVINO model has no tensors {missing[:3]} to cut the prompt part at")
    source = [p for p in model.get_parameters() if PROMPT_INPUT in p.output(0).get_names()]
    params = []
    for n in cut:
        param = ov.opset13.parameter(ports[n].get_partial_shape(), ports[n].get_element_type(), n)
        param.output(0).set_names({n})
        for target in list(ports[n].get_target_inputs()):
            target.replace_source_output(param.output(0))
        params.append(param)
    kept = [p for p in model.get_parameters() if PROMPT_INPUT not in p.output(0).get_names()]
    step = ov.Model(model.get_results(), kept + params, "step")
    return step, ov.Model([ports[n] for n in cut], source, "prompt")  # after the cut: no Result of it is moved


class _Runner:
    """An OpenVINO infer request behind ONNX Runtime's `run(output_names, feeds)`."""

    def __init__(self, request) -> None:
        self.request = request

    def run(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        self.request.infer(feeds)
        return [np.array(self.request.get_tensor(n).data, copy=True) for n in names]


def _describe(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def openvino_engine_set(
    bundle, route: np.ndarray | None = None, *, hint: str = DEFAULT_HINT, threads: int = 0,
    max_resident: int | None = None, prompt_cache: bool = False, shared: dict[int, list[int]] | None = None,
    single: bool | None = None,
) -> EngineSet:  # fmt: skip
    """OpenVINO engines, compiled on first use. A group whose graph is a whole file is read from the bundle (its
    external weights beside it); an overlay group (a base graph with other initializers) is assembled in memory
    first. Every graph passes the bundle's scale and class-table checks before OpenVINO sees it. `shared`: {group:
    the groups one compiled model serves} (Bundle._single_groups): those groups run on one graph whose
    group-dependent values are inputs (runtime.openvino_single), the weights packed once; where that rewrite does
    not apply (or with `prompt_cache`, or where int8 saturates) each group gets its own compiled model, unless
    `single` is True, which then raises. `prompt_cache`: a text graph is cut as read, and its cross-attention K/V
    run once per prompt embedding (runtime.prompt_cache)."""
    import_openvino()  # the one-line error before any graph is touched
    compile_config(hint, threads)
    spec = bundle.spec

    float_weights = int8_saturates()
    split_text = prompt_cache and spec.condition == PROMPT_INPUT
    if float_weights or split_text:
        if single:
            raise BundleError(f"{bundle.root}: one OpenVINO engine for all groups needs int8 weights (this CPU's "
                              "int8 saturates) and whole graphs (no --kv-once); use the per-group engines")  # fmt: skip
        shared = None
    shared = shared or {}
    state: dict = {}

    def make_single(group: int):
        from runtime.openvino_single import GraphSource, OpenVinoSingle, affine_graph

        key = tuple(shared[group])
        if key not in state:
            try:
                graph, tables = affine_graph(bundle, list(key))
            except BundleError:
                if single:
                    raise
                state[key] = None
            else:
                source = GraphSource(graph.SerializeToString(), lambda key=key: affine_graph(bundle, list(key))[0])
                del graph
                state[key] = OpenVinoSingle(OpenVinoEngine(source, spec, hint=hint, threads=threads,
                                                           name=f"{bundle.root} (one OpenVINO engine for groups "
                                                                f"{list(key)})"), tables, list(key))  # fmt: skip
        return None if state[key] is None else state[key].for_group(group)

    def make(group: int) -> OpenVinoEngine:
        if group in shared:
            engine = make_single(group)
            if engine is not None:
                return engine
        entry = next(g for g in bundle.manifest["groups"] if g["id"] == group)
        name = f"{bundle.graph_path(group)} (group {group})"
        in_memory = "base" in entry or float_weights  # else OpenVINO reads the file and its weights itself
        model = bundle.group_model(group, load_weights=in_memory)  # read once: the checks, the cut, the graph
        split = split_prompt_part(model) if split_text else None
        if float_weights:
            dequantize_weights(model)
        graph = model.SerializeToString() if in_memory else bundle.graph_path(group)
        return OpenVinoEngine(graph, spec, hint=hint, threads=threads, name=name,
                              weights="float" if float_weights else "int8",
                              prompt_cut=None if split is None else split[2])  # fmt: skip

    factories = {g["id"]: (lambda g=g["id"]: make(g)) for g in bundle.manifest["groups"]}
    return EngineSet(factories, bundle.group_of_t if route is None else route, spec, max_resident=max_resident)


def dequantize_weights(model, unless_read_by: tuple[str, ...] = ()) -> int:
    """Replace, in place, every DequantizeLinear of a constant integer tensor by the float tensor it computes,
    (w − zero point) · scale per channel (as the ONNX operator defines it), and return how many; a DQ read by
    an op in `unless_read_by` stays. The activations' Q/DQ stay: OpenVINO then runs each layer in float on
    the weights the bundle ships."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    done, keep = 0, []
    for node in graph.node:
        if (
            node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(readers[node.input[0]]) != 1
            or set(readers.get(node.output[0], ())) & set(unless_read_by)
        ):  # fmt: skip
            keep.append(node)
            continue
        scale_dtype = numpy_helper.to_array(inits[node.input[1]]).dtype
        value = dequantized(node, lambda name: numpy_helper.to_array(inits[name]))
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(value.astype(scale_dtype), node.output[0]))
        done += 1
    del graph.node[:]
    graph.node.extend(keep)
    return done
