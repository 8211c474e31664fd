"""`dqc bench`: speed and memory of our engines against the tools a user would otherwise pick, as ratios
measured in one run.

Per model (the shipped reference model and/or the CIFAR-10-shaped UNet with random weights):
- engines: ONNX Runtime FP32 on the exported float graph (and on the same graph after our shape folding, to show how
  much of the gain is graph cleanup); ONNX Runtime's own static quantizer (`quant_pre_process`
  then `quantize_static`: QDQ, per-channel, U8 activations, S8 weights, MinMax, on the same calibration inputs as
  ours) — the peer; our W8A8 bundle with one scale set (G = 1) and with eight timestep groups (G = 8), on ONNX
  Runtime and on OpenVINO (`-ov`, float parts in runtime.openvino.DEFAULT_HINT); and, where OpenVINO is installed,
  the CPU alternative a user would pick: OpenVINO on the float graph with its default precision hint (`ov-fp32`:
  bf16 on CPUs that have it) and OpenVINO + NNCF INT8 on the same calibration inputs (`ov-nncf`);
- per-step latency (median, p10, p90) at each batch, all engines interleaved in one process at the same timesteps
  (cycling through the calibrated steps, so G = 8 switches groups as in sampling); ratios ours/FP32, ours/peer;
- resident memory: RSS growth from loading each engine (every group for G = 8) and running it, each in a fresh
  process;
- the whole sampling loop (100 DDIM steps, batch 1) wall time FP32 vs ours, and what the host loop adds over the
  bare engine calls;
- ORT's optimized-graph op counts (integer kernels, Q/DQ nodes) and, on the reference model, the quality of every
  engine's samples (PSNR against FP32 samples from the same seeds) — speed must not cost accuracy.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import openvino
from runtime.engine import session_options
from runtime.errors import ConfigError
from tools.bench.group_bench import memory_timesteps, rss_mb
from tools.deploy import pipeline

# engine: (backend, the graph or bundle it runs); backend "openvino-default" is OpenVINO with its own precision hint,
# "ort-pergroup" / "openvino-pergroup" one session / compiled model per group (dqc-G8 and dqc-G8-ov run one for all
# groups)
ENGINES = {
    "fp32": ("ort", "fp32"),
    "fp32-folded": ("ort", "fp32-folded"),
    "ort-static": ("ort", "ort-static"),
    "dqc-G1": ("ort", "dqc-G1"),
    "dqc-G8": ("ort", "dqc-G8"),
    "dqc-G8-split": ("ort-pergroup", "dqc-G8"),
    "ov-fp32": ("openvino-default", "fp32"),
    "ov-nncf": ("openvino-default", "ov-nncf"),
    "dqc-G1-ov": ("openvino", "dqc-G1"),
    "dqc-G8-ov": ("openvino", "dqc-G8"),
    "dqc-G8-ov-split": ("openvino-pergroup", "dqc-G8"),
    # --w4: W4A8, G = 1, with the weights in int8 containers and packed for MatMulNBits (exporter.nbits)
    "dqc-W4": ("ort", "dqc-W4"),
    "dqc-W4-nbits": ("ort", "dqc-W4-nbits"),
    "dqc-W4-nbits-int8": ("ort", "dqc-W4-nbits-int8"),
    "dqc-W4-nbits-ov": ("openvino", "dqc-W4-nbits"),
    # --quantize-attention: W8A8, G = 1, with the attention score and value products quantized too
    "dqc-G1-attnq": ("ort", "dqc-G1-attnq"),
    "dqc-G1-attnq-ov": ("openvino", "dqc-G1-attnq"),
}
OURS = ("dqc-G1", "dqc-G8", "dqc-G1-ov", "dqc-G8-ov")
LOOPED = {8: ("dqc-G8", "dqc-G8-ov"), 1: ("dqc-G1", "dqc-G1-ov")}  # ours in the whole-loop timing: G = 8 if built
W4 = ("dqc-W4", "dqc-W4-nbits", "dqc-W4-nbits-int8", "dqc-W4-nbits-ov")
BASES = ("fp32", "ort-static", "ov-fp32", "ov-nncf")
MODELS = ("reference", "cifar10", "tiny", "dit-s2", "dit-xl2", "tiny-text", "sd15")
# text-to-image UNets (tools.bench.synthetic.TEXT_SHAPES): the engines take N(0, 1) text embeddings when timed
TEXT_MODELS = {"tiny-text": "tiny", "sd15": "sd15"}
BENCH_PROMPTS = ("a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn")
TEXT_GUIDANCE = 7.5


@dataclass(frozen=True)
class BenchPlan:
    """What one `dqc bench` run measures."""

    models: tuple[str, ...] = ("reference", "cifar10")
    batches: tuple[int, ...] = (1, 8)
    reps: int = 20
    loop_steps: int = 100
    quality_samples: int = 64
    calib_samples: int = 8
    calib_timesteps: int = 8
    memory: bool = True
    profile: bool = False
    w4: bool = False  # also W4A8 bundles: int8-container weights against MatMulNBits-packed ones
    attention: bool = False  # also the G = 1 bundle with quantized attention products
    groups: tuple[int, ...] = (1, 8)  # our bundles: one scale set (G = 1) and/or 8 timestep groups (G = 8)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("--models: name at least one model")
        if not self.batches or min(self.batches) < 1 or self.reps < 1:
            raise ConfigError(f"--batches {self.batches} / --reps {self.reps}: must be at least 1")
        if self.loop_steps < 1:
            raise ConfigError(f"--loop-steps {self.loop_steps}: must be at least 1")
        if not self.groups or set(self.groups) - {1, 8}:
            raise ConfigError(f"--groups {','.join(map(str, self.groups))}: the speed bench compiles G = 1 and/or 8")
        if 8 in self.groups and self.calib_timesteps < 8:
            raise ConfigError(f"calib_timesteps={self.calib_timesteps}: G = 8 needs at least 8 calibrated steps")

    @classmethod
    def quick(cls) -> BenchPlan:
        """The CI smoke run: the tiny model, batch 1, a few repetitions, a short loop."""
        return cls(models=("tiny",), batches=(1,), reps=3, loop_steps=10, quality_samples=4, calib_samples=4)


def _inputs(spec, batch: int, seed: int = 0):
    """(sample, condition) rows for timing calls: noise, and the classes cycled or N(0, 1) text embeddings."""
    from runtime.engine import example_cond

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spec.sample_shape), dtype=np.float32)
    return x, example_cond(spec, batch, rng)


def open_engine(backend: str, path: str, spec=None):
    """An EngineSet for a bench engine: a bundle directory or a single graph file (FP32, a peer) on `backend` (ort,
    openvino, or openvino-default: OpenVINO's own precision hint; a bundle also on ort-pergroup / openvino-pergroup:
    one engine per group instead of one for all groups). No ONNX Runtime session's worker threads
    spin-wait after a call: in interleaved runs the next call is another session's, and spinning workers would take
    its cores (measured: per-call times up to 1.7x the spin-free ones)."""
    from runtime.bundle import load_bundle
    from runtime.engine import EngineSet, OrtEngine
    from runtime.openvino import OpenVinoEngine

    if Path(path).is_dir():
        if backend == "openvino-default":
            raise ConfigError("bench: a bundle runs on ort, ort-pergroup, openvino or openvino-pergroup")
        if backend in ("ort-pergroup", "openvino-pergroup"):
            return load_bundle(path).engines(spin=False, backend=backend.removesuffix("-pergroup"), single=False)
        return load_bundle(path).engines(spin=False, backend=backend)
    if backend == "ort":
        return EngineSet.single(OrtEngine(Path(path), spec, spin=False))
    hint = None if backend == "openvino-default" else "f32"
    return EngineSet.single(OpenVinoEngine(Path(path), spec, hint=hint))


def resident_memory(backend: str, path: str, spec: dict, batch: int) -> dict:
    """In this process (a fresh one): RSS growth from opening the engine and running it over
    group_bench.memory_timesteps (every group, the same calls whatever the group count)."""
    import onnxruntime  # noqa: F401  (the runtimes' imports are not part of the engine)

    from runtime.engine import InputSpec
    from runtime.openvino import available, core

    if backend.startswith("openvino") and available():
        core()
    spec = InputSpec.from_dict(spec)
    base = rss_mb()
    engines = open_engine(backend, path, spec)
    x, labels = _inputs(spec, batch)
    for t in memory_timesteps(engines.group_of_t):
        engines.for_timestep(t).infer(x, np.full(batch, t, np.int64), labels)
    return {"rss_mb": round(rss_mb() - base, 2), "engines": len(set(engines.group_of_t.tolist()))}


def _memory_child() -> None:
    print(json.dumps(resident_memory(**json.loads(sys.argv[1]))))


def measure_memory(backend: str, path: str, spec, batch: int) -> dict:
    code = "from tools.bench.speed import _memory_child; _memory_child()"
    args = json.dumps({"backend": backend, "path": str(path), "spec": spec.to_dict(), "batch": batch})
    root = str(Path(__file__).resolve().parents[2])  # the repository root
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {path} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_latency(engines: dict, spec, timesteps: list[int], batch: int, reps: int) -> dict:
    """Per-call seconds of each engine set, runs interleaved: repetition r calls every engine at timestep
    timesteps[r % len]; first a warm-up call of every engine at each timestep where some engine set changes
    group (sessions created, arenas grown)."""
    x, labels = _inputs(spec, batch)
    times: dict[str, list[float]] = {k: [] for k in engines}
    warm = {timesteps[0]} | {b for a, b in zip(timesteps, timesteps[1:], strict=False)
                             if any(es.group_of(a) != es.group_of(b) for es in engines.values())}  # fmt: skip
    for t in sorted(warm):
        for es in engines.values():
            es.for_timestep(t).infer(x, np.full(batch, t, np.int64), labels)
    for r in range(reps):
        t = timesteps[r % len(timesteps)]
        ts = np.full(batch, t, np.int64)
        for name, es in engines.items():
            engine = es.for_timestep(t)
            start = time.perf_counter()
            engine.infer(x, ts, labels)
            times[name].append(time.perf_counter() - start)
    return {name: _stats(v) for name, v in times.items()}


def _stats(seconds: list[float]) -> dict:
    ms = 1e3 * np.asarray(seconds)
    return {"median_ms": round(float(np.median(ms)), 3), "p10_ms": round(float(np.percentile(ms, 10)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3)}  # fmt: skip


def sampling_loop(engines: dict, schedule, spec, null_cond, steps: int, guidance: float) -> dict:
    """Wall time of the whole host sampling loop (DDIM `steps`, one sample) per engine set, and what the loop
    adds over the bare engine calls: against the same calls (the guided batch: cond and uncond) at the same
    timesteps without the sampler around them (`loop_overhead`; loop and bare runs interleaved, 3 each,
    medians), and within each loop run, its time outside the engine calls (`host_share`, free of run-to-run
    noise)."""
    from runtime.sampler import SamplerConfig, sample

    cfg = SamplerConfig("ddim", steps, 0.0, guidance)
    ts = [int(t) for t in schedule.timesteps(steps)]
    guided = spec.condition is not None and guidance != 1.0
    x, labels = _inputs(spec, 2 if guided else 1)
    one = None if labels is None else labels[:1]
    runs: dict[str, dict[str, list[float]]] = {k: {"loop": [], "bare": [], "inside": []} for k in engines}
    for _ in range(3):
        for name, es in engines.items():
            start = time.perf_counter()
            run = sample(es, schedule, cfg, n=1, seed=0, cond=one, null_cond=null_cond, batch_size=1,
                         progress=False)  # fmt: skip
            runs[name]["loop"].append(time.perf_counter() - start)
            runs[name]["inside"].append(run.engine_seconds)
            start = time.perf_counter()
            for t in ts:
                es.for_timestep(t).infer(x, np.full(len(x), t, np.int64), labels)
            runs[name]["bare"].append(time.perf_counter() - start)
    out = {}
    for name, v in runs.items():
        loop, bare = float(np.median(v["loop"])), float(np.median(v["bare"]))
        host = float(np.median([a / b - 1 for a, b in zip(v["loop"], v["inside"], strict=True)]))
        out[name] = {"seconds": round(loop, 4), "bare_engine_seconds": round(bare, 4),
                     "loop_overhead": round(loop / bare - 1, 4), "host_share": round(host, 4)}  # fmt: skip
    return out


def _load(name: str, root: Path):
    """(LoadedModel, guidance) of a bench model: the shipped reference model, or a synthetic shape."""
    from calibration.model_io import load_model
    from tools.bench.synthetic import build_unet, save_pipeline
    from tools.reference.model import REFERENCE_GUIDANCE, resolve_model

    if name == "reference":
        return load_model(resolve_model("reference")), REFERENCE_GUIDANCE
    if name not in MODELS:
        if Path(name).is_dir():
            return load_model(resolve_model(name)), 1.0
        raise ConfigError(f"--models {name!r}: use {', '.join(MODELS)} or a model directory")
    if name.startswith("dit-"):
        from tools.bench.synthetic import save_dit_pipeline

        return load_model(save_dit_pipeline(root / name, name)), 1.0
    if name in TEXT_MODELS:  # random weights, calibrated on synthetic prompts, sampled with guidance (batch 2)
        from tools.bench.synthetic import save_text_pipeline

        pipe = save_text_pipeline(root / name, TEXT_MODELS[name], vae=False)
        return load_model(pipe, prompts=BENCH_PROMPTS), TEXT_GUIDANCE
    return load_model(save_pipeline(build_unet(name), root / name)), 1.0


def build_engines(model, guidance: float, root: Path, plan: BenchPlan, progress: bool) -> dict:
    """Compile every engine of the comparison for one model; returns paths and compile seconds."""

    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig
    from exporter.onnx_export import export_float
    from tools.bench.peer import nncf_peer, quantize_static_peer

    trained = model.source is not None and "reference_model" in str(model.source)
    common = dict(bits="W8A8", steps=plan.loop_steps, guidance=guidance, batch_size=16,
                  calib_samples=32 if trained else plan.calib_samples,
                  calib_timesteps=16 if trained else plan.calib_timesteps)  # fmt: skip
    g1 = CalibrationConfig.for_method("lp", **common)
    g8 = CalibrationConfig.for_method("apqdm", **common, groups=8, timestep_selection="uniform",
                                      group_epochs=2 if trained else 1)  # fmt: skip
    from exporter.simplify import fold_shapes

    paths = {
        "fp32": root / "fp32.onnx",
        "fp32-folded": root / "fp32_folded.onnx",
        "ort-static": root / "ort_static.onnx",
    }
    seconds = {}
    from exporter.large_model import save

    fp = export_float(model)
    save(fp, paths["fp32"])  # past 2 GiB (DiT-XL/2) its weights go to fp32.onnx.data, which the peers read
    save(fold_shapes(fp), paths["fp32-folded"])  # our graph cleanup alone: how much of the gain it is
    del fp  # 2.7 GB for DiT-XL/2: not held through the calibrations below
    gc.collect()
    start = time.perf_counter()
    data = record_trajectories(model, g1, progress)
    record = time.perf_counter() - start
    quantize_static_peer(paths["fp32"], paths["ort-static"], data)
    seconds["ort-static"] = round(time.perf_counter() - start, 1)
    _settle()
    skipped = {}
    if not openvino.available():
        skipped["openvino"] = openvino.MISSING_OPENVINO
    else:
        try:
            start = time.perf_counter()
            paths["ov-nncf"] = nncf_peer(paths["fp32"], root / "ov_nncf.xml", data, progress=progress)
            seconds["ov-nncf"] = round(time.perf_counter() - start + record, 1)
        except ConfigError as e:  # nncf missing: the other OpenVINO rows still run
            skipped["ov-nncf"] = str(e)
    variants = [(f"dqc-G{g}", {1: g1, 8: g8}[g]) for g in sorted(plan.groups)]
    if plan.attention:
        variants.append(("dqc-G1-attnq", dataclasses.replace(g1, attention_products=True)))
    for name, cfg in variants:
        start = time.perf_counter()
        paths[name] = pipeline.compile_model(model, root / name, cfg, overwrite=True, progress=progress)
        seconds[name] = round(time.perf_counter() - start, 1)
        _settle()
    if plan.w4:  # one W4A8 calibration, written with each weight layout
        from calibration.calibrate import calibrate
        from exporter.bundle_writer import write_bundle

        start = time.perf_counter()
        result = calibrate(model, CalibrationConfig.for_method("lp", **(common | {"bits": "W4A8"})), progress=progress)
        seconds["dqc-W4 calibration"] = round(time.perf_counter() - start, 1)
        for name, layout in (("dqc-W4", "int8"), ("dqc-W4-nbits", "nbits"), ("dqc-W4-nbits-int8", "nbits-int8")):
            paths[name] = write_bundle(model, result, root / name, overwrite=True, progress=progress, w4_linear=layout)
    return {"paths": paths, "compile_seconds": seconds, "calibration": {"inputs": len(data), **common},
            "skipped": skipped}  # fmt: skip


def _bytes_on_disk(path: Path) -> int:
    """A graph with its external data (or OpenVINO IR with its .bin), or a bundle directory's files."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return sum(f.stat().st_size for f in (path, Path(f"{path}.data"), path.with_suffix(".bin")) if f.is_file())


