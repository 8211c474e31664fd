"""Loading a bundle safely: verify every file's hash, never unpickle, keep external data inside."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import manifest_schema
from runtime.engine import EngineSet, InputSpec, OrtEngine, example_cond
from runtime.errors import BundleError, DqcError
from runtime.schedule import FlowSchedule, NoiseSchedule, schedule_from_dict

BUNDLE_FORMAT = "dqc-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED = (
    "format",
    "format_version",
    "model",
    "input_spec",
    "schedule",
    "groups",
    "timestep_to_group",
    "files",
    "target",
    "bits",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _all_tensors(graph):
    """Every tensor a graph holds: initializers, sparse initializers' values and indices, tensor attributes
    of its nodes (Constant among them), and the same inside every subgraph."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def external_data_locations(graph_path: Path) -> list[str]:
    """The external-data file names an ONNX graph refers to, from every tensor it holds (read without
    loading the data)."""
    import onnx

    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: a truncated or foreign file
        raise BundleError(f"{graph_path}: not a readable ONNX graph ({type(e).__name__}); recompile the bundle") from e
    locations = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            locations.add(entries.get("location", ""))
    return sorted(locations)


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input_spec"])

    @property
    def schedule(self) -> NoiseSchedule | FlowSchedule:
        return schedule_from_dict(self.manifest["schedule"])

    @property
    def group_of_t(self) -> np.ndarray:
        return np.asarray(self.manifest["timestep_to_group"], dtype=np.int64)

    @property
    def null_class(self) -> int | None:
        return self.manifest.get("null_class")

    def _entry(self, group: int) -> dict:
        for g in self.manifest["groups"]:
            if g["id"] == group:
                return g
        raise BundleError(f"{self.root / MANIFEST}: no group {group} in 'groups'")

    def graph_path(self, group: int) -> Path:
        """The group's file: a whole ONNX graph, or (with a 'base') an overlay of initializers."""
        return self.root / self._entry(group)["file"]

    def group_model(self, group: int, load_weights: bool = False):
        """The group's whole ONNX graph: its base graph with the overlay's initializers substituted. External
        weights stay references into the bundle unless `load_weights`."""
        import onnx

        entry = self._entry(group)
        if "base" not in entry:
            model = onnx.load(str(self.root / entry["file"]), load_external_data=load_weights)
            check_scales(model, self.root / entry["file"])
            check_class_embeds(model, self.spec, self.root / entry["file"])
            return model
        model = onnx.load(str(self.root / entry["base"]), load_external_data=load_weights)
        tensors = {t.name: i for i, t in enumerate(model.graph.initializer)}
        for t in onnx.load(str(self.root / entry["file"])).graph.initializer:
            if t.name not in tensors:
                raise BundleError(
                    f"{self.root / entry['file']}: overlay initializer {t.name!r} is not in its base graph "
                    f"{entry['base']}; recompile the bundle"
                )
            base = model.graph.initializer[tensors[t.name]]
            if (t.data_type, list(t.dims)) != (base.data_type, list(base.dims)):
                raise BundleError(
                    f"{self.root / entry['file']}: overlay initializer {t.name!r} has type {t.data_type} and shape "
                    f"{list(t.dims)}, its base {base.data_type} {list(base.dims)}; recompile the bundle"
                )
            model.graph.initializer[tensors[t.name]].CopyFrom(t)
        check_scales(model, self.root / entry["file"])
        check_class_embeds(model, self.spec, self.root / entry["base"])
        return model

    @property
    def precisions(self) -> dict:
        """{bits: {"groups", "timestep_to_group", "bops_per_sample"}}, one entry per precision variant."""
        m = self.manifest
        own = {"groups": [g["id"] for g in m["groups"]], "timestep_to_group": m["timestep_to_group"]}
        return m.get("precisions") or {m["bits"]: own}

    def route(self, precision: str | None = None, switch_t: int | None = None, plan: dict | None = None) -> np.ndarray:
        """The group serving each training timestep: the bundle's own route; with `precision`, that precision's
        groups at every step; with `switch_t`, the mixed-precision plan's low precision at t ≥ switch_t and
        its high precision below."""
        variants = self.precisions
        if precision is not None and switch_t is not None:
            raise BundleError("choose one precision or a switch timestep, not both")
        if precision is not None:
            if precision not in variants:
                raise BundleError(f"--precision {precision}: the bundle holds {sorted(variants)}")
            return np.asarray(variants[precision]["timestep_to_group"], np.int64)
        if switch_t is None:
            return self.group_of_t
        plan = plan or self.manifest.get("precision_plan")
        if not plan:
            raise BundleError(f"{self.root}: --switch-t needs a mixed-precision bundle (dqc compile --mixed-bits)")
        if not 0 <= switch_t <= self.spec.num_train_timesteps:
            raise BundleError(f"--switch-t {switch_t}: must be in [0, {self.spec.num_train_timesteps}]")
        low = np.asarray(variants[plan["low"]]["timestep_to_group"], np.int64)
        high = np.asarray(variants[plan["high"]]["timestep_to_group"], np.int64)
        return np.where(np.arange(len(low)) >= switch_t, low, high)

    def precision_of(self, route: np.ndarray) -> list[str]:
        """The precision of the group each timestep of `route` goes to."""
        bits = {g["id"]: g.get("bits", self.manifest["bits"]) for g in self.manifest["groups"]}
        return [bits[int(g)] for g in route]

    def ptqd(self, route: np.ndarray | None = None):
        """The bundle's PTQD statistics for a route (default: its own) as RoutedPtqd (each step reads the
        statistics of the precision serving it), or None when it has none."""
        meta = self.manifest.get("ptqd")
        if not meta:
            return None
        from runtime.ptqd import RoutedPtqd

        route = self.group_of_t if route is None else route
        tables = {bits: self._ptqd_tables(entry) for bits, entry in meta.items()}
        return RoutedPtqd(tables, tuple(self.precision_of(route)))

    def _ptqd_tables(self, meta: dict):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from runtime.ptqd import PtqdTables

        path = self.root / meta["file"]
        try:
            t = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise BundleError(f"{path}: unreadable PTQD statistics ({e}); regather them with dqc compile --ptqd") from e
        missing = [k for k in ("timesteps", "k", "bias", "sigma_q") if k not in t]
        if missing:
            raise BundleError(f"{path}: PTQD statistics lack {missing}; regather them with dqc compile --ptqd")
        ts, T = t["timesteps"], self.spec.num_train_timesteps
        if ts.ndim != 1 or not np.issubdtype(ts.dtype, np.integer) or ((ts < 0) | (ts >= T)).any():
            raise BundleError(f"{path}: PTQD timesteps must be integers in [0, {T}); regather the statistics")
        return PtqdTables.checked(t["timesteps"], t["k"], t["bias"], t["sigma_q"], sampler=meta["sampler"],
                                  steps=meta["steps"], eta=meta["eta"], channels=self.spec.sample_shape[0],
                                  eps_power=t.get("eps_power"), where=str(path))  # fmt: skip

    def engines(
        self, providers: list[str] | None = None, threads: int = 0, *, max_resident: int | None = None,
        prepack: bool = True, route: np.ndarray | None = None, backend: str = "ort", spin: bool | None = None,
        hint: str | None = None, batch: int = 1, single: bool | None = None, prompt_cache: bool = False,
    ) -> EngineSet:  # fmt: skip
        """Engines, one per group, created on first use: ONNX Runtime sessions (`backend="ort"`), OpenVINO
        compiled models on the CPU (`"openvino"`, float parts in `hint` precision), the TensorRT plans
        `dqc build` made (`"trt"`), or `"auto"`: the fastest of these available at `batch` (`resolve_backend`;
        the set's `choice` holds the timings behind it).
        Every backend routes alike; `route` (from Bundle.route) picks other groups per timestep than the
        bundle's own table, `max_resident` bounds how many group engines stay loaded (least recently used ones
        are released), `threads` the worker threads of each (0: the backend's default).
        ONNX Runtime: All group sessions take the weights
        from one in-memory copy of weights.bin and allocate activations from one shared arena;
        `prepack=False` stops each session from keeping its own pre-packed copy of the weights. With several
        groups the sessions' worker threads do not spin-wait between calls (idle sessions would compete
        with the running one); `spin` overrides that (False: never spin, e.g. when other sessions run in
        between).
        `single` (ort-cpu bundles): one engine serves all groups of a precision, its weights packed once: on
        ONNX Runtime one session with each group's quantization parameters bound per group switch
        (runtime.single_engine), on OpenVINO one compiled model whose group-dependent values are inputs
        (runtime.openvino_single; per-group models where that rewrite does not apply); None (default): wherever a
        precision has several groups; False: one engine per group.
        `prompt_cache` (ONNX Runtime and OpenVINO, text bundles): each engine computes the cross-attention keys
        and values once per prompt embedding, not at every step (runtime.prompt_cache); False (default): the whole
        graph per step. Same outputs bit for bit; measured no faster (docs/RESULTS.md: 1.17× slower on the 8×8
        reference-text, within noise on the SD-1.5-shaped UNet), so not the default."""
        if backend == "auto":
            choice: dict = {}
            chosen = resolve_backend(backend, self, batch=batch, record=choice)
            engines = self.engines(providers, threads, max_resident=max_resident, prepack=prepack, route=route,
                                   backend=chosen, spin=spin, hint=hint, single=single,
                                   prompt_cache=prompt_cache)  # fmt: skip
            engines.choice = choice or None
            return engines
        backend = resolve_backend(backend, self)
        if backend == "trt":
            from runtime.tensorrt import trt_engine_set

            return trt_engine_set(self, route, max_resident=max_resident)
        if backend == "openvino":
            from runtime.openvino import DEFAULT_HINT, openvino_engine_set

            return openvino_engine_set(self, route, hint=hint or DEFAULT_HINT, threads=threads,
                                       max_resident=max_resident, prompt_cache=prompt_cache,
                                       shared=self._single_groups(single), single=single)  # fmt: skip
        spec, state = self.spec, {}
        shared = self._single_groups(single)
        sessions = len(self.manifest["groups"]) - sum(len(gs) - 1 for gs in shared.values())
        single_session = sessions == 1 if spin is None else spin  # several sessions: no spin-waiting

        def make(group: int) -> OrtEngine:
            if "weights" not in state:
                state["weights"] = SharedInitializers.from_bundle(self)
            if group in shared:
                key = tuple(shared[group])
                if key not in state:
                    from runtime.single_engine import single_engine

                    state[key] = single_engine(self, list(key), state["weights"], providers=providers, threads=threads,
                                               prepack=prepack, spin=single_session,
                                               prompt_cache=prompt_cache)  # fmt: skip
                return state[key].for_group(group)
            model, prompt = self.group_model(group), None
            if prompt_cache:
                from runtime.prompt_cache import split_prompt_part

                split = split_prompt_part(model)
                if split is not None:
                    prompt_model, model, cut = split
                    prompt = (prompt_model, cut)
            used = {t.name for t in model.graph.initializer}
            return OrtEngine(model.SerializeToString(), spec, providers=providers, threads=threads,
                             external_dir=self.root, initializers=state["weights"].subset(used), prepack=prepack,
                             spin=single_session, name=f"{self.graph_path(group)} (group {group})",
                             prompt=prompt)  # fmt: skip

        factories = {g["id"]: (lambda g=g["id"]: make(g)) for g in self.manifest["groups"]}
        route = self.group_of_t if route is None else route
        return EngineSet(factories, route, spec, max_resident=max_resident)

    def _single_groups(self, single: bool | None) -> dict[int, list[int]]:
        """{group: the groups its single engine serves} for every group that shares one (see `engines`)."""
        if single is False:
            return {}
        if self.manifest["target"] != "ort-cpu":
            if single:
                raise BundleError(f"{self.root}: one engine for all groups needs an ort-cpu bundle (this one is "
                                  f"{self.manifest['target']}); use the per-group engines")  # fmt: skip
            return {}
        return {g: ids for ids in self.precision_groups() if len(ids) > 1 for g in ids}

    def precision_groups(self) -> list[list[int]]:
        """The groups by precision (bits), each sorted: the sets one engine can serve (ORT's single session,
        a refitted TensorRT plan)."""
        by_bits: dict[str, list[int]] = {}
        for g in self.manifest["groups"]:
            by_bits.setdefault(g.get("bits", self.manifest["bits"]), []).append(g["id"])
        return [sorted(ids) for ids in by_bits.values()]


