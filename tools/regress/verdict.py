"""Verdicts: a measured value against its baseline, aware of the noise of both.

With σ = √(noise_now² + noise_baseline²) (the baseline's noise taken as this run's when it recorded none), a
change smaller than 1.96 σ cannot be told from noise at 95 %. `worse` is the change in the bad direction.
- tolerance "auto": regressed when worse > 1.96 σ, improved when better by more than that, else pass;
- a given tolerance t: regressed when worse > t and worse > 1.96 σ; worse > t but within the noise band is
  `inconclusive` (this run cannot separate the change from noise: it says so and does not fail); improved
  when better by more than both.
"""

from __future__ import annotations

import math
from xml.etree import ElementTree as ET

from tools.regress.spec import MetricSpec

Z95 = 1.96
VERDICTS = ("pass", "regressed", "improved", "inconclusive")


def judge(ms: MetricSpec, measured: dict) -> dict:
    value, noise = measured["value"], measured.get("noise") or 0.0
    base_noise = ms.noise if ms.noise is not None else noise
    sigma = math.sqrt(noise**2 + base_noise**2)
    band = Z95 * sigma
    worse = (ms.baseline - value) if ms.metric.higher_is_better else (value - ms.baseline)
    if ms.tolerance == "auto":
        threshold, basis = band, "auto (1.96 σ)"
    else:
        threshold, basis = float(ms.tolerance), f"{float(ms.tolerance):.4g}"
        if threshold < band:
            basis += " (< noise)"
    if worse > threshold:
        verdict = "regressed" if worse > band else "inconclusive"
    elif -worse > max(threshold, band):
        verdict = "improved"
    else:
        verdict = "pass"
    note = ""
    if verdict == "inconclusive":
        note = (f"worse by {worse:.4g}, beyond the tolerance {threshold:.4g} but inside the noise band ±{band:.4g}: "
                "this run cannot separate the change from noise (raise n or the rounds)")  # fmt: skip
    return {"metric": ms.metric.name, "baseline": ms.baseline, "value": value, "change": value - ms.baseline,
            "noise": noise, "baseline_noise": ms.noise, "band": band, "threshold": threshold,
            "tolerance_basis": basis, "noise_basis": measured.get("noise_basis"), "verdict": verdict, "note": note,
            "higher_is_better": ms.metric.higher_is_better}  # fmt: skip


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for case, r in results["cases"].items():
        for v in r["verdicts"]:
            rows.append([case, v["metric"], _fmt(v["baseline"]), _fmt(v["value"]), f"{v['change']:+.4g}",
                         f"±{v['band']:.3g}", v["tolerance_basis"], v["verdict"]])  # fmt: skip
    return rows


HEADER = ["case", "metric", "baseline", "now", "change", "noise band (95 %)", "tolerance", "verdict"]


def format_text(results: dict) -> str:
    rows = [HEADER] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for case, r in results["cases"].items():
        for v in r["verdicts"]:
            if v["note"]:
                lines.append(f"{case} {v['metric']}: {v['note']}")
    bases = {v["metric"]: v["noise_basis"] for r in results["cases"].values() for v in r["verdicts"]}
    lines += [f"noise of {k}: {b}" for k, b in bases.items() if b]
    lines.append(summary(results))
    return "\n".join(lines)


def summary(results: dict) -> str:
    counts = {k: 0 for k in VERDICTS}
    for r in results["cases"].values():
        for v in r["verdicts"]:
            counts[v["verdict"]] += 1
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no metrics"


def format_markdown(results: dict) -> str:
    out = [f"Spec `{results['spec']}`, machine: {results.get('machine', {}).get('cpu', '?')}.", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]  # fmt: skip
    out += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    notes = [f"- {c} {v['metric']}: {v['note']}" for c, r in results["cases"].items() for v in r["verdicts"]
             if v["note"]]  # fmt: skip
    return "\n".join(out + ([""] + notes if notes else []) + ["", summary(results), ""])


def junit_xml(results: dict) -> bytes:
    """One testsuite, one testcase per case × metric: a regression is a failure, an inconclusive verdict is
    reported as skipped with the reason."""
    cases = [(c, v) for c, r in results["cases"].items() for v in r["verdicts"]]
    failures = sum(v["verdict"] == "regressed" for _, v in cases)
    skipped = sum(v["verdict"] == "inconclusive" for _, v in cases)
    suite = ET.Element("testsuite", name=f"dqc regress {results['spec']}", tests=str(len(cases)),
                       failures=str(failures), errors="0", skipped=str(skipped))  # fmt: skip
    for case, v in cases:
        tc = ET.SubElement(suite, "testcase", classname=f"dqc.regress.{case}", name=v["metric"],
                           time=f"{results['cases'][case].get('seconds', 0):.3f}")  # fmt: skip
        text = (f"baseline {_fmt(v['baseline'])}, now {_fmt(v['value'])}, change {v['change']:+.4g}, "
                f"noise band ±{v['band']:.3g} ({v['noise_basis']}), tolerance {v['tolerance_basis']}")  # fmt: skip
        if v["verdict"] == "regressed":
            ET.SubElement(tc, "failure", message=f"{v['metric']} regressed", type="regression").text = text
        elif v["verdict"] == "inconclusive":
            ET.SubElement(tc, "skipped", message=v["note"])
        ET.SubElement(tc, "system-out").text = f"{v['verdict']}: {text}"
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)
