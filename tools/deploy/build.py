"""`dqc build`: TensorRT plans for every group graph of a bundle, in `<bundle>/engines/trt/`.

`--trt-engines refit` (the default where it applies, `auto`): one plan per precision (`group_<g>_refit.plan`, built
from its first group's graph, the Q/DQ scales refittable), whose scales the runtime rewrites at each group switch
(runtime.trt_refit); the build checks on the GPU that refitting reaches every group and comes back to the first
bit for bit. `per-group`: one plan per group (`group_<g>.plan`). Beside them, the timing cache every build shared
(`timing.cache`, reused by the next build on the same GPU and TensorRT version) and `build.json` (versions, GPU,
profile, per-plan size, build time, device memory, INT8 check, refit check). Plans are built into a temp directory
inside `engines/`, which then replaces `engines/trt`, and the manifest is replaced last (temp file + os.replace) with
the new files' sha256: a failure or Ctrl-C leaves the bundle as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from runtime.bundle import MANIFEST, Bundle, load_bundle, sha256_file
from runtime.errors import ConfigError
from runtime.tensorrt import DEFAULT_BATCH_SIZES, ENGINE_DIR, BuildError, tensorrt_version
from runtime.trt_build import BuildConfig, PlanBuilder, gpu_info, inspect_plan, int8_fallbacks

TIMING_CACHE = "timing.cache"
BUILD_JSON = "build.json"
_SHOWN = 20  # fallback nodes listed in an error message


def check_target(bundle: Bundle) -> None:
    """Refuse a bundle compiled for ONNX Runtime: its Q/DQ placement is not the one TensorRT fuses."""
    from calibration.profiles import get_profile  # pure data

    target = bundle.manifest["target"]
    try:
        backend = get_profile(target).backend
    except ConfigError as e:
        raise BuildError(f"{bundle.root / MANIFEST}: target {target!r} is no known export profile; recompile") from e
    if backend != "trt":
        raise BuildError(
            f"{bundle.root}: the bundle targets ONNX Runtime (--target {target}); recompile with "
            "`dqc compile ... --target trt` to build TensorRT engines, or run this bundle on ONNX Runtime"
        )


def run_build(
    bundle_dir: str | Path,
    *,
    backend: str = "trt",
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    opt_batch: int | None = None,
    workspace_mb: int = 4096,
    timing_cache: str | Path | None = None,
    verify_int8: bool = True,
    engines: str = "auto",
    progress: bool = True,
) -> dict:
    """Build every group's plan and register them in the bundle's manifest; returns the build report (build.json).
    `batch_sizes` are engine-call batches: with guidance the sampler calls the engine with twice --batch-size, so
    the last entry must be at least 2x the sampling batch (the default 1,16,32 serves --batch-size 16).
    `timing_cache` defaults to the bundle's own from an earlier build. With `verify_int8`, a quantized node that
    TensorRT runs in float (or whose layer cannot be found) fails the build; without, it is only reported.
    `engines`: refit (one plan per precision, scales refitted per group: runtime.trt_refit), per-group, or auto
    (refit where a precision's groups differ only in Q/DQ scales, else per-group)."""
    config = BuildConfig(backend, batch_sizes, opt_batch, workspace_mb, verify_int8, engines)
    bundle = load_bundle(bundle_dir)
    check_target(bundle)
    plan_sets = engine_plan_sets(bundle, config.engines)  # refit refusals before TensorRT is looked for
    version = tensorrt_version()  # the one-line error when TensorRT is missing, before anything is written
    root = bundle.root
    cache_path = Path(timing_cache) if timing_cache is not None else root / ENGINE_DIR / TIMING_CACHE
    if timing_cache is not None and not cache_path.is_file():
        raise ConfigError(f"--timing-cache {cache_path}: no such file")
    builder = PlanBuilder(config, cache_path.read_bytes() if cache_path.is_file() else None)
    engines = root / Path(ENGINE_DIR).parent
    made_engines = not engines.exists()
    engines.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".trt-build-", dir=engines))
    start = time.perf_counter()
    try:
        groups = {}
        for ids, tables, why in tqdm(plan_sets, desc="build", disable=not progress, leave=False):
            built = _build_plan(bundle, ids, tables, builder, config, tmp)
            built["reason"] = why
            groups |= {str(g): built for g in ids}
        (tmp / TIMING_CACHE).write_bytes(builder.timing_cache())
        report = _report(config, version, groups, builder, cache_path, time.perf_counter() - start)
        (tmp / BUILD_JSON).write_text(json.dumps(report, indent=1))
        _commit(bundle, tmp, config, version, groups, report["mode"])
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if made_engines and not any(engines.iterdir()):
            engines.rmdir()
    return {**report, "bundle": str(root)}


