"""TensorRT backend, runtime side: `TrtEngine`, the Engine contract on one plan, and `trt_engine_set` over a
bundle's plans; plus what runtime.trt_build (which builds the plans, driven by tools/deploy/build.py) shares with it:
BuildError, the lazy TensorRT import, the per-process logger and runtime, ENGINE_DIR and DEFAULT_BATCH_SIZES (the
batch profile is described there).

TensorRT and polygraphy.cuda are imported inside functions through `_import_trt`, so an ONNX Runtime bundle needs
neither and a missing TensorRT says so in one line. As in Polygraphy, constructors only store arguments and nothing
touches the GPU before `activate()`.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from runtime.engine import EngineSet, InputSpec, check_inputs
from runtime.errors import DqcError, EngineInputError

MISSING_TRT = (
    "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and CUDA) — or run the bundle on ONNX Runtime"
)
MISSING_POLYGRAPHY = "polygraphy is not installed: pip install polygraphy (dqc's TensorRT engines use polygraphy.cuda)"
BACKENDS = ("trt",)
DEFAULT_BATCH_SIZES = (1, 16, 32)
ENGINE_DIR = "engines/trt"  # inside the bundle
_PROCESS: dict = {}  # one TensorRT logger and runtime per process, created on first use


class BuildError(DqcError):
    """TensorRT engines cannot be built, loaded or run: TensorRT missing, a parse or build failure, an INT8 layer
    that fell back to float, plans missing or built by another TensorRT version."""


def _import_trt():
    """(tensorrt, polygraphy.cuda); raises a one-line BuildError when either is missing."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer / CUDA is not
        raise BuildError(MISSING_TRT) from e
    try:
        from polygraphy import cuda
    except ImportError as e:
        raise BuildError(MISSING_POLYGRAPHY) from e
    return trt, cuda


def tensorrt_version() -> str:
    return _import_trt()[0].__version__


def _logger(trt):
    if "logger" not in _PROCESS:
        _PROCESS["logger"] = trt.Logger(trt.Logger.WARNING)
    return _PROCESS["logger"]


