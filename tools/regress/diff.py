"""`dqc diff A B`: what differs between two bundles of one model, and which layer moved.

- manifest fields (flattened key paths; long numeric lists summarized by their largest difference);
- scales and zero points per quantization point and group (every `<point>/scale`, `<point>/zero_point`
  initializer of each group graph), sorted by relative change;
- the group tables (timestep → group) and the PTQD tables (k, bias, σ_q per step);
- per-layer output error on shared seeded inputs: both bundles' graphs run on ONNX Runtime at the same noised
  inputs, every quantized layer's float input (before its Q) and dequantized output are probed, and each layer
  is ranked by the error it adds: rel(out) − rel(in), with rel = ‖A − B‖ / ‖A‖. A layer whose quantization
  changed adds error; the layers after it inherit error at their input and add little.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.errors import ConfigError

SKIP_FIELDS = ("files",)  # hashes of files: they differ whenever anything does; the sections below say what


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj) and len(obj) <= 64:
        out = {}
        for i, v in enumerate(obj):
            out |= _flatten(v, f"{prefix}[{i}]")
        return out
    return {prefix: obj}


def _describe(a, b) -> str:
    num = lambda v: isinstance(v, list) and v and all(isinstance(x, int | float) for x in v)  # noqa: E731
    if num(a) and num(b) and len(a) == len(b):
        d = np.abs(np.asarray(a, float) - np.asarray(b, float))
        return f"{int((d > 0).sum())} of {len(a)} values differ, largest by {d.max():.4g}"
    text = lambda v: json.dumps(v) if len(json.dumps(v)) <= 80 else json.dumps(v)[:77] + "..."  # noqa: E731
    return f"{text(a)} → {text(b)}"


def manifest_diff(ma: dict, mb: dict) -> list[dict]:
    fa = _flatten({k: v for k, v in ma.items() if k not in SKIP_FIELDS})
    fb = _flatten({k: v for k, v in mb.items() if k not in SKIP_FIELDS})
    out = []
    for key in sorted(set(fa) | set(fb)):
        if key not in fa:
            out.append({"field": key, "change": "added", "detail": json.dumps(fb[key])[:80]})
        elif key not in fb:
            out.append({"field": key, "change": "removed", "detail": json.dumps(fa[key])[:80]})
        elif fa[key] != fb[key]:
            out.append({"field": key, "change": "changed", "detail": _describe(fa[key], fb[key])})
    return out


def _scales(model, root: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t, base_dir=str(root)).astype(np.float64) for t in model.graph.initializer
            if t.name.endswith("/scale") or t.name.endswith("/zero_point")}  # fmt: skip


def scale_diff(a, b) -> list[dict]:
    """Per group present in both and per quantization point: the relative change of its scale (largest over
    channels) and whether the zero point moved."""
    out = []
    for g in sorted(set(range(len(a.manifest["groups"]))) & set(range(len(b.manifest["groups"])))):
        sa, sb = _scales(a.group_model(g), a.root), _scales(b.group_model(g), b.root)
        for name in sorted(set(sa) | set(sb)):
            point, kind = name.rsplit("/", 1)
            if name not in sa or name not in sb:
                side = "B" if name in sb else "A"
                out.append({"group": g, "point": point, "what": kind, "change": f"only in {side}", "relative": np.inf})
                continue
            x, y = sa[name], sb[name]
            if x.shape != y.shape:
                out.append({"group": g, "point": point, "what": kind, "change": f"shape {x.shape} → {y.shape}",
                            "relative": float("inf")})  # fmt: skip
                continue
            if np.array_equal(x, y):
                continue
            if kind == "scale":
                rel = float(np.max(np.abs(y - x) / np.maximum(np.abs(x), 1e-30)))
                change = (f"{x.item():.6g} → {y.item():.6g}" if x.size == 1
                          else f"{int((x != y).sum())} of {x.size} channels")  # fmt: skip
            else:
                rel = float(np.max(np.abs(y - x)))
                change = f"{x.ravel()[0]:.0f} → {y.ravel()[0]:.0f}" if x.size == 1 else f"{int((x != y).sum())} moved"
            out.append({"group": g, "point": point, "what": kind, "change": change, "relative": rel})
    return sorted(out, key=lambda r: -r["relative"])


def table_diff(a, b) -> dict:
    out: dict = {}
    ga, gb = np.asarray(a.group_of_t), np.asarray(b.group_of_t)
    if ga.shape != gb.shape or not np.array_equal(ga, gb):
        moved = np.flatnonzero(ga != gb) if ga.shape == gb.shape else np.arange(max(len(ga), len(gb)))
        out["timestep_to_group"] = {"timesteps_moved": int(len(moved)),
                                    "first": [int(t) for t in moved[:10]]}  # fmt: skip
    pa, pb = a.manifest.get("ptqd") or {}, b.manifest.get("ptqd") or {}
    for bits in sorted(set(pa) | set(pb)):
        if bits not in pa or bits not in pb:
            out[f"ptqd.{bits}"] = "only in " + ("B" if bits in pb else "A")
            continue
        ta, tb = a._ptqd_tables(pa[bits]), b._ptqd_tables(pb[bits])
        rows = {}
        for field in ("timesteps", "k", "bias", "sigma_q"):
            x, y = np.asarray(getattr(ta, field), float), np.asarray(getattr(tb, field), float)
            if x.shape != y.shape:
                rows[field] = f"shape {x.shape} → {y.shape}"
            elif not np.array_equal(x, y):
                rows[field] = f"largest difference {np.max(np.abs(x - y)):.4g}"
        if rows:
            out[f"ptqd.{bits}"] = rows
    return out


def _layers(model) -> list[str]:
    names = []
    for n in model.graph.node:
        for suffix in ("/input/Q", "/input/in/Clip"):
            if n.name.endswith(suffix):
                names.append(n.name[: -len(suffix)])
    return list(dict.fromkeys(names))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(a.astype(np.float64)), 1e-30))


def layer_errors(a, b, *, timesteps: list[int] | None = None, n: int = 4, seed: int = 0) -> list[dict]:
    """Each quantized layer's relative input and output error of B against A on shared seeded inputs, summed
    over `timesteps` (default: one per group of A), ranked by the error the layer adds."""
    from exporter.parity import noised_inputs, probe_model, run_probes

    if timesteps is None:
        timesteps = [int(np.flatnonzero(np.asarray(a.group_of_t) == g)[0]) for g in sorted(set(a.group_of_t.tolist()))]
    acc: dict[str, dict] = {}
    for t in timesteps:
        feeds = noised_inputs(a.spec, a.schedule, t, n, seed)
        ga, gb = (
            a.group_model(int(a.group_of_t[t]), load_weights=True),
            b.group_model(int(b.group_of_t[t]), load_weights=True),
        )
        layers = [x for x in _layers(ga) if x in set(_layers(gb))]
        pa, probes_a = probe_model(ga, layers)
        pb, probes_b = probe_model(gb, layers)
        va, vb = run_probes(pa, feeds, "ort"), run_probes(pb, feeds, "ort")
        for name in probes_a.keys() & probes_b.keys():
            (ia, oa), (ib, ob) = probes_a[name], probes_b[name]
            r = acc.setdefault(name, {"layer": name, "input_error": 0.0, "output_error": 0.0})
            r["input_error"] += _rel(va[ia], vb[ib]) / len(timesteps)
            r["output_error"] += _rel(va[oa], vb[ob]) / len(timesteps)
    rows = list(acc.values())
    for r in rows:
        r["added_error"] = r["output_error"] - r["input_error"]
    return sorted(rows, key=lambda r: -r["added_error"])


def diff_bundles(path_a: str | Path, path_b: str | Path, *, layers: bool = True, n: int = 4, seed: int = 0) -> dict:
    from runtime.bundle import load_bundle

    a, b = load_bundle(path_a), load_bundle(path_b)
    wa, wb = a.manifest["model"].get("weight_sha256"), b.manifest["model"].get("weight_sha256")
    if wa != wb:
        raise ConfigError(f"{path_b}: model.weight_sha256 {str(wb)[:16]}… is not {path_a}'s {str(wa)[:16]}…: "
                          "compiled from different models; dqc diff compares bundles of one model")  # fmt: skip
    if a.spec.to_dict() != b.spec.to_dict():
        raise ConfigError(f"{path_b}: input_spec differs from {path_a}'s; the bundles cannot share inputs")
    report = {"a": str(path_a), "b": str(path_b), "manifest": manifest_diff(a.manifest, b.manifest),
              "scales": scale_diff(a, b), "tables": table_diff(a, b)}  # fmt: skip
    if layers:
        report["layers"] = layer_errors(a, b, n=n, seed=seed)
    return report


def format_diff(r: dict, top: int = 15) -> str:
    lines = [f"A {r['a']}", f"B {r['b']}", ""]
    lines.append(f"manifest: {len(r['manifest'])} fields differ" if r["manifest"] else "manifest: identical")
    lines += [f"  {m['field']}: {m['change']} {m['detail']}" for m in r["manifest"][:top]]
    if len(r["manifest"]) > top:
        lines.append(f"  … {len(r['manifest']) - top} more (--json for all)")
    lines.append(f"scales: {len(r['scales'])} quantization points differ" if r["scales"] else "scales: identical")
    for s in r["scales"][:top]:
        lines.append(f"  group {s['group']}  {s['point']} {s['what']}: {s['change']} (relative {s['relative']:.3g})")
    lines.append("tables: " + ("identical" if not r["tables"] else json.dumps(r["tables"])))
    if "layers" in r:
        lines.append("per-layer error of B vs A on shared inputs, by the error each layer adds:")
        lines.append(f"  {'layer':<48} {'adds':>10} {'in':>10} {'out':>10}")
        for x in r["layers"][:top]:
            lines.append(f"  {x['layer']:<48} {x['added_error']:>10.4g} {x['input_error']:>10.4g} "
                         f"{x['output_error']:>10.4g}")  # fmt: skip
    return "\n".join(lines)