def engine_plan_sets(bundle: Bundle, mode: str) -> list[tuple[list[int], dict | None, str]]:
    """[(groups, refit tables or None, why)] of the plans to build: per-group, a plan per group (tables None);
    refit, a plan per precision whose groups' Q/DQ scales are refitted (a BuildError when they cannot be); auto,
    refit where it can, else per-group with the reason in `why`."""
    from runtime.trt_refit import precision_groups, refit_tables

    if mode == "per-group":
        return [([g["id"]], None, "per-group plans asked for") for g in bundle.manifest["groups"]]
    sets = []
    for ids in precision_groups(bundle):
        if len(ids) == 1:
            sets.append((ids, None, "one group of this precision: nothing to refit"))
            continue
        try:
            sets.append((ids, refit_tables(bundle, ids)[1], "refit"))
        except BuildError as e:
            if mode == "refit":
                raise
            sets.extend(([g], None, f"per-group: {e}") for g in ids)
    return sets


def _build_plan(bundle: Bundle, ids: list[int], tables: dict | None, builder: PlanBuilder, config: BuildConfig,
                out: Path) -> dict:  # fmt: skip
    """Build, inspect and write the plan of group ids[0]'s graph (with `tables`: its Q/DQ scales refittable, then
    checked to refit to every group in `ids`); the INT8 check fails the build unless verify_int8 is off."""
    g = ids[0]
    entry = next(e for e in bundle.manifest["groups"] if e["id"] == g)
    what = f"group {g} ({bundle.root / entry['file']})" + (f", refittable for groups {ids}" if tables else "")
    model = bundle.group_model(g).SerializeToString()  # an overlay group: its base graph with its own scales
    start = time.perf_counter()
    # external weights resolve relative to the directory of `path`: the bundle root, where weights.bin lies
    plan = builder.build(model, bundle.root / entry.get("base", entry["file"]), what, refittable=sorted(tables or {}))
    seconds = time.perf_counter() - start
    info, memory = inspect_plan(plan, what)
    quantized = bundle.manifest.get("quantized_nodes") or []
    fallbacks = int8_fallbacks(info, quantized)
    if fallbacks and config.verify_int8:
        raise BuildError(_fallback_message(what, fallbacks, len(quantized)))
    name = f"group_{g}_refit.plan" if tables is not None else f"group_{g}.plan"
    (out / name).write_bytes(plan)
    report = {
        "plan": f"{ENGINE_DIR}/{name}",
        "groups": ids,
        "bytes": len(plan),
        "build_seconds": round(seconds, 2),
        "device_memory_bytes": memory,
        "layers": len(info.get("Layers", [])),
        "int8": {"quantized_nodes": len(quantized), "int8": len(quantized) - len(fallbacks), "fallbacks": fallbacks},
    }
    if tables is not None:
        report["refit_check"] = verify_refit(bundle, out / name, ids, tables, config)
    return report


