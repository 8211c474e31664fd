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
# label, max_resident, prepack, shared (False: nothing shared), single (one session for all groups)
MEMORY_CONFIGS = (
    ("one session for all groups (the default)", None, True, True, True),
    ("per-group sessions, all resident", None, True, True, False),
    ("per-group sessions, no pre-packed weight copies", None, False, True, False),
    ("per-group sessions, one resident at a time", 1, True, True, False),
    ("per-group sessions, nothing shared", None, True, False, False),
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


def memory_timesteps(group_of_t) -> list[int]:
    """The calls a resident-memory figure is taken over: 50 timesteps spread over the schedule and every
    group's first, whatever the group count. Every configuration makes the same calls: ONNX Runtime's arena grows
    again at the second call, so running each group once would charge G = 8 (8 calls) for growth that G = 1
    (1 call) had not reached yet (CIFAR-10 shape, batch 8: 189 MB after one call, 261 MB after twenty)."""
    first: dict[int, int] = {}
    for t, g in enumerate(np.asarray(group_of_t).tolist()):
        first.setdefault(g, t)
    return sorted(set(range(0, len(group_of_t), max(1, len(group_of_t) // 50))) | set(first.values()))


def resident_memory(path: str, batch: int, max_resident: int | None, prepack: bool, shared: bool,
                    single: bool = True) -> dict:  # fmt: skip
    """In this process (call it in a fresh one): RSS growth from loading the engine set and running it at
    `batch` over memory_timesteps (every group)."""
    import onnxruntime  # noqa: F401  (its import is not part of the engine set)

    bundle = load_bundle(path)
    base = rss_mb()
    engines = (bundle.engines(max_resident=max_resident, prepack=prepack, single=None if single else False)
               if shared else unshared_engines(bundle))  # fmt: skip
    x, labels = _inputs(bundle.spec, batch)
    for t in memory_timesteps(bundle.group_of_t):
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
    """Median seconds per step over the calibrated sampler's steps for: one session serving every group (the
    default), one session per group (with and without pre-packed weights, all resident or one at a time), and
    group 0's engine serving every step (the yardstick: no group ever changes)."""
    from tqdm.auto import tqdm

    bundle = load_bundle(path)
    steps = [int(t) for t in bundle.schedule.timesteps(int(bundle.manifest["calibration"].get("steps", 100)))]
    x, labels = _inputs(bundle.spec, batch)
    one = bundle.engines()
    routed = bundle.engines(single=False)
    unpacked = bundle.engines(prepack=False, single=False)
    fixed = bundle.engines(single=False).for_timestep(steps[0])
    for t in steps:  # warm: every session created and run once
        for es in (one, routed, unpacked):
            es.for_timestep(t).infer(x, np.full(batch, t, np.int64), labels)
        fixed.infer(x, np.full(batch, t, np.int64), labels)
    switches = sum(routed.group_of(a) != routed.group_of(b) for a, b in zip(steps, steps[1:], strict=False))
    runs = {k: [] for k in ("one session for all groups", "per-group sessions", "per-group, no pre-packing",
                            "group 0 at every step", "per-group, one resident")}  # fmt: skip
    for _ in tqdm(range(reps), desc="switching", disable=not progress, leave=False):
        lru = bundle.engines(max_resident=1, single=False)
        for name, pick in (
            ("one session for all groups", one.for_timestep),
            ("per-group sessions", routed.for_timestep),
            ("per-group, no pre-packing", unpacked.for_timestep),
            ("group 0 at every step", lambda t: fixed),
            ("per-group, one resident", lru.for_timestep),
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
        "ratio_to_fixed": {k: round(v / med["group 0 at every step"], 3) for k, v in med.items()},
        "ms_per_switch_one_resident": round(
            (med["per-group, one resident"] - med["group 0 at every step"]) * len(steps) / max(switches, 1) * 1e3, 2
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
    for label, max_resident, prepack, shared, single in MEMORY_CONFIGS:
        m = _measure_in_subprocess(path=bundle, batch=batch, max_resident=max_resident, prepack=prepack, shared=shared,
                                   single=single)  # fmt: skip
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
        f"resident memory (batch {r['batch']}), RSS growth from loading the engine set and running it over the same "
        "50+ timesteps (every group):",
    ]
    for m in r["memory"]:
        extra = f"  {m['vs_baseline']:+.1%} vs baseline" if "vs_baseline" in m else "  (baseline)"
        lines.append(f"  {m['groups']:>3} groups, {m['config']:<58}{m['rss_mb']:>9.1f} MB{extra}")
    lat = r["latency"]
    lines.append(f"per-step latency over {lat['steps']} steps ({lat['group_switches']} group switches):")
    for k, v in lat["ms_per_step"].items():
        lines.append(f"  {k:<28}{v:>9.3f} ms/step  ×{lat['ratio_to_fixed'][k]:.3f} of group 0 at every step")
    lines.append(f"  a switch with one session resident costs {lat['ms_per_switch_one_resident']:.1f} ms")
    return "\n".join(lines) + "\n"