def _device_memory(engine) -> int:
    """Activation memory one execution context needs (device_memory_size_v2: TensorRT >= 10.1)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def _deserialize(plan: bytes, what: str):
    trt, _ = _import_trt()
    if "runtime" not in _PROCESS:
        _PROCESS["runtime"] = trt.Runtime(_logger(trt))
    engine = _PROCESS["runtime"].deserialize_cuda_engine(plan)
    if engine is None:
        raise BuildError(
            f"{what}: TensorRT {trt.__version__} cannot load this plan (built by another TensorRT version or for "
            "another GPU); rebuild with dqc build BUNDLE --backend trt"
        )
    return trt, engine


# --- running ---


class SharedScratch:
    """Device memory all group engines of a bundle share: one CUDA stream, one activation buffer as large as the
    largest engine needs (contexts are created without memory of their own), one buffer per I/O tensor. One group
    runs at a time and every call synchronizes, so sharing is safe. Allocates nothing before an engine activates;
    frees everything when it is garbage-collected."""

    def __init__(self) -> None:
        self.size = 0
        self._cuda = self._stream = self._memory = None
        self._arrays: list = []  # every device array, freed by the finalizer
        self._io: dict = {}
        self._users: weakref.WeakSet = weakref.WeakSet()  # engines whose contexts point at `_memory`

    def stream(self):
        """The CUDA stream every engine of the set runs on (created, with the finalizer, on first use)."""
        if self._stream is None:
            _, self._cuda = _import_trt()
            self._stream = self._cuda.Stream()
            weakref.finalize(self, SharedScratch._release, self._arrays, self._stream)
        return self._stream

    @staticmethod
    def _release(arrays: list, stream) -> None:
        for a in arrays:
            a.free()
        stream.free()

    def _allocate(self, shape: tuple[int, ...], dtype):
        self.stream()
        array = self._cuda.DeviceArray(shape=shape, dtype=dtype)
        self._arrays.append(array)
        return array

    def attach(self, engine: TrtEngine, size: int) -> None:
        """Point `engine`'s context at the shared activation memory, first growing it (and re-pointing every live
        context) when `engine` needs more than any engine before."""
        if size > self.size:
            self.stream().synchronize()  # nothing may still run in the old buffer
            old, self._memory, self.size = self._memory, self._allocate((size,), np.uint8), size
            for user in list(self._users):
                user.bind_memory(self._memory.ptr, size)
            if old is not None:
                self._arrays.remove(old)
                old.free()
        self._users.add(engine)
        if self._memory is not None:
            engine.bind_memory(self._memory.ptr, self.size)

    def buffer(self, name: str, dtype: np.dtype):
        """The device buffer of I/O tensor `name` (resized by the caller)."""
        key = (name, np.dtype(dtype).str)
        if key not in self._io:
            self._io[key] = self._allocate((0,), dtype)
        return self._io[key]


class TrtEngine:
    """The Engine contract on one TensorRT plan. The constructor only stores arguments; `activate()` (run by the
    first `infer`) deserializes the plan and creates an execution context without device memory of its own,
    pointed at `scratch`, which the bundle's other group engines share. `batch_range` is the plan's (min, max)
    batch (from the manifest; read from the plan when None)."""

    def __init__(
        self, plan: str | Path, spec: InputSpec, *, scratch: SharedScratch | None = None,
        batch_range: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        self.plan, self.spec, self.batch_range = Path(plan), spec, batch_range
        self.scratch = scratch if scratch is not None else SharedScratch()
        self._engine = self._context = None
        self._io: dict[str, tuple[bool, np.dtype]] = {}  # name → (is input, dtype)

    def activate(self):
        if self._context is not None:
            return self._context
        _import_trt()  # the one-line error first
        try:
            plan = self.plan.read_bytes()
        except OSError as e:
            raise BuildError(
                f"{self.plan}: cannot read the plan ({e.strerror}); run dqc build BUNDLE --backend trt"
            ) from e
        trt, engine = _deserialize(plan, str(self.plan))
        self._io = self._tensors(trt, engine)
        if self.batch_range is None:
            low, _, high = engine.get_tensor_profile_shape("sample", 0)
            self.batch_range = (int(low[0]), int(high[0]))
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:
            context = engine.create_execution_context(strategy.USER_MANAGED)
        else:  # early TensorRT 10 releases
            context = engine.create_execution_context_without_device_memory()
        if context is None:
            raise BuildError(f"{self.plan}: TensorRT could not create an execution context (its log says why)")
        self._engine, self._context = engine, context  # the engine must outlive its context
        try:
            self.scratch.attach(self, _device_memory(engine))
        except BaseException:
            self.deactivate()
            raise
        return context

    def _tensors(self, trt, engine) -> dict[str, tuple[bool, np.dtype]]:
        """{name: (is input, dtype)} of the plan's I/O tensors, which must be what the bundle's model feeds."""
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            io[name] = (is_input, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        inputs = sorted(name for name, (is_input, _) in io.items() if is_input)
        fed = sorted(self.spec.names)
        if inputs != fed or len(io) != len(fed) + 1:
            raise BuildError(
                f"{self.plan}: the plan has inputs {inputs} and {len(io) - len(inputs)} outputs, the bundle's model "
                f"takes {fed} and gives eps; the plan belongs to another model: rebuild with dqc build BUNDLE"
            )
        return io

    def bind_memory(self, ptr: int, size: int) -> None:
        if self._context is None:  # deactivated
            return
        try:
            self._context.set_device_memory(ptr, size)  # TensorRT >= 10.1
        except (AttributeError, TypeError):  # 10.0: the property; the size is the engine's device_memory_size
            self._context.device_memory = ptr

    def deactivate(self) -> None:
        self._engine = self._context = None

    def check_batch(self, batch: int) -> None:
        low, high = self.batch_range
        if not low <= batch <= high:
            raise EngineInputError(
                f"input 'sample': batch {batch} is outside the TensorRT profile [{low}, {high}] of {self.plan}; "
                f"rebuild with `dqc build BUNDLE --batch-sizes {min(batch, low)},{max(batch, high)}` (with guidance "
                "the sampler calls the engine with twice --batch-size)"
            )

    def infer(self, sample, timestep, cond=None) -> np.ndarray:
        sample, timestep, cond = check_inputs(self.spec, sample, timestep, cond)
        if self.batch_range is None:
            self.activate()
        self.check_batch(sample.shape[0])
        context, stream = self.activate(), self.scratch.stream()
        feeds = {"sample": sample, "timestep": timestep, self.spec.condition: cond}
        outputs = {}
        for name, (is_input, dtype) in self._io.items():
            buf = self.scratch.buffer(name, dtype)
            if is_input:
                buf.copy_from(np.ascontiguousarray(feeds[name].astype(dtype, copy=False)), stream)  # int64 → int32
                if not context.set_input_shape(name, buf.shape):
                    raise EngineInputError(f"{self.plan}: input {name!r} shape {buf.shape} is outside the profile")
            else:
                buf.resize(tuple(context.get_tensor_shape(name)))
                outputs[name] = buf
            context.set_tensor_address(name, buf.ptr)
        if not context.execute_async_v3(stream.ptr):
            raise BuildError(f"{self.plan}: TensorRT failed to run the engine (its log says why)")
        (buf,) = outputs.values()
        eps = buf.copy_to(np.empty(buf.shape, buf.dtype), stream)
        stream.synchronize()
        return eps.astype(np.float32, copy=False)


def plan_paths(bundle) -> tuple[dict[int, Path], dict]:
    """({group: plan path}, manifest["engines"]["trt"]) of a bundle; refuses a bundle without built plans, with a
    group or plan file missing, or with a plan the manifest does not hash."""
    entry = (bundle.manifest.get("engines") or {}).get("trt")
    rebuild = f"run dqc build {bundle.root} --backend trt"
    if not entry or not entry.get("plans"):
        raise BuildError(f"{bundle.root}: the bundle has no TensorRT engines; {rebuild}")
    plans = {int(g): name for g, name in entry["plans"].items()}
    missing = sorted({g["id"] for g in bundle.manifest["groups"]} - set(plans))
    if missing:
        raise BuildError(f"{bundle.root}: no TensorRT plans for groups {missing}; {rebuild}")
    for name in plans.values():
        if not (bundle.root / name).is_file():
            raise BuildError(f"{bundle.root / name}: TensorRT plan missing; {rebuild}")
        if name not in bundle.manifest["files"]:
            raise BuildError(f"{bundle.root / name}: TensorRT plan not hashed in manifest.json 'files'; {rebuild}")
    return {g: bundle.root / name for g, name in plans.items()}, entry


def trt_engine_set(bundle, route: np.ndarray | None = None, *, max_resident: int | None = None) -> EngineSet:
    """TensorRT engines, one per group, created on first use, sharing one SharedScratch (stream, activation memory,
    I/O buffers). `route` (from Bundle.route) picks other groups per timestep than the bundle's own table;
    `max_resident` bounds how many deserialized plans stay loaded (as in Bundle.engines)."""
    plans, entry = plan_paths(bundle)
    version = tensorrt_version()
    if entry.get("tensorrt_version") != version:
        raise BuildError(
            f"{bundle.root}: plans built by TensorRT {entry.get('tensorrt_version')}, this is TensorRT {version}; "
            f"a plan loads only in the TensorRT version that built it: run dqc build {bundle.root} --backend trt"
        )
    factories = engine_factories(bundle, plans, entry)
    return EngineSet(factories, bundle.group_of_t if route is None else route, bundle.spec, max_resident=max_resident)


def engine_factories(bundle, plans: dict[int, Path], entry: dict) -> dict:
    """{group: () → Engine} over one SharedScratch. Per-group plans: an engine each. Refitted plans (entry "mode"
    "refit", runtime.trt_refit): the groups of one plan share one RefitEngine, created on first use, its
    per-group scales read from the bundle's group graphs then."""
    spec, scratch = bundle.spec, SharedScratch()
    batches = entry.get("batch_sizes")
    batch_range = (int(batches[0]), int(batches[-1])) if batches else None  # None: read from the plan

    def engine(path: Path) -> TrtEngine:
        return TrtEngine(path, spec, scratch=scratch, batch_range=batch_range)

    if entry.get("mode", "per-group") == "per-group":
        return {g: (lambda g=g: engine(plans[g])) for g in plans}
    if entry["mode"] != "refit":
        raise BuildError(f"{bundle.root}: TensorRT engine mode {entry['mode']!r} is unknown to this dqc; rebuild "
                         f"with dqc build {bundle.root}")  # fmt: skip
    shared: dict = {}
    by_plan: dict[Path, list[int]] = {}
    for g, path in sorted(plans.items()):
        by_plan.setdefault(path, []).append(g)

    def refit(g: int):
        from runtime.trt_refit import RefitEngine, refit_tables

        path = plans[g]
        if path not in shared:
            _, tables = refit_tables(bundle, by_plan[path])
            shared[path] = RefitEngine(engine(path), tables, by_plan[path])
        return shared[path].for_group(g)

    return {g: (lambda g=g: refit(g)) for g in plans}
