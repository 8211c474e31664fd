"""`dqc regress run` and `dqc regress update`: measure a spec's cases, judge them against their baselines, or
rewrite the baselines from a run."""

from __future__ import annotations

import difflib
import time
from pathlib import Path

from runtime.errors import ConfigError
from tools.regress.measure import code_fingerprint, measure_case
from tools.regress.spec import Spec, load_spec, rewrite_baselines
from tools.regress.verdict import judge


def _select(spec: Spec, only: list[str] | None) -> list[str]:
    if not only:
        return list(spec.cases)
    unknown = [c for c in only if c not in spec.cases]
    if unknown:
        raise ConfigError(f"--only {unknown[0]}: no such case in {spec.path}; cases: {', '.join(spec.cases)}")
    return only


def _measure(spec: Spec, names: list[str], progress: bool, engines_of=None) -> dict:
    from tools.bench.speed import machine_report

    code = code_fingerprint()
    out = {"spec": str(spec.path), "code_sha256": code, "machine": machine_report(), "cases": {}}
    for name in names:
        case = spec.cases[name]
        if progress:
            print(f"case {name}: measuring {', '.join(case.metrics)}", flush=True)
        start = time.perf_counter()
        m = measure_case(spec, case, code=code, progress=progress, engines_of=engines_of)
        m["seconds"] = round(time.perf_counter() - start, 2)
        out["cases"][name] = m
    return out


def run_spec(path: str | Path, *, only: list[str] | None = None, cache: str | Path | None = None,
             progress: bool = True, engines_of=None) -> dict:  # fmt: skip
    """Measure and judge every selected case; the result holds each metric's verdict and `regressed`."""
    spec = load_spec(path, need_baselines=True)  # every refusal before any measurement
    spec.cache_override = cache
    results = _measure(spec, _select(spec, only), progress, engines_of)
    for name, r in results["cases"].items():
        r["verdicts"] = [judge(spec.cases[name].metrics[k], r["metrics"][k]) for k in spec.cases[name].metrics]
    results["regressed"] = any(v["verdict"] == "regressed" for r in results["cases"].values() for v in r["verdicts"])
    return results


def new_baselines(spec: Spec, results: dict) -> dict[str, dict[str, dict]]:
    """{case: {metric: the inline-table fields}} from a run: value, noise, the conditions, the tolerance kept."""
    out: dict[str, dict[str, dict]] = {}
    for name, r in results["cases"].items():
        case = spec.cases[name]
        for k, ms in case.metrics.items():
            m = r["metrics"][k]
            fields = {"baseline": round(m["value"], 6), "noise": round(m["noise"], 6)}
            fields |= {c: case.sample[c] for c in ms.metric.conditions}
            fields["tolerance"] = ms.tolerance
            out.setdefault(name, {})[k] = fields
    return out


def update_spec(
    path: str | Path,
    *,
    only: list[str] | None = None,
    dry_run: bool = False,
    cache: str | Path | None = None,
    progress: bool = True,
    engines_of=None,
) -> tuple[str, dict]:
    """Measure, then rewrite the selected cases' baselines in the spec file (atomically). Returns the unified
    diff (empty when nothing changed) and the run."""
    from tools.deploy.pipeline import write_text

    spec = load_spec(path, need_baselines=False)
    spec.cache_override = cache
    names = _select(spec, only)
    before = Path(path).read_text()
    rewrite_baselines(before, {n: dict.fromkeys(spec.cases[n].metrics, {}) for n in names})  # every line found
    results = _measure(spec, names, progress, engines_of)
    after = rewrite_baselines(before, new_baselines(spec, results))
    diff = "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"{path} (before)", tofile=f"{path} (measured)"))  # fmt: skip
    if diff and not dry_run:
        write_text(path, after)
        load_spec(path, need_baselines=True)  # what was written reads back whole
    return diff, results
