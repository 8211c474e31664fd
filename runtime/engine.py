"""One `Engine` contract (ONNX Runtime, torch reference) and the `EngineSet` that routes steps to groups.

As in Polygraphy's runners, constructors only store arguments; sessions are created on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.errors import EngineError, EngineInputError

TIMESTEP_TYPES = ("int64", "float32")  # integer training timesteps; flow matching's t = σ·T


def timestep_key(t):
    """The integer timestep that keys a timestep in group tables, calibration data and PTQD statistics: t itself
    for integer timesteps; ⌈t⌉ − 1 (at least 0) for a flow model's float t = σ·T ∈ [0, T], so the unit bins
    (k, k + 1] map to k = 0..T − 1 (σ = 1, t = T, is the last). A Python or numpy scalar gives an int; a numpy
    array or a torch tensor gives int64 of its shape."""
    if hasattr(t, "is_floating_point"):  # a torch tensor (runtime does not import torch)
        return (t.ceil() - 1).clamp_min(0).long() if t.is_floating_point() else t.long()
    a = np.asarray(t)
    if a.dtype.kind in "iub":
        key = a.astype(np.int64)
    else:
        key = np.maximum(np.ceil(a) - 1, 0).astype(np.int64)
    return int(key) if key.ndim == 0 else key


@dataclass(frozen=True)
class InputSpec:
    """What every engine of a model accepts: sample (B, C, H, W) float32, timestep (B,) int64 in [0, T),
    and its condition, if any: class_labels (B,) int64 in [0, num_class_embeds) for class-conditional
    models, encoder_hidden_states (B, L, D) float32 for text-conditional ones (context_shape = (L, D))."""

    sample_shape: tuple[int, int, int]
    num_train_timesteps: int
    num_class_embeds: int | None = None
    context_shape: tuple[int, int] | None = None
    timestep_type: str = "int64"  # float32: flow-matching models, fed t = σ·T in [0, T]

    def __post_init__(self) -> None:
        if self.num_class_embeds is not None and self.context_shape is not None:
            raise EngineInputError("an input spec takes class labels or encoder hidden states, not both")
        if self.timestep_type not in TIMESTEP_TYPES:
            raise EngineInputError(f"timestep_type {self.timestep_type!r}: use one of {TIMESTEP_TYPES}")

    @property
    def condition(self) -> str | None:
        """The name of the conditioning input: class_labels, encoder_hidden_states, or None."""
        if self.num_class_embeds is not None:
            return "class_labels"
        return None if self.context_shape is None else "encoder_hidden_states"

    @property
    def names(self) -> list[str]:
        """The engine's named inputs, in the order of the exported graph's inputs."""
        return ["sample", "timestep"] + ([] if self.condition is None else [self.condition])

    def to_dict(self) -> dict:
        d = {
            "sample_shape": list(self.sample_shape),
            "num_train_timesteps": self.num_train_timesteps,
            "num_class_embeds": self.num_class_embeds,
            "inputs": self.names,
        }
        if self.context_shape is not None:
            d["context_shape"] = list(self.context_shape)
        if self.timestep_type != "int64":
            d["timestep_type"] = self.timestep_type
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        context = d.get("context_shape")
        return cls(tuple(d["sample_shape"]), int(d["num_train_timesteps"]), d.get("num_class_embeds"),
                   None if context is None else tuple(int(v) for v in context),
                   d.get("timestep_type", "int64"))  # fmt: skip


def _check_cond(spec: InputSpec, cond: Any, batch: int) -> np.ndarray | None:
    """The condition of one engine call, checked against the spec: None, int64 labels or float32 context."""
    name = spec.condition
    if name is None:
        if cond is not None:
            raise EngineInputError("input 'class_labels': the model is unconditional; pass no condition")
        return None
    if cond is None:
        what = (
            "class-conditional; pass one label per sample"
            if name == "class_labels"
            else ("text-conditional; pass the prompts' embeddings")
        )
        raise EngineInputError(f"input {name!r}: the model is {what}")
    if name == "encoder_hidden_states":
        length, width = spec.context_shape
        if not isinstance(cond, np.ndarray) or cond.dtype != np.float32:
            got = getattr(cond, "dtype", type(cond).__name__)
            raise EngineInputError(f"input {name!r}: expected a float32 numpy array, got {got}")
        if cond.shape != (batch, length, width):
            raise EngineInputError(f"input {name!r}: expected shape ({batch}, {length}, {width}), got {cond.shape}")
        return np.ascontiguousarray(cond)
    labels = np.asarray(cond)
    if labels.shape != (batch,) or not np.issubdtype(labels.dtype, np.integer):
        raise EngineInputError(f"input 'class_labels': expected {batch} integer labels, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= spec.num_class_embeds:
        raise EngineInputError(
            f"input 'class_labels': values must lie in [0, {spec.num_class_embeds}), "
            f"got [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64)


def example_cond(spec: InputSpec, batch: int, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """A valid condition for `batch` rows (smoke calls, parity inputs): the classes cycled, or context rows drawn
    from N(0, 1) with `rng` (zeros without one); None for unconditional models."""
    if spec.condition == "class_labels":
        return np.arange(batch, dtype=np.int64) % spec.num_class_embeds
    if spec.condition == "encoder_hidden_states":
        shape = (batch, *spec.context_shape)
        return np.zeros(shape, np.float32) if rng is None else rng.standard_normal(shape, dtype=np.float32)
    return None


def check_inputs(spec: InputSpec, sample: Any, timestep: Any, cond: Any = None):
    """Validate one engine call; returns contiguous (sample, timestep, cond) arrays (cond: the class labels or
    encoder hidden states the spec names, None for unconditional models)."""
    if not isinstance(sample, np.ndarray) or sample.dtype != np.float32:
        got = getattr(sample, "dtype", type(sample).__name__)
        raise EngineInputError(
            f"input 'sample': expected a float32 numpy array, got {got}; cast with .astype(np.float32)"
        )
    if sample.ndim != 4 or tuple(sample.shape[1:]) != spec.sample_shape:
        raise EngineInputError(
            f"input 'sample': expected shape (B, {', '.join(map(str, spec.sample_shape))}), got {tuple(sample.shape)}"
        )
    batch = sample.shape[0]
    timestep = np.asarray(timestep)
    if timestep.ndim == 0:
        timestep = np.full(batch, timestep)
    if spec.timestep_type == "float32":  # flow matching: t = σ·T, a float in [0, T]
        T = spec.num_train_timesteps
        if timestep.shape != (batch,) or not np.issubdtype(timestep.dtype, np.number) or timestep.dtype == bool:
            raise EngineInputError(f"input 'timestep': expected {batch} timesteps t = σ·T, got shape "
                                   f"{timestep.shape} dtype {timestep.dtype}")  # fmt: skip
        if not np.isfinite(timestep).all() or timestep.min() < 0 or timestep.max() > T:
            raise EngineInputError(f"input 'timestep': values must lie in [0, {T}], got [{timestep.min()}, "
                                   f"{timestep.max()}]")  # fmt: skip
        return np.ascontiguousarray(sample), timestep.astype(np.float32), _check_cond(spec, cond, batch)
    if timestep.shape != (batch,) or not np.issubdtype(timestep.dtype, np.integer):
        raise EngineInputError(
            f"input 'timestep': expected {batch} integer training timesteps, got shape {timestep.shape} "
            f"dtype {timestep.dtype}"
        )
    T = spec.num_train_timesteps
    if timestep.min() < 0 or timestep.max() >= T:
        raise EngineInputError(
            f"input 'timestep': values must lie in [0, {T}), got [{timestep.min()}, {timestep.max()}]"
        )
    return np.ascontiguousarray(sample), timestep.astype(np.int64), _check_cond(spec, cond, batch)


def input_feeds(spec: InputSpec, sample: Any, timestep: Any, cond: Any = None) -> dict[str, np.ndarray]:
    """One engine call's checked inputs by graph input name (the condition under the name the spec gives it)."""
    sample, timestep, cond = check_inputs(spec, sample, timestep, cond)
    feeds = {"sample": sample, "timestep": timestep}
    if cond is not None:
        feeds[spec.condition] = cond
    return feeds