_PACKED = (22, 21)  # TensorProto.INT4, UINT4: two values per byte


class SharedInitializers:
    """The bundle's weights file read once, as ONNX Runtime values every group session uses in place of its
    external initializers (SessionOptions.add_initializer): the weights are in memory once for all groups."""

    def __init__(self, values: dict, buffers: list) -> None:
        self.values, self._buffers = values, buffers  # the buffers back the values: keep them alive

    def subset(self, names) -> SharedInitializers:
        """The same buffers, only the values a graph uses."""
        return SharedInitializers({k: v for k, v in self.values.items() if k in names}, self._buffers)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> SharedInitializers:
        import onnx
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype

        blobs, values = {}, {}
        graphs = dict.fromkeys(g.get("base", g["file"]) for g in bundle.manifest["groups"])  # each file once
        for name in graphs:
            model = onnx.load(str(bundle.root / name), load_external_data=False)
            for t in model.graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL or t.name in values or t.data_type in _PACKED:
                    continue  # 4-bit tensors (TensorRT's INT4 weights) have no numpy type: ONNX Runtime reads them
                e = {x.key: x.value for x in t.external_data}
                loc = e.get("location", "")
                if loc not in blobs:
                    blobs[loc] = np.fromfile(bundle.root / loc, dtype=np.uint8)
                offset, length = e.get("offset", "0"), e.get("length", str(len(blobs[loc])))
                if not (offset.isdigit() and length.isdigit()):
                    raise BundleError(
                        f"{bundle.root / name}: initializer {t.name}: external data offset {offset!r} and length "
                        f"{length!r} must be non-negative integers; recompile the bundle"
                    )
                offset, length = int(offset), int(length)
                if offset + length > len(blobs[loc]):
                    raise BundleError(f"{bundle.root / loc}: initializer {t.name} lies past the end of the file")
                array = blobs[loc][offset : offset + length].view(tensor_dtype_to_np_dtype(t.data_type))
                values[t.name] = ort.OrtValue.ortvalue_from_numpy(array.reshape(tuple(t.dims)))
        return cls(values, list(blobs.values()))


