"""`dqc bench BUNDLE --groups-vs BUNDLE1`: what timestep groups cost at run time.

- disk: the bytes of each bundle;
- resident memory of the loaded engine set: each configuration is measured in a fresh process (RSS after
  loading every group's session and running each once, minus RSS right after importing ONNX Runtime);
- per-step latency along the calibrated sampler's steps: the group engine set (switching engines between
  steps) against one engine serving every step, and against an engine set that keeps one session
  resident (so every switch creates a session). All runs interleaved in one process; ratios reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime.bundle import load_bundle
from runtime.errors import ConfigError

# (label, max_resident, prepack, shared): the configurations whose resident memory is measured
MEMORY_CONFIGS = (
    ("all groups resident", None, True, True),
    ("all resident, no pre-packed weight copies", None, False, True),
    ("one group resident at a time", 1, True, True),
    ("all resident, nothing shared (one session per graph file)", None, True, False),
)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _inputs(spec, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spec.sample_shape), dtype=np.float32)
    labels = None if spec.num_class_embeds is None else np.zeros(batch, np.int64)
    return x, labels


def unshared_engines(bundle, threads: int = 0):
    """One plain session per group graph: its own weights, pre-packed copies and arena (the baseline)."""
    from runtime.engine import EngineSet, OrtEngine

    def make(g: int) -> OrtEngine:
        return OrtEngine(bundle.group_model(g).SerializeToString(), bundle.spec, external_dir=bundle.root,
                         threads=threads)  # fmt: skip

    factories = {g["id"]: (lambda g=g["id"]: make(g)) for g in bundle.manifest["groups"]}
    return EngineSet(factories, bundle.group_of_t, bundle.spec)


def resident_memory(path: str, batch: int, max_resident: int | None, prepack: bool, shared: bool) -> dict:
    """In this process (call it in a fresh one): RSS growth from loading the engine set and running every
    group once at `batch`."""
    import onnxruntime  # noqa: F401  (its import is not part of the engine set)

    bundle = load_bundle(path)
    base = rss_mb()
    engines = bundle.engines(max_resident=max_resident, prepack=prepack) if shared else unshared_engines(bundle)
    x, labels = _inputs(bundle.spec, batch)
    first_t = {}
    for t, g in enumerate(bundle.group_of_t.tolist()):
        first_t.setdefault(g, t)
    for t in first_t.values():
        engines.for_timestep(t).infer(x, np.full(batch, t, np.int64), labels)
    return {"rss_mb": round(rss_mb() - base, 2), "resident_engines": len(engines.loaded_groups)}


def _child() -> None:
    args = json.loads(sys.argv[1])
    print(json.dumps(resident_memory(**args)))


def _measure_in_subprocess(**args) -> dict:
    code = "from tools.bench.group_bench import _child; _child()"
    root = str(Path(__file__).resolve().parents[2])  # the repository root
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def switching_latency(path: str, batch: int, reps: int, progress: bool = True) -> dict:
    """Median seconds per step over the calibrated sampler's steps for: the engine set routing by group
    (with and without pre-packed weights), one engine (group 0's) serving every step, and an engine set
    keeping one session resident."""
    from tqdm.auto import tqdm

    bundle = load_bundle(path)
    steps = [int(t) for t in bundle.schedule.timesteps(int(bundle.manifest["calibration"].get("steps", 100)))]
    x, labels = _inputs(bundle.spec, batch)
    routed = bundle.engines()
    unpacked = bundle.engines(prepack=False)
    single = bundle.engines().for_timestep(steps[0])
    for t in steps:  # warm: every group session created and run once
        routed.for_timestep(t).infer(x, np.full(batch, t, np.int64), labels)
        unpacked.for_timestep(t).infer(x, np.full(batch, t, np.int64), labels)
        single.infer(x, np.full(batch, t, np.int64), labels)
    switches = sum(routed.group_of(a) != routed.group_of(b) for a, b in zip(steps, steps[1:], strict=False))
    runs = {"groups (all resident)": [], "groups (no pre-packing)": [], "single engine": [],
            "groups (one resident)": []}  # fmt: skip
    for _ in tqdm(range(reps), desc="switching", disable=not progress, leave=False):
        lru = bundle.engines(max_resident=1)
        for name, pick in (
            ("groups (all resident)", routed.for_timestep),
            ("groups (no pre-packing)", unpacked.for_timestep),
            ("single engine", lambda t: single),
            ("groups (one resident)", lru.for_timestep),
        ):
            start = time.perf_counter()
            for t in steps:
                pick(t).infer(x, np.full(batch, t, np.int64), labels)
            runs[name].append((time.perf_counter() - start) / len(steps))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    return {
        "steps": len(steps),
        "group_switches": int(switches),
        "ms_per_step": {k: round(v * 1e3, 3) for k, v in med.items()},
        "ratio_to_single": {k: round(v / med["single engine"], 3) for k, v in med.items()},
        "ms_per_switch_one_resident": round(
            (med["groups (one resident)"] - med["single engine"]) * len(steps) / max(switches, 1) * 1e3, 2
        ),
    }


def bundle_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def run_group_bench(
    bundle: str, baseline: str, *, batch: int = 1, reps: int = 5, json_out: str | None = None, progress: bool = True
) -> dict:
    bundle, baseline = str(Path(bundle).resolve()), str(Path(baseline).resolve())
    for p in (bundle, baseline):
        load_bundle(p)  # verify both first: a clear error, not a failed subprocess
    if batch < 1 or reps < 1:
        raise ConfigError(f"--batch {batch} / --reps {reps}: must be at least 1")
    groups = {p: len(load_bundle(p).manifest["groups"]) for p in (bundle, baseline)}
    disk = {p: bundle_bytes(p) for p in (bundle, baseline)}
    memory = []
    base_mem = _measure_in_subprocess(path=baseline, batch=batch, max_resident=None, prepack=True, shared=True)
    memory.append({"bundle": baseline, "groups": groups[baseline], "config": MEMORY_CONFIGS[0][0], **base_mem})
    for label, max_resident, prepack, shared in MEMORY_CONFIGS:
        m = _measure_in_subprocess(path=bundle, batch=batch, max_resident=max_resident, prepack=prepack, shared=shared)
        memory.append({"bundle": bundle, "groups": groups[bundle], "config": label, **m,
                       "vs_baseline": round(m["rss_mb"] / base_mem["rss_mb"] - 1, 3)})  # fmt: skip
    report = {
        "batch": batch,
        "disk": {
            "bytes": disk,
            "groups": groups,
            "added": round(disk[bundle] / disk[baseline] - 1, 4),
        },
        "memory": memory,
        "latency": switching_latency(bundle, batch, reps, progress),
    }
    print(format_report(report), end="")
    if json_out:
        from tools.deploy.pipeline import write_json

        write_json(json_out, report)
        print(f"wrote {json_out}")
    return report


def format_report(r: dict) -> str:
    d = r["disk"]
    (b, nb), (a, na) = list(d["bytes"].items())
    lines = [
        f"disk: {b} ({d['groups'][b]} groups) {nb / 1e6:.3f} MB vs {a} ({d['groups'][a]} groups) "
        f"{na / 1e6:.3f} MB: {d['added']:+.1%}",
        f"resident memory (batch {r['batch']}), RSS growth from loading the engine set and running each group:",
    ]
    for m in r["memory"]:
        extra = f"  {m['vs_baseline']:+.1%} vs baseline" if "vs_baseline" in m else "  (baseline)"
        lines.append(f"  {m['groups']:>3} groups, {m['config']:<58}{m['rss_mb']:>9.1f} MB{extra}")
    lat = r["latency"]
    lines.append(f"per-step latency over {lat['steps']} steps ({lat['group_switches']} group switches):")
    for k, v in lat["ms_per_step"].items():
        lines.append(f"  {k:<24}{v:>9.3f} ms/step  ×{lat['ratio_to_single'][k]:.3f} of single engine")
    lines.append(f"  a switch with one session resident costs {lat['ms_per_switch_one_resident']:.1f} ms")
    return "\n".join(lines) + "\n"