def verify_refit(bundle: Bundle, plan: Path, ids: list[int], tables: dict, config: BuildConfig) -> dict:
    """Run the refittable plan on one probe input at every group of `ids` and back at the first: refitting must
    change the output (the scales reach the kernels) and the first group's output must come back bit for bit (no
    state is left behind). Returns the scale count, each group's max |output - first group's| and the mean refit
    time; raises BuildError otherwise."""
    import numpy as np

    from runtime.tensorrt import SharedScratch, TrtEngine
    from runtime.trt_refit import RefitEngine

    spec, batch = bundle.spec, config.profile_batches[0]
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((batch, *spec.sample_shape)).astype(np.float32),
             np.full(batch, spec.num_train_timesteps // 2, np.int64)]  # fmt: skip
    if spec.condition == "class_labels":
        feeds.append(np.arange(batch, dtype=np.int64) % spec.num_class_embeds)
    elif spec.condition == "encoder_hidden_states":
        feeds.append(rng.standard_normal((batch, *spec.context_shape)).astype(np.float32))
    engine = RefitEngine(TrtEngine(plan, spec, scratch=SharedScratch(), batch_range=(batch, batch)), tables, ids)
    first = engine.infer(ids[0], *feeds)
    differences, seconds = {}, []
    for g in [*ids[1:], ids[0]]:
        start = time.perf_counter()
        engine.select(g)
        seconds.append(time.perf_counter() - start)
        differences[g] = float(np.abs(engine.infer(g, *feeds) - first).max())
    back = differences.pop(ids[0])
    if back != 0.0:
        raise BuildError(f"{plan.name}: after refitting through groups {ids}, group {ids[0]}'s output differs from "
                         f"the built plan's by up to {back:.3g}; TensorRT's refit is not reliable for this graph: "
                         "build per-group plans with `dqc build BUNDLE --trt-engines per-group`")  # fmt: skip
    if differences and max(differences.values()) == 0.0:
        raise BuildError(
            f"{plan.name}: refitting groups {ids[1:]}'s scales left the output unchanged; TensorRT "
            "folded the scales: build per-group plans with `dqc build BUNDLE --trt-engines per-group`"
        )
    engine.engine.deactivate()
    return {"scales": len(tables), "max_abs_vs_first": {str(g): d for g, d in differences.items()},
            "refit_seconds_mean": sum(seconds) / len(seconds)}  # fmt: skip


def _fallback_message(what: str, fallbacks: list[dict], total: int) -> str:
    lines = [f"{f['node']} ({f['op']}): {_describe(f)}" for f in fallbacks[:_SHOWN]]
    more = f"; and {len(fallbacks) - _SHOWN} more" if len(fallbacks) > _SHOWN else ""
    return (
        f"{what}: {len(fallbacks)} of {total} quantized nodes are not INT8 in the TensorRT engine: "
        f"{'; '.join(lines)}{more}. Check the Q/DQ placement with `dqc lint BUNDLE --target trt`, or build anyway "
        "with --no-verify-int8"
    )


def _describe(fallback: dict) -> str:
    if fallback["status"] == "float":
        return f"layer {fallback['engine_layer']!r} takes {fallback['input']}"
    return fallback["reason"]


def _report(config: BuildConfig, version: str, groups: dict, builder: PlanBuilder, cache: Path, seconds: float):
    low, opt, high = config.profile_batches
    plans = {v["plan"]: v for v in groups.values()}
    return {
        "mode": "refit" if any("refit_check" in v for v in plans.values()) else "per-group",
        "tensorrt_version": version,
        "gpu": gpu_info(),
        "config": config.to_dict(),
        "profile": {
            "min": low,
            "opt": opt,
            "max": high,
            "note": "engine-call batch: 2x the sampling batch with guidance",
        },
        "strongly_typed": True,
        "workspace_mb": config.workspace_mb,
        "timing_cache": {"from": str(cache) if builder.initial_cache else None, "reused": builder.cache_reused},
        "groups": groups,
        "plans": len(plans),
        "int8_verified": config.verify_int8,
        "int8_fallbacks": sum(len(v["int8"]["fallbacks"]) for v in plans.values()),
        "total_seconds": round(seconds, 2),
    }


def _commit(bundle: Bundle, tmp: Path, config: BuildConfig, version: str, groups: dict, mode: str = "per-group"):
    """Swap the built directory in as engines/trt and replace the manifest; on any failure in between, put the
    previous engines/trt back so that the manifest and the files on disk always agree."""
    root, final = bundle.root, bundle.root / ENGINE_DIR
    old = final.with_name(".trt-old")
    manifest = json.loads(json.dumps(bundle.manifest))  # a deep copy
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(f"{ENGINE_DIR}/")}  # stale entries
    files |= {f"{ENGINE_DIR}/{p.name}": sha256_file(p) for p in sorted(tmp.iterdir())}
    manifest["files"] = files
    trt = {
        "mode": mode,
        "plans": {g: v["plan"] for g, v in groups.items()},
        "batch_sizes": list(config.batch_sizes),
        "opt_batch": config.profile_batches[1],
        "tensorrt_version": version,
        "build": f"{ENGINE_DIR}/{BUILD_JSON}",
    }
    manifest["engines"] = {**(manifest.get("engines") or {}), "trt": trt}
    staged = root / f".{MANIFEST}.trt.tmp"
    staged.write_text(json.dumps(manifest, indent=1))
    if old.exists():
        shutil.rmtree(old)
    swapped = committed = False
    try:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        swapped = True
        os.replace(staged, root / MANIFEST)
        committed = True
    finally:
        if not committed:
            if swapped:
                os.replace(final, tmp)
            if old.exists():
                os.replace(old, final)
            staged.unlink(missing_ok=True)
        elif old.exists():
            shutil.rmtree(old)