def memory_available() -> int:
    """Bytes the kernel reckons can still be allocated without swapping (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def timed_together(chosen: dict, available: int) -> tuple[dict, dict]:
    """The engines timed side by side in one process, and those left out with the reason. All of them fit on the
    reference models; on a DiT-XL/2- or SD-1.5-sized model they may not. Estimated from the weights on disk (x 1.3
    for the runtimes' own buffers), the engines a comparison can spare leave the timing first: the per-group forms
    (one session / compiled model per group, each holding the group's weights), then the shape-folded FP32 graph
    (our graph cleanup alone), until the rest fits in the memory available. Their memory is still measured, each
    in a fresh process."""
    need = {}
    for name, (backend, path) in chosen.items():
        groups = len(list(Path(path).glob("group_*.onnx"))) if backend.endswith("-pergroup") else 1
        need[name] = _bytes_on_disk(Path(path)) * max(groups, 1)
    spare = [[k for k, (backend, _) in chosen.items() if backend.endswith("-pergroup")],
             [k for k in chosen if k == "fp32-folded"]]  # fmt: skip
    left: list[str] = []
    for names in spare:
        if 1.3 * sum(v for k, v in need.items() if k not in left) <= available:
            break
        left += names
    if not left:
        return chosen, {}
    gone, kept = (sum(v for k, v in need.items() if (k in left) == inside) / 2**30 for inside in (True, False))
    why = (
        f"latency not timed: with {', '.join(sorted(left))} ({gone:.1f} GiB of weights) the engines would not fit "
        f"together in the {available / 2**30:.1f} GiB available; the others hold {kept:.1f} GiB"
    )
    return {k: v for k, v in chosen.items() if k not in left}, dict.fromkeys(sorted(left), why)


def _settle() -> None:
    """Between builds: free what the last one left and hand glibc's freed heap back, so that the engines timed
    later (several GB each on DiT-XL/2 or SD 1.5) find it: after the DiT-XL/2 G = 1 compile the machine's used
    memory stayed 9 GB above where it was before."""
    gc.collect()
    openvino.release_freed_memory()


def engines_of(paths: dict) -> dict:
    """{engine: (backend, path)} of every ENGINES entry this run can open (OpenVINO installed, NNCF peer built)."""
    ov = openvino.available()
    return {name: (backend, paths[source]) for name, (backend, source) in ENGINES.items()
            if source in paths and (ov or not backend.startswith("openvino"))}  # fmt: skip


def _engine_sets(engines: dict, spec) -> dict:
    return {name: open_engine(backend, str(p), spec) for name, (backend, p) in engines.items()}


def op_counts(paths: dict, root: Path) -> dict:
    from exporter.bundle_writer import integer_op_summary, ort_optimized_op_counts

    out = {}
    for name, p in paths.items():
        if str(p).endswith(".xml"):  # OpenVINO IR: op_profile says what it runs
            continue
        graph = Path(p) / "group_0.onnx" if Path(p).is_dir() else Path(p)
        optimized = root / f"{name}.opt.onnx"
        counts = ort_optimized_op_counts(graph, optimized)
        for f in (optimized, optimized.with_name(optimized.name + ".data")):  # 3.4 GB for SD-1.5's FP32 graph
            f.unlink(missing_ok=True)
        out[name] = {**integer_op_summary(counts), "nodes": int(sum(counts.values()))}
    return out


def quality(engines: dict, model, guidance: float, n: int, root: Path, progress: bool) -> dict:
    """FD, accuracy and PSNR vs the FP32 engine's samples, same seeds, DDIM 100, every engine."""
    from runtime.sampler import SamplerConfig, sample
    from tools.bench.peer import labels_for
    from tools.reference.metrics import evaluate

    labels = labels_for(model.spec, n)
    files, out = {}, {}
    for name, es in _engine_sets({k: v for k, v in engines.items() if k != "fp32-folded"}, model.spec).items():
        run = sample(es, model.schedule, SamplerConfig("ddim", 100, 0.0, guidance), n=n, seed=0, cond=labels,
                     null_cond=model.null_cond, batch_size=64, progress=progress)  # fmt: skip
        files[name] = root / f"samples_{name}.npz"
        pipeline.save_samples(files[name], np.clip(run.samples, -1, 1), labels, {"seed": 0, "steps": 100})
    for name, f in files.items():
        r = evaluate(f, reference=None if name == "fp32" else files["fp32"])
        out[name] = {"fd": round(r["fd"], 4), "accuracy": r.get("accuracy"), "psnr_db": r.get("psnr_vs_reference")}
    return out


def bench_model(name: str, plan: BenchPlan, progress: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="dqc-bench-") as tmp:
        root = Path(tmp)
        model, guidance = _load(name, root)
        built = build_engines(model, guidance, root, plan, progress)
        paths, spec = built["paths"], model.spec
        parameters = int(sum(p.numel() for p in model.unet.parameters()))
        if not (name == "reference" and plan.quality_samples):  # timing needs the schedule, not the float weights
            model = dataclasses.replace(model, unet=None)
            gc.collect()
        # what needs no timing first: a failure here must not cost the timing below (an hour on large models)
        ops = op_counts(paths, root)
        disk = {k: round(_bytes_on_disk(Path(p)) / 2**20, 3) for k, p in paths.items() if Path(p).is_dir()}
        _settle()
        chosen = engines_of(paths)
        timed, left_out = timed_together(chosen, memory_available())
        built["skipped"] |= left_out
        engines = _engine_sets(timed, spec)
        steps = [int(t) for t in model.schedule.timesteps(plan.loop_steps)]
        latency = {b: interleaved_latency(engines, spec, steps, b, plan.reps) for b in plan.batches}
        report = {
            "model": name,
            "parameters": parameters,
            "sample_shape": list(spec.sample_shape),
            **built,
            "engines": {k: {"backend": b, "source": ENGINES[k][1]} for k, (b, _) in chosen.items()},
            "threads": engine_threads(engines),
            "latency": latency,
            "ratios": {b: ratios(lat) for b, lat in latency.items()},
            "loop": sampling_loop(
                {k: engines[k] for k in ("fp32", *LOOPED[8 if "dqc-G8" in engines else 1]) if k in engines},
                model.schedule,
                spec,
                model.null_cond,
                plan.loop_steps,
                guidance,
            ),  # fmt: skip
            "ops": ops,
            "disk_mb": disk,
        }
        report["paths"] = {k: str(v) for k, v in paths.items()}
        del engines
        if plan.memory:
            report["memory_mb"] = {b: {k: measure_memory(backend, str(p), spec, b)["rss_mb"]
                                       for k, (backend, p) in chosen.items()} for b in plan.batches}  # fmt: skip
        if plan.profile:
            report["profile"] = {b: op_profile(chosen, spec, b) for b in plan.batches}
        if name == "reference" and plan.quality_samples:
            report["quality"] = quality(chosen, model, guidance, plan.quality_samples, root, progress)
    return report


def engine_threads(engines: dict) -> dict:
    """The worker threads each engine runs on (ONNX Runtime: its intra-op setting, 0 = one per core)."""
    from runtime.openvino import OpenVinoEngine

    out = {}
    for name, es in engines.items():
        engine = es.for_timestep(0)
        out[name] = engine.threads if isinstance(engine, OpenVinoEngine) else getattr(engine, "threads", None)
    return out


def ratios(latency: dict) -> dict:
    """Speed-ups (how many times faster) of ours against FP32 and the peers, from one run's medians; `best`: our
    fastest engine (G = 1 or 8, whichever backend) against each."""
    med = {k: v["median_ms"] for k, v in latency.items()}
    ours = [k for k in OURS if k in med]
    out = {f"{o} vs {base}": round(med[base] / med[o], 3) for o in ours for base in BASES if base in med}
    best = min(ours, key=med.get)
    out |= {f"best ({best}) vs {base}": round(med[base] / med[best], 3) for base in BASES if base in med}
    return out


def machine_report() -> dict:
    """What a speed figure depends on: the CPU and its int8/bf16 instructions, the libraries, thread settings."""
    import os
    import platform

    import onnxruntime as ort

    from runtime.cpu import cpu_flags, int8_saturates

    flags, model = cpu_flags(), platform.processor()
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)  # fmt: skip
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile")
    versions = {"onnxruntime": ort.__version__, "numpy": np.__version__}
    if openvino.available():
        versions["openvino"] = openvino.openvino_version()
    try:
        import nncf

        versions["nncf"] = nncf.__version__
    except ImportError:
        pass
    import torch

    versions["torch"] = torch.__version__
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OV_CPU_THREADS_NUM", "MKL_NUM_THREADS") if k in os.environ}
    return {"cpus": os.cpu_count(), "cpu": model, "cpu_flags": [f for f in wanted if f in flags],
            "int8_saturates": int8_saturates(),
            "versions": versions, "thread_env": env,
            "ort_session": "intra_op_num_threads 0 (one per core), spinning off"}  # fmt: skip


def run_bench(plan: BenchPlan = BenchPlan(), *, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs a line per per-channel fallback
    report = {"machine": machine_report(), "plan": plan.__dict__, "models": {}}
    for name in plan.models:
        report["models"][name] = bench_model(name, plan, progress)
        print(format_model(report["models"][name]), end="", flush=True)
    if out_dir is not None:
        out = Path(out_dir)
        pipeline.write_json(out / "bench.json", report)
        (out / "bench.md").write_text("".join(format_model(m) for m in report["models"].values()))
        print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}")
    return report


def format_model(m: dict) -> str:
    bases = [b for b in BASES if b in next(iter(m["latency"].values()))]
    lines = [f"\n## {m['model']} ({m['parameters'] / 1e6:.2f} M parameters, {'x'.join(map(str, m['sample_shape']))})",
             "", "| batch | engine | backend | median ms/step | p10 | p90 | "
             + " | ".join(f"speed-up vs {b}" for b in bases) + " | resident MB |",
             "|---|---|---|---|---|---|" + "---|" * len(bases) + "---|"]  # fmt: skip
    for b, lat in m["latency"].items():
        med = {k: v["median_ms"] for k, v in lat.items()}
        for k, v in lat.items():
            mem = m.get("memory_mb", {}).get(b, {}).get(k)
            backend = m.get("engines", {}).get(k, {}).get("backend", "ort")
            ups = " | ".join(f"{med[base] / med[k]:.2f}×" for base in bases)
            lines.append(f"| {b} | {k} | {backend} | {v['median_ms']:.2f} | {v['p10_ms']:.2f} | {v['p90_ms']:.2f} | "
                         f"{ups} | {'—' if mem is None else f'{mem:.1f}'} |")  # fmt: skip
    for b, r in m["ratios"].items():
        best = {k: v for k, v in r.items() if k.startswith("best")}
        lines.append(f"\nbatch {b}: " + ", ".join(f"{k} {v:.2f}×" for k, v in best.items()))
    for k, why in m.get("skipped", {}).items():
        lines.append(f"\nnot measured: {k} ({why})")
    if "memory_mb" in m:
        for b, mem in m["memory_mb"].items():
            if "dqc-G8" not in mem or "dqc-G1" not in mem:
                continue
            split = (
                f"; one session per group: {mem['dqc-G8-split'] / mem['dqc-G1']:.2f}×" if "dqc-G8-split" in mem else ""
            )
            lines.append(f"\nresident memory at batch {b}: G = 8 / G = 1 = {mem['dqc-G8'] / mem['dqc-G1']:.2f}× (one "
                         f"session for all groups){split}")  # fmt: skip
            if {"dqc-G8-ov", "dqc-G1-ov"} <= set(mem):
                split = (f"; one compiled model per group: {mem['dqc-G8-ov-split'] / mem['dqc-G1-ov']:.2f}×"
                         if "dqc-G8-ov-split" in mem else "")  # fmt: skip
                lines.append(
                    f"\nOpenVINO resident memory at batch {b}: G = 8 / G = 1 = "
                    f"{mem['dqc-G8-ov'] / mem['dqc-G1-ov']:.2f}× (one compiled model for all groups){split}"
                )
    for b, lat in m["latency"].items():
        words = [f"{k} {lat[k]['median_ms'] / lat['dqc-G1']['median_ms']:.3f}×" for k in ("dqc-G8", "dqc-G8-split")
                 if k in lat and "dqc-G1" in lat]  # fmt: skip
        for k in ("dqc-G8-ov", "dqc-G8-ov-split"):
            if k in lat and "dqc-G1-ov" in lat:
                words.append(f"{k} {lat[k]['median_ms'] / lat['dqc-G1-ov']['median_ms']:.3f}× (vs G1-ov)")
        if words and "dqc-G1" in lat:
            lines.append(f"\nper-step latency at batch {b} against G = 1: " + ", ".join(words))
    for b, lat in m["latency"].items():
        if "dqc-W4" in lat:
            words = [f"{k} {lat['dqc-W4']['median_ms'] / lat[k]['median_ms']:.2f}×" for k in W4[1:] if k in lat]
            head = f"\n4-bit weights at batch {b}, speed-up against int8 containers (dqc-W4): "
            lines.append(head + ", ".join(words))
    for b, lat in m["latency"].items():
        pairs = [(k, base) for k, base in (("dqc-G1-attnq", "dqc-G1"), ("dqc-G1-attnq-ov", "dqc-G1-ov"))
                 if k in lat and base in lat]  # fmt: skip
        if pairs:
            words = [f"{k} {lat[base]['median_ms'] / lat[k]['median_ms']:.3f}× (vs {base})" for k, base in pairs]
            lines.append(f"\nquantized attention products at batch {b}, speed-up: " + ", ".join(words))
    disk = m.get("disk_mb", {})
    if "dqc-W4" in disk:
        lines.append("\nbundle size on disk: " + ", ".join(f"{k} {v:.2f} MB" for k, v in disk.items()))
    for k, v in m["loop"].items():
        lines.append(f"\nsampling loop, {k}: {v['seconds']:.3f} s for the whole loop (batch 1); the host loop adds "
                     f"{v['loop_overhead']:+.1%} over the bare engine calls ({v['host_share']:.2%} of the run spent "
                     "outside them)")  # fmt: skip
    f = m["loop"]["fp32"]["seconds"]
    for k in (*LOOPED[8], *LOOPED[1]):
        if k in m["loop"]:
            lines.append(f"\nwhole loop FP32 / {k}: {f / m['loop'][k]['seconds']:.2f}×")
    ops = m["ops"]
    lines.append("\n| engine | ORT nodes | integer kernels | float Conv | Quantize | Dequantize |")
    lines.append("|---|---|---|---|---|---|")
    for k, v in ops.items():
        lines.append(f"| {k} | {v['nodes']} | {v['integer']} | {v['float_conv']} | {v['quantize_nodes']} | "
                     f"{v['dequantize_nodes']} |")  # fmt: skip
    for b, prof in m.get("profile", {}).items():
        lines.append(f"\nwhere the time goes at batch {b} (ms per call, the top op types: ONNX Runtime's profiler; "
                     "OpenVINO's per-node counters as node type / kernel)")  # fmt: skip
        lines.append("\n| engine | run | kernels | top op types (ms, nodes) |\n|---|---|---|---|")
        for k, v in prof.items():
            top = ", ".join(f"{op} {o['ms']:.2f} ({o['nodes']})" for op, o in list(v["ops"].items())[:8])
            lines.append(f"| {k} | {v['run_ms']:.2f} | {v['kernel_ms']:.2f} | {top} |")
    if "quality" in m:
        lines.append("\n| engine | FD | accuracy | PSNR vs FP32 (dB) |\n|---|---|---|---|")
        for k, v in m["quality"].items():
            acc = "—" if v["accuracy"] is None else f"{v['accuracy']:.1%}"
            psnr = "—" if v["psnr_db"] is None else f"{v['psnr_db']:.2f}"
            lines.append(f"| {k} | {v['fd']:.3f} | {acc} | {psnr} |")
    return "\n".join(lines) + "\n"


def op_profile(engines: dict, spec, batch: int, runs: int = 5) -> dict:
    """Where each engine's time goes over `runs` calls (group 0 for a bundle), milliseconds per call summed by op
    type with the node count per type, and the time between kernels (the executor's own share): ONNX Runtime's own
    profiler, or OpenVINO's per-node counters (runtime.openvino.OpenVinoEngine.profile)."""
    import collections
    import os

    import onnxruntime as ort

    x, labels = _inputs(spec, batch)
    t = spec.num_train_timesteps // 2
    feeds = {"sample": x, "timestep": np.full(batch, t, np.int64)}
    if labels is not None:
        feeds[spec.condition] = labels
    out = {}
    for name, (backend, p) in engines.items():
        if backend.startswith("openvino"):
            out[name] = open_engine(backend, str(p), spec).for_timestep(t).profile(x, feeds["timestep"], labels, runs)
            continue
        opts = session_options(ort)
        opts.enable_profiling = True
        graph = Path(p) / "group_0.onnx" if Path(p).is_dir() else Path(p)
        session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        session.run(None, feeds)  # warm-up, not counted: profiled below as the first run and dropped
        for _ in range(runs):
            session.run(None, feeds)
        trace_path = session.end_profiling()
        events = json.loads(Path(trace_path).read_text())
        os.unlink(trace_path)
        model_runs = [e for e in events if e.get("name") == "model_run"][-runs:]
        start = model_runs[0]["ts"]
        kernels = [
            e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start
        ]
        per_op, count = collections.Counter(), collections.Counter()
        for e in kernels:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
            count[e["args"]["op_name"]] += 1
        total = sum(r["dur"] for r in model_runs) / 1e3 / runs
        out[name] = {
            "run_ms": round(total, 3),
            "kernel_ms": round(sum(per_op.values()), 3),
            "ops": {op: {"ms": round(ms, 3), "nodes": count[op] // runs} for op, ms in per_op.most_common()},
        }
    return out