class Engine(Protocol):
    spec: InputSpec

    def infer(self, sample: np.ndarray, timestep: np.ndarray, cond: np.ndarray | None = None) -> np.ndarray:
        """The prediction for a batch; inputs (cond: class labels or encoder hidden states, as `spec` says) are
        checked against `spec` first."""
        ...


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


_ENV_ARENA: list[bool] = []


def session_options(ort, optimize: bool = True):
    """ONNX Runtime session options as dqc runs every graph: all graph optimizations (or none, where tensors
    must keep their names), and exact integer kernels on every x86 CPU. Without VNNI (AVX2, AVX-512 before
    Cascade Lake), ORT's U8S8 GEMM adds u8·s8 products pairwise in saturating 16-bit arithmetic
    (255·127·2 > 2¹⁵), and a W8A8 graph's outputs move by tens of quantization steps; the
    `session.x64quantprecision` entry makes ORT rewrite s8 weights to u8 (+128, exact) and run U8U8 kernels
    there. ORT applies it only on CPUs that saturate: with VNNI it changes nothing."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.add_session_config_entry("session.x64quantprecision", "1")
    return opts


def _shared_arena(ort) -> None:
    """Register one process-wide CPU arena (once) that sessions opting in allocate from, so G group
    sessions do not each keep an arena as large as the biggest batch they ran."""
    if not _ENV_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _ENV_ARENA.append(True)


class OrtEngine:
    """An ONNX Runtime session over one graph (a file, or serialized bytes whose external data lives in
    `external_dir`); created on the first `infer`. `initializers` (SharedInitializers) replace the graph's
    external weights with buffers shared by other sessions, which also allocate from one shared arena."""

    def __init__(
        self,
        graph: str | Path | bytes,
        spec: InputSpec,
        *,
        providers: list[str] | None = None,
        optimized_model_path: str | Path | None = None,
        threads: int = 0,
        external_dir: str | Path | None = None,
        initializers=None,
        prepack: bool = True,
        spin: bool = True,
        name: str | None = None,
        prompt: tuple | None = None,
    ) -> None:
        self.graph = graph if isinstance(graph, bytes) else Path(graph)
        self.name = name or (str(graph) if not isinstance(graph, bytes) else "ONNX graph")  # for messages
        self.spec, self.providers, self.external_dir = spec, providers, external_dir
        self.optimized_model_path, self.threads = optimized_model_path, threads
        self.initializers, self.prepack, self.spin = initializers, prepack, spin
        self._session = None
        self.prompt = None  # runtime.prompt_cache.PromptPart: `graph` is then the step part
        if prompt is not None:
            from runtime.prompt_cache import PromptPart

            model, cut = prompt
            params = [i.name for i in model.graph.input if i.name != "encoder_hidden_states"]
            self.prompt = PromptPart(cut, lambda: self._open(model.SerializeToString(), _used(model)), params)

    @property
    def path(self) -> Path | None:
        return self.graph if isinstance(self.graph, Path) else None

    def _open(self, graph: str | bytes, used: set[str] | None = None):
        """An ONNX Runtime session over `graph` with this engine's options; `used`: the initializer names the
        graph holds, when it takes only some of the shared weights."""
        import onnxruntime as ort

        opts = session_options(ort)
        opts.intra_op_num_threads = self.threads
        if self.optimized_model_path is not None and used is None:
            opts.optimized_model_filepath = str(self.optimized_model_path)
        if self.external_dir is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(self.external_dir))  # fmt: skip
        if self.initializers is not None:
            shared = self.initializers if used is None else self.initializers.subset(used)
            for name, value in shared.values.items():
                opts.add_initializer(name, value)
            _shared_arena(ort)
            opts.add_session_config_entry("session.use_env_allocators", "1")
        if not self.prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if not self.spin:  # idle sessions' spinning worker threads would compete with the running one
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(graph, opts, providers=self.providers or default_providers())
        except Exception as e:  # ONNX Runtime's own errors (some not even decodable): name the graph
            raise EngineError(f"{self.name}: ONNX Runtime cannot load it ({_describe(e)})") from None

    def activate(self):
        if self._session is None:
            self._session = self._open(self.graph if isinstance(self.graph, bytes) else str(self.graph))
            inputs = {i.name: i.shape for i in self._session.get_inputs()}
            graph_shape = inputs.get("sample", [None])[1:]
            if [d for d in graph_shape if isinstance(d, int)] != [int(d) for d in self.spec.sample_shape]:
                self._session = None
                raise EngineError(
                    f"{self.name}: its sample input is {inputs.get('sample')}, the input spec says (N, "
                    f"{', '.join(map(str, self.spec.sample_shape))}); the bundle's manifest does not match its graph"
                )
        return self._session

    def infer(self, sample, timestep, cond=None) -> np.ndarray:
        feeds = input_feeds(self.spec, sample, timestep, cond)
        session = self.activate()
        try:
            if self.prompt is not None:
                feeds = self.prompt.substitute(feeds)
            return session.run(["eps"], feeds)[0]
        except Exception as e:
            raise EngineError(f"{self.name}: ONNX Runtime failed to run it ({_describe(e)})") from None


def _used(model) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _describe(e: Exception) -> str:
    try:
        text = str(e)
    except Exception:  # a message that is not valid UTF-8
        text = ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class TorchEngine:
    """A torch module `f(sample, timestep, cond) -> eps` (the FP model or the fake-quant reference).

    `dtype="float64"` runs a copy of the module in double precision: the parity reference. In float32 the
    CPU's convolution kernels are chosen per batch size and sum in different orders, so a quantizer input
    near a rounding boundary may round one way alone and the other inside a batch, and the flip propagates
    (measured on the tiny test model: up to 5 output steps on up to 78 % of a sample's elements). In float64
    those sums differ by ~1e-16 relative, and a sample computes the same alone and in a batch."""

    def __init__(self, module: Any, spec: InputSpec, device: str = "cpu", dtype: str = "float32") -> None:
        if dtype not in ("float32", "float64"):
            raise EngineInputError(f"TorchEngine dtype {dtype!r}: use float32 or float64")
        if dtype == "float64":
            import copy

            module = copy.deepcopy(module).double()
        self.module, self.spec, self.device, self.dtype = module, spec, device, dtype

    def infer(self, sample, timestep, cond=None) -> np.ndarray:
        import torch

        sample, timestep, cond = check_inputs(self.spec, sample, timestep, cond)
        dtype = getattr(torch, self.dtype)
        x = torch.from_numpy(sample).to(self.device, dtype)
        t = torch.from_numpy(timestep).to(self.device)
        c = None if cond is None else torch.from_numpy(cond).to(self.device)
        if c is not None and c.is_floating_point():
            c = c.to(dtype)
        with torch.inference_mode():
            return self.module(x, t, c).float().cpu().numpy()


class EngineSet:
    """One engine per timestep group, created lazily; `for_timestep(t)` routes by the group table."""

    def __init__(
        self, factories: dict[int, Callable[[], Engine]], group_of_t: np.ndarray, spec: InputSpec,
        max_resident: int | None = None,
    ) -> None:  # fmt: skip
        if len(group_of_t) != spec.num_train_timesteps:
            raise EngineInputError(
                f"group table covers {len(group_of_t)} timesteps, the model has {spec.num_train_timesteps}"
            )
        missing = set(np.unique(group_of_t).tolist()) - set(factories)
        if missing:
            raise EngineInputError(f"group table names groups {sorted(missing)} that have no engine")
        if max_resident is not None and max_resident < 1:
            raise EngineInputError(f"max_resident={max_resident}: at least one engine must stay loaded")
        self._factories, self._engines = factories, {}
        self.group_of_t, self.spec = np.asarray(group_of_t, dtype=np.int64), spec
        self.max_resident, self.created = max_resident, 0
        self.choice: dict | None = None  # Bundle.engines(backend="auto"): the timings that chose the backend

    @classmethod
    def single(cls, engine: Engine) -> EngineSet:
        T = engine.spec.num_train_timesteps
        return cls({0: lambda: engine}, np.zeros(T, np.int64), engine.spec)

    def group_of(self, t: float) -> int:
        """The group serving timestep t: the table's entry for t, or for timestep_key(t) = ⌈t⌉ − 1 for a flow
        model's float t = σ·T in [0, T]."""
        T = len(self.group_of_t)
        if self.spec.timestep_type == "float32" and 0 <= t <= T:
            return int(self.group_of_t[timestep_key(float(t))])
        if not 0 <= t < T or int(t) != t:
            raise EngineInputError(f"timestep {t}: outside [0, {T})")
        return int(self.group_of_t[int(t)])

    def for_timestep(self, t: int) -> Engine:
        g = self.group_of(t)
        if g in self._engines:
            self._engines[g] = self._engines.pop(g)  # most recently used last
        else:
            while self.max_resident is not None and len(self._engines) >= self.max_resident:
                self._engines.pop(next(iter(self._engines)))  # release the least recently used
            self._engines[g] = self._factories[g]()
            self.created += 1
        return self._engines[g]

    @property
    def resident(self) -> list[Engine]:
        """The engines loaded now, least recently used first."""
        return list(self._engines.values())

    @property
    def loaded_groups(self) -> list[int]:
        return sorted(self._engines)
