"""`dqc build`: TensorRT plans for every group graph of a bundle, in `<bundle>/engines/trt/`.

One plan per group (`group_<g>.plan`), the timing cache every group build shared (`timing.cache`, reused by the
next build on the same GPU and TensorRT version) and `build.json` (versions, GPU, profile, per-group plan size,
build time, device memory and INT8 check). Plans are built into a temp directory inside `engines/`, which then
replaces `engines/trt`, and the manifest is replaced last (temp file + os.replace) with the new files' sha256:
a failure or Ctrl-C leaves the bundle as it was.
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
    progress: bool = True,
) -> dict:
    """Build every group's plan and register them in the bundle's manifest; returns the build report (build.json).
    `batch_sizes` are engine-call batches: with guidance the sampler calls the engine with twice --batch-size, so
    the last entry must be at least 2x the sampling batch (the default 1,16,32 serves --batch-size 16).
    `timing_cache` defaults to the bundle's own from an earlier build. With `verify_int8`, a quantized node that
    TensorRT runs in float (or whose layer cannot be found) fails the build; without, it is only reported."""
    config = BuildConfig(backend, batch_sizes, opt_batch, workspace_mb, verify_int8)
    bundle = load_bundle(bundle_dir)
    check_target(bundle)
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
        for entry in tqdm(bundle.manifest["groups"], desc="build", disable=not progress, leave=False):
            groups[str(entry["id"])] = _build_group(bundle, entry, builder, config, tmp)
        (tmp / TIMING_CACHE).write_bytes(builder.timing_cache())
        report = _report(config, version, groups, builder, cache_path, time.perf_counter() - start)
        (tmp / BUILD_JSON).write_text(json.dumps(report, indent=1))
        _commit(bundle, tmp, config, version, groups)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if made_engines and not any(engines.iterdir()):
            engines.rmdir()
    return {**report, "bundle": str(root)}


def _build_group(bundle: Bundle, entry: dict, builder: PlanBuilder, config: BuildConfig, out: Path) -> dict:
    """Build, inspect and write one group's plan; the INT8 check fails the build unless verify_int8 is off."""
    g = entry["id"]
    what = f"group {g} ({bundle.root / entry['file']})"
    model = bundle.group_model(g).SerializeToString()  # an overlay group: its base graph with its own scales
    start = time.perf_counter()
    # external weights resolve relative to the directory of `path`: the bundle root, where weights.bin lies
    plan = builder.build(model, bundle.root / entry.get("base", entry["file"]), what)
    seconds = time.perf_counter() - start
    info, memory = inspect_plan(plan, what)
    quantized = bundle.manifest.get("quantized_nodes") or []
    fallbacks = int8_fallbacks(info, quantized)
    if fallbacks and config.verify_int8:
        raise BuildError(_fallback_message(what, fallbacks, len(quantized)))
    name = f"group_{g}.plan"
    (out / name).write_bytes(plan)
    return {
        "plan": f"{ENGINE_DIR}/{name}",
        "bytes": len(plan),
        "build_seconds": round(seconds, 2),
        "device_memory_bytes": memory,
        "layers": len(info.get("Layers", [])),
        "int8": {"quantized_nodes": len(quantized), "int8": len(quantized) - len(fallbacks), "fallbacks": fallbacks},
    }


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
    return {
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
        "int8_verified": config.verify_int8,
        "int8_fallbacks": sum(len(g["int8"]["fallbacks"]) for g in groups.values()),
        "total_seconds": round(seconds, 2),
    }


def _commit(bundle: Bundle, tmp: Path, config: BuildConfig, version: str, groups: dict) -> None:
    """Swap the built directory in as engines/trt and replace the manifest; on any failure in between, put the
    previous engines/trt back so that the manifest and the files on disk always agree."""
    root, final = bundle.root, bundle.root / ENGINE_DIR
    old = final.with_name(".trt-old")
    manifest = json.loads(json.dumps(bundle.manifest))  # a deep copy
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(f"{ENGINE_DIR}/")}  # stale entries
    files |= {f"{ENGINE_DIR}/{p.name}": sha256_file(p) for p in sorted(tmp.iterdir())}
    manifest["files"] = files
    trt = {
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
