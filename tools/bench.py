"""`dqc bench`: speed and memory of our engines against the tools a user would otherwise pick, as ratios
measured in one run.

Per model (the shipped reference model and/or the CIFAR-10-shaped UNet with random weights):
- engines: ONNX Runtime FP32 on the exported float graph (and on the same graph after our shape folding, to show how
  much of the gain is graph cleanup); ONNX Runtime's own static quantizer (`quant_pre_process`
  then `quantize_static`: QDQ, per-channel, U8 activations, S8 weights, MinMax, on the same calibration inputs as
  ours) — the peer; our W8A8 bundle with one scale set (G = 1) and with eight timestep groups (G = 8);
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

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import ConfigError
from tools import pipeline
from tools.group_bench import rss_mb

ENGINES = ("fp32", "fp32-folded", "ort-static", "dqc-G1", "dqc-G8")
MODELS = ("reference", "cifar10", "tiny")


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

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("--models: name at least one model")
        if not self.batches or min(self.batches) < 1 or self.reps < 1 or self.loop_steps < 1:
            raise ConfigError(f"--batches {self.batches} / --reps {self.reps}: must be at least 1")
        if self.calib_timesteps < 8:
            raise ConfigError(f"calib_timesteps={self.calib_timesteps}: G = 8 needs at least 8 calibrated steps")

    @classmethod
    def quick(cls) -> BenchPlan:
        """The CI smoke run: the tiny model, batch 1, a few repetitions, a short loop."""
        return cls(models=("tiny",), batches=(1,), reps=3, loop_steps=10, quality_samples=4, calib_samples=4)


def _inputs(spec, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spec.sample_shape), dtype=np.float32)
    labels = None if spec.num_class_embeds is None else np.arange(batch, dtype=np.int64) % spec.num_class_embeds
    return x, labels


def open_engine(kind: str, path: str, spec=None):
    """An EngineSet for a bench engine: a bundle directory, or a single ONNX graph file (FP32, the peer). No
    session's worker threads spin-wait after a call: in interleaved runs the next call is another session's,
    and spinning workers would take its cores (measured: per-call times up to 1.7x the spin-free ones)."""
    from runtime.bundle import load_bundle
    from runtime.engine import EngineSet, OrtEngine

    if kind == "bundle":
        return load_bundle(path).engines(spin=False)
    return EngineSet.single(OrtEngine(Path(path), spec, spin=False))


def resident_memory(kind: str, path: str, spec: dict, batch: int) -> dict:
    """In this process (a fresh one): RSS growth from opening the engine and running each of its groups once."""
    import onnxruntime  # noqa: F401  (its import is not part of the engine)

    from runtime.engine import InputSpec

    spec = InputSpec.from_dict(spec)
    base = rss_mb()
    engines = open_engine(kind, path, spec)
    x, labels = _inputs(spec, batch)
    first: dict[int, int] = {}
    for t, g in enumerate(engines.group_of_t.tolist()):
        first.setdefault(g, t)
    for t in first.values():
        engines.for_timestep(t).infer(x, np.full(batch, t, np.int64), labels)
    return {"rss_mb": round(rss_mb() - base, 2), "engines": len(first)}


def _memory_child() -> None:
    print(json.dumps(resident_memory(**json.loads(sys.argv[1]))))


def measure_memory(kind: str, path: str, spec, batch: int) -> dict:
    code = "from tools.bench import _memory_child; _memory_child()"
    args = json.dumps({"kind": kind, "path": str(path), "spec": spec.to_dict(), "batch": batch})
    root = str(Path(__file__).resolve().parent.parent)
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


def sampling_loop(engines: dict, schedule, spec, null_class, steps: int, guidance: float) -> dict:
    """Wall time of the whole host sampling loop (DDIM `steps`, one sample) per engine set, and what the loop
    adds over the bare engine calls: against the same calls (the guided batch: cond and uncond) at the same
    timesteps without the sampler around them (`loop_overhead`; loop and bare runs interleaved, 3 each,
    medians), and within each loop run, its time outside the engine calls (`host_share`, free of run-to-run
    noise)."""
    from runtime.sampler import SamplerConfig, sample

    cfg = SamplerConfig("ddim", steps, 0.0, guidance)
    ts = [int(t) for t in schedule.timesteps(steps)]
    guided = spec.num_class_embeds is not None and guidance != 1.0
    x, labels = _inputs(spec, 2 if guided else 1)
    one = None if labels is None else labels[:1]
    runs: dict[str, dict[str, list[float]]] = {k: {"loop": [], "bare": [], "inside": []} for k in engines}
    for _ in range(3):
        for name, es in engines.items():
            start = time.perf_counter()
            run = sample(es, schedule, cfg, n=1, seed=0, labels=one, null_class=null_class, batch_size=1,
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
    from tools.reference import REFERENCE_GUIDANCE, resolve_model
    from tools.synthetic import build_unet, save_pipeline

    if name == "reference":
        return load_model(resolve_model("reference")), REFERENCE_GUIDANCE
    if name not in MODELS:
        if Path(name).is_dir():
            return load_model(resolve_model(name)), 1.0
        raise ConfigError(f"--models {name!r}: use reference, cifar10, tiny or a model directory")
    return load_model(save_pipeline(build_unet(name), root / name)), 1.0


def build_engines(model, guidance: float, root: Path, plan: BenchPlan, progress: bool) -> dict:
    """Compile every engine of the comparison for one model; returns paths and compile seconds."""
    import onnx

    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig
    from exporter.onnx_export import export_float
    from tools.peer import quantize_static_peer

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
    fp = export_float(model)
    onnx.save(fp, str(paths["fp32"]))
    onnx.save(fold_shapes(fp), str(paths["fp32-folded"]))  # our graph cleanup alone: how much of the gain it is
    start = time.perf_counter()
    data = record_trajectories(model, g1, progress)
    quantize_static_peer(paths["fp32"], paths["ort-static"], data)
    seconds["ort-static"] = round(time.perf_counter() - start, 1)
    for name, cfg in (("dqc-G1", g1), ("dqc-G8", g8)):
        start = time.perf_counter()
        paths[name] = pipeline.compile_model(model, root / name, cfg, overwrite=True, progress=progress)
        seconds[name] = round(time.perf_counter() - start, 1)
    return {"paths": paths, "compile_seconds": seconds, "calibration": {"inputs": len(data), **common}}


def _engine_sets(paths: dict, spec) -> dict:
    return {name: open_engine("bundle" if name.startswith("dqc") else "graph", str(p), spec)
            for name, p in paths.items()}  # fmt: skip


def op_counts(paths: dict, root: Path) -> dict:
    from exporter.bundle_writer import integer_op_summary, ort_optimized_op_counts

    out = {}
    for name, p in paths.items():
        graph = Path(p) / "group_0.onnx" if Path(p).is_dir() else Path(p)
        counts = ort_optimized_op_counts(graph, root / f"{name}.opt.onnx")
        out[name] = {**integer_op_summary(counts), "nodes": int(sum(counts.values()))}
    return out


def quality(paths: dict, model, guidance: float, n: int, root: Path, progress: bool) -> dict:
    """FD, accuracy and PSNR vs the FP32 engine's samples, same seeds, DDIM 100, every engine."""
    from runtime.sampler import SamplerConfig, sample
    from tools.metrics import evaluate
    from tools.peer import labels_for

    labels = labels_for(model.spec, n)
    files, out = {}, {}
    for name, es in _engine_sets({k: v for k, v in paths.items() if k != "fp32-folded"}, model.spec).items():
        run = sample(es, model.schedule, SamplerConfig("ddim", 100, 0.0, guidance), n=n, seed=0, labels=labels,
                     null_class=model.null_class, batch_size=64, progress=progress)  # fmt: skip
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
        engines = _engine_sets(paths, spec)
        steps = [int(t) for t in model.schedule.timesteps(plan.loop_steps)]
        latency = {b: interleaved_latency(engines, spec, steps, b, plan.reps) for b in plan.batches}
        report = {
            "model": name,
            "parameters": int(sum(p.numel() for p in model.unet.parameters())),
            "sample_shape": list(spec.sample_shape),
            **built,
            "latency": latency,
            "ratios": {b: ratios(lat) for b, lat in latency.items()},
            "loop": sampling_loop(
                {k: engines[k] for k in ("fp32", "dqc-G8")},
                model.schedule,
                spec,
                model.null_class,
                plan.loop_steps,
                guidance,
            ),  # fmt: skip
            "ops": op_counts(paths, root),
        }
        report["paths"] = {k: str(v) for k, v in paths.items()}
        del engines
        if plan.memory:
            report["memory_mb"] = {b: {k: measure_memory("bundle" if k.startswith("dqc") else "graph", str(p), spec, b)
                                       ["rss_mb"] for k, p in paths.items()} for b in plan.batches}  # fmt: skip
        if plan.profile:
            report["profile"] = {b: op_profile(paths, spec, b) for b in plan.batches}
        if name == "reference" and plan.quality_samples:
            report["quality"] = quality(paths, model, guidance, plan.quality_samples, root, progress)
    return report