BACKENDS = ("auto", "ort", "openvino", "trt")


def resolve_backend(backend: str, bundle: Bundle | None = None, *, batch: int = 1, record: dict | None = None) -> str:
    """The backend `backend` names; `auto` is the fastest available for the bundle: its TensorRT plans when
    it has them and TensorRT loads; else, where OpenVINO is installed, whichever of ONNX Runtime and OpenVINO
    runs the bundle's group 0 faster at `batch` (`time_cpu_backends`; which wins depends on the model and the
    CPU: docs/RESULTS.md), else ONNX Runtime. `record` receives the timings behind the choice."""
    if backend not in BACKENDS:
        raise BundleError(
            f"--backend {backend!r}: use ort (ONNX Runtime), openvino (OpenVINO CPU), trt (TensorRT plans from "
            "dqc build) or auto (the fastest available)"
        )
    if backend != "auto":
        return backend
    from runtime import openvino

    if bundle is not None and (bundle.manifest.get("engines") or {}).get("trt"):
        from runtime.tensorrt import BuildError, _import_trt

        try:
            _import_trt()
            return "trt"
        except BuildError:  # no TensorRT here: the CPU backends
            pass
    if not openvino.available() or bundle is None:
        return "ort"
    timing = time_cpu_backends(bundle, batch)
    if record is not None:
        record.update(timing)
    return timing["chosen"]