def ratios(latency: dict) -> dict:
    """Speed-ups (how many times faster) of ours against FP32 and against the peer, from one run's medians."""
    med = {k: v["median_ms"] for k, v in latency.items()}
    return {f"{ours} vs {base}": round(med[base] / med[ours], 3)
            for ours in ("dqc-G1", "dqc-G8") for base in ("fp32", "ort-static")}  # fmt: skip


def run_bench(plan: BenchPlan = BenchPlan(), *, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    import logging
    import os

    import onnxruntime as ort

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs a line per per-channel fallback
    report = {"machine": {"cpus": os.cpu_count(), "onnxruntime": ort.__version__}, "plan": plan.__dict__,
              "models": {}}  # fmt: skip
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
    lines = [f"\n## {m['model']} ({m['parameters'] / 1e6:.2f} M parameters, {'x'.join(map(str, m['sample_shape']))})",
             "", "| batch | engine | median ms/step | p10 | p90 | speed-up vs FP32 | vs ort-static | resident MB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for b, lat in m["latency"].items():
        med = {k: v["median_ms"] for k, v in lat.items()}
        for k, v in lat.items():
            mem = m.get("memory_mb", {}).get(b, {}).get(k)
            lines.append(f"| {b} | {k} | {v['median_ms']:.2f} | {v['p10_ms']:.2f} | {v['p90_ms']:.2f} | "
                         f"{med['fp32'] / med[k]:.2f}× | {med['ort-static'] / med[k]:.2f}× | "
                         f"{'—' if mem is None else f'{mem:.1f}'} |")  # fmt: skip
    if "memory_mb" in m:
        for b, mem in m["memory_mb"].items():
            lines.append(f"\nresident memory at batch {b}: G = 8 / G = 1 = {mem['dqc-G8'] / mem['dqc-G1']:.2f}×")
    for k, v in m["loop"].items():
        lines.append(f"\nsampling loop, {k}: {v['seconds']:.3f} s for the whole loop (batch 1); the host loop adds "
                     f"{v['loop_overhead']:+.1%} over the bare engine calls ({v['host_share']:.2%} of the run spent "
                     "outside them)")  # fmt: skip
    f, d = m["loop"]["fp32"]["seconds"], m["loop"]["dqc-G8"]["seconds"]
    lines.append(f"\nwhole loop FP32 / dqc-G8: {f / d:.2f}×")
    ops = m["ops"]
    lines.append("\n| engine | ORT nodes | integer kernels | float Conv | Quantize | Dequantize |")
    lines.append("|---|---|---|---|---|---|")
    for k, v in ops.items():
        lines.append(f"| {k} | {v['nodes']} | {v['integer']} | {v['float_conv']} | {v['quantize_nodes']} | "
                     f"{v['dequantize_nodes']} |")  # fmt: skip
    for b, prof in m.get("profile", {}).items():
        lines.append(f"\nwhere the time goes at batch {b} (ONNX Runtime profiler, ms per call: the top op types)")
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


def op_profile(paths: dict, spec, batch: int, runs: int = 5) -> dict:
    """Where each engine's time goes: ONNX Runtime's own profiler over `runs` calls (group 0 for a bundle),
    kernel milliseconds per call summed by op type, with the node count per type, and the time between kernels
    (the executor's own share)."""
    import collections
    import os

    import onnxruntime as ort

    x, labels = _inputs(spec, batch)
    feeds = {"sample": x, "timestep": np.full(batch, spec.num_train_timesteps // 2, np.int64)}
    if labels is not None:
        feeds["class_labels"] = labels
    out = {}
    for name, p in paths.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