def time_cpu_backends(bundle: Bundle, batch: int, calls: int = 5) -> dict:
    """Median milliseconds per call of the bundle's group 0 on ONNX Runtime and on OpenVINO at `batch` (one
    warm-up call each, then `calls` interleaved), and the faster: {"ort_ms", "openvino_ms", "batch", "chosen"}."""
    import time

    group = int(bundle.group_of_t[len(bundle.group_of_t) // 2])
    route = np.full(len(bundle.group_of_t), group, np.int64)
    engines = {name: bundle.engines(backend=name, route=route).for_timestep(0) for name in ("ort", "openvino")}
    spec = bundle.spec
    x = np.random.default_rng(0).standard_normal((batch, *spec.sample_shape)).astype(np.float32)
    t = np.full(batch, spec.num_train_timesteps // 2, np.int64)
    cond = example_cond(spec, batch)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(calls + 1):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.infer(x, t, cond)
            if i:
                times[name].append(time.perf_counter() - start)
    ms = {name: round(1e3 * float(np.median(v)), 3) for name, v in times.items()}
    return {"ort_ms": ms["ort"], "openvino_ms": ms["openvino"], "batch": batch, "chosen": min(ms, key=ms.get)}


MAX_SCALE = 1e6  # a quantization step beyond this is no calibration result


def check_class_embeds(model, spec: InputSpec, where: Path) -> None:
    """The manifest's named inputs must be the graph's (a class_labels input exactly when the spec has class
    embeddings), and the embedding table the labels gather from must have as many rows."""
    graph_inputs = [i.name for i in model.graph.input]
    if set(graph_inputs) - {"class_labels"} != set(spec.names) - {"class_labels"}:  # class_labels: below
        raise BundleError(
            f"{where}: the graph's inputs are {graph_inputs}, the manifest's input_spec names {spec.names}; "
            "recompile the bundle"
        )
    has_input = "class_labels" in graph_inputs
    if has_input != (spec.num_class_embeds is not None):
        raise BundleError(
            f"{where}: the graph {'has' if has_input else 'has no'} class_labels input, the manifest's input_spec "
            f"says num_class_embeds = {spec.num_class_embeds}; recompile the bundle"
        )
    if spec.context_shape is not None:
        value = next(i for i in model.graph.input if i.name == "encoder_hidden_states")
        shape = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if shape[1:] != list(spec.context_shape):
            raise BundleError(
                f"{where}: the graph's encoder_hidden_states is (B, {', '.join(map(str, shape[1:]))}), the "
                f"manifest's input_spec says (B, {', '.join(map(str, spec.context_shape))}); recompile the bundle"
            )
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and list(node.input[1:2]) == ["class_labels"] and node.input[0] in dims:
            rows = dims[node.input[0]][0]
            if rows != spec.num_class_embeds:
                raise BundleError(
                    f"{where}: the class embedding {node.input[0]!r} has {rows} rows, the manifest's input_spec "
                    f"says num_class_embeds = {spec.num_class_embeds}; recompile the bundle"
                )


def check_scales(model, where: Path) -> None:
    """Every Q/DQ scale the graph holds inline must be finite, > 0 and at most MAX_SCALE: a NaN or huge
    scale turns every sample into NaN or noise."""
    from onnx import numpy_helper

    inline = {t.name: t for t in model.graph.initializer if not t.external_data}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        t = inline.get(node.input[1])
        if t is None:
            continue
        s = numpy_helper.to_array(t).astype(np.float64)
        if not (np.isfinite(s).all() and (s > 0).all() and (s <= MAX_SCALE).all()):
            bad = s[~(np.isfinite(s) & (s > 0) & (s <= MAX_SCALE))].ravel()[0]
            raise BundleError(
                f"{where}: scale {t.name!r} of {node.op_type} {node.name!r} is {bad}; scales must be finite, "
                f"> 0 and ≤ {MAX_SCALE:g} — recompile the bundle"
            )


def _inside(root: Path, name: str) -> bool:
    try:
        (root / name).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return bool(name) and not Path(name).is_absolute()


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle directory; raises `BundleError` naming the bad file or field."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root}: not a dqc bundle ({MANIFEST} missing); create one with 'dqc compile'")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); recompile the bundle") from e
    missing = [k for k in _REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(_REQUIRED)
    if missing:
        raise BundleError(f"{mpath}: missing fields {missing}; recompile the bundle")
    manifest_schema.check(manifest, mpath)  # every field typed before anything reads it
    try:
        schedule_from_dict(manifest["schedule"])
    except (DqcError, TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: schedule: {e}; recompile the bundle") from None
    if manifest["format"] != BUNDLE_FORMAT or manifest["format_version"] != BUNDLE_VERSION:
        raise BundleError(
            f"{mpath}: format {manifest['format']!r} v{manifest['format_version']} is not "
            f"{BUNDLE_FORMAT!r} v{BUNDLE_VERSION}; recompile it with this dqc"
        )
    for name, digest in manifest["files"].items():
        if not _inside(root, name):
            raise BundleError(f"{mpath}: file entry {name!r} points outside the bundle directory")
        fpath = root / name
        if not fpath.is_file():
            raise BundleError(f"{fpath}: listed in {MANIFEST} but missing; recompile or restore the bundle")
        if sha256_file(fpath) != digest:
            raise BundleError(
                f"{fpath}: sha256 does not match {MANIFEST} (file changed or corrupted); recompile the bundle"
            )
    bundle = Bundle(root, manifest)
    checked = set()  # overlays share their base graph: read each graph file once
    for g in manifest["groups"]:
        for name in filter(None, (g["file"], g.get("base"))):
            if name not in manifest["files"]:
                raise BundleError(f"{mpath}: group {g['id']} graph {name!r} is not hashed in 'files'")
            if name in checked:
                continue
            checked.add(name)
            for loc in external_data_locations(root / name):
                if not _inside(root, loc):
                    raise BundleError(
                        f"{root / name}: external data path {loc!r} leaves the bundle directory; refusing to load"
                    )
                if loc not in manifest["files"]:
                    raise BundleError(f"{root / name}: external data {loc!r} is not hashed in {MANIFEST}")
    for bits, entry in (manifest.get("ptqd") or {}).items():
        if not isinstance(entry, dict) or entry.get("file") not in manifest["files"]:
            raise BundleError(f"{mpath}: PTQD statistics of {bits} are not listed or not hashed in 'files'; recompile")
    table = manifest["timestep_to_group"]
    if not isinstance(table, list) or len(table) != bundle.spec.num_train_timesteps:
        raise BundleError(f"{mpath}: 'timestep_to_group' must have one entry per training timestep")
    ids = {g["id"] for g in manifest["groups"]}
    holes = sorted({t for t, g in enumerate(table) if not isinstance(g, int) or g not in ids})
    if holes:
        raise BundleError(
            f"{mpath}: 'timestep_to_group' routes timesteps {_ranges(holes)} to no listed group "
            f"(groups: {sorted(ids)}); recompile the bundle"
        )
    for bits, v in manifest.get("precisions", {}).items():
        table, own = v.get("timestep_to_group"), set(v.get("groups", []))
        if not isinstance(table, list) or len(table) != len(manifest["timestep_to_group"]) or not set(table) <= own:
            raise BundleError(f"{mpath}: precision {bits} must route every training timestep to its own groups")
    plan = manifest.get("precision_plan")
    if plan and not {plan.get("low"), plan.get("high")} <= set(manifest.get("precisions", {})):
        raise BundleError(f"{mpath}: 'precision_plan' names precisions the bundle does not hold; recompile")
    return bundle


def _ranges(ts: list[int]) -> str:
    """[0, 1, 2, 7] → '0-2, 7'."""
    out, start = [], ts[0]
    for a, b in zip(ts, [*ts[1:], None], strict=True):
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ", ".join(out)
