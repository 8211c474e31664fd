"""The regression spec: a TOML file of cases, each a model, how to compile and sample it, and per metric a
baseline and a tolerance.

```toml
[settings]                    # optional
cache = ".dqc-regress"        # bundles, FP reference samples and runs (relative to this file)
latency_rounds = 5            # interleaved rounds of the latency ratio (its spread is the noise)
latency_reps = 20             # timed calls per engine and round

[cases.w8a8]
model = "reference"           # reference, tiny (built in code) or a model directory; or bundle = "path"
[cases.w8a8.compile]          # CalibrationConfig fields of `dqc compile` (method, bits, groups, ...)
method = "naive"
bits = "W8A8"
[cases.w8a8.sample]           # held-out evaluation: seeds no calibration stream draws
n = 64
steps = 20
[cases.w8a8.metrics]          # written by `dqc regress update`; tolerance: a number or "auto"
psnr = { baseline = 38.1, noise = 0.4, n = 64, seed = 0, steps = 20, tolerance = "auto" }
```

Every unknown key, a metric without a baseline, and a baseline measured under other conditions (another N,
seed, step count or batch) is refused with the key named, before anything is measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from runtime.errors import ConfigError

SETTINGS_KEYS = {"cache": str, "latency_rounds": int, "latency_reps": int, "memory_rounds": int, "bootstrap": int}
CASE_KEYS = {"model", "bundle", "compile", "sample", "metrics", "description"}
COMPILE_KEYS = {
    "method": str, "bits": str, "groups": int, "group_epochs": int, "group_search": str, "calib_samples": int,
    "calib_timesteps": int, "timestep_selection": str, "adaround_iters": int, "act_iters": int, "seed": int,
    "ptqd_samples": int, "target": str, "loss_weighting": str,
}  # fmt: skip
SAMPLE_KEYS = {"n": int, "steps": int, "eta": float, "guidance": float, "seed": int, "batch_size": int,
               "backend": str, "latency_batch": int, "ptqd": str}  # fmt: skip
SAMPLE_DEFAULTS = {"n": 64, "steps": 20, "eta": 0.0, "seed": 0, "batch_size": 32, "backend": "ort",
                   "latency_batch": 1, "ptqd": "cnc,bc,vsc"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Metric:
    """A measured quantity: which direction is better, and the sampling conditions its baseline must share."""

    name: str
    higher_is_better: bool
    unit: str
    conditions: tuple[str, ...]
    help: str


METRICS = {
    m.name: m
    for m in (
        Metric("latency_ratio", False, "×", ("latency_batch", "backend"),
               "per-step latency of the bundle / the FP32 graph on ONNX Runtime, interleaved in one run"),
        Metric("memory_ratio", False, "×", ("latency_batch", "backend"),
               "resident memory of the bundle's engines / the FP32 graph's, each in a fresh process"),
        Metric("fd", False, "", ("n", "seed", "steps", "eta", "guidance"),
               "Fréchet distance of the digits classifier's features against the held-out digits"),
        Metric("accuracy", True, "", ("n", "seed", "steps", "eta", "guidance"),
               "share of samples the digits classifier reads as the requested label"),
        Metric("psnr", True, "dB", ("n", "seed", "steps", "eta", "guidance"),
               "mean of per-sample PSNR vs the FP model's samples from the same seeds, 10·log10(4/MSE_i)"),
    )
}  # fmt: skip
METRIC_KEYS = {"baseline", "noise", "tolerance", "n", "seed", "steps", "eta", "guidance", "latency_batch", "backend"}


@dataclasses.dataclass
class MetricSpec:
    metric: Metric
    baseline: float | None
    noise: float | None  # the baseline run's own noise (one standard deviation), when it measured one
    tolerance: float | str  # a number in the metric's unit, or "auto" (derived from the measured noise)
    at: dict  # the conditions the baseline was measured under


@dataclasses.dataclass
class Case:
    name: str
    model: str | None
    bundle: str | None
    compile: dict
    sample: dict
    metrics: dict[str, MetricSpec]

    def conditions(self) -> dict:
        return dict(self.sample)


@dataclasses.dataclass
class Spec:
    path: Path
    settings: dict
    cases: dict[str, Case]

    cache_override: Path | None = None

    @property
    def cache(self) -> Path:
        """Where bundles, FP samples and runs are kept: --cache, else settings.cache (relative to the spec file),
        else .dqc-regress in the current directory."""
        if self.cache_override is not None:
            return Path(self.cache_override).resolve()
        if "cache" in self.settings:
            return (self.path.parent / self.settings["cache"]).resolve()
        return Path(".dqc-regress").resolve()

    def resolve(self, path: str) -> Path:
        """A path written in the spec, relative to the spec file."""
        return (Path(path) if Path(path).is_absolute() else self.path.parent / path).resolve()


def _where(*keys: str) -> str:
    return ".".join(keys)


def _check_keys(table: dict, allowed, where: str, spec_path: Path) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{spec_path}: unknown key {where + '.' if where else ''}{unknown[0]}; allowed: "
                          f"{', '.join(sorted(allowed))}")  # fmt: skip


def _typed(table: dict, types: dict, where: str, spec_path: Path) -> dict:
    _check_keys(table, types, where, spec_path)
    out = {}
    for k, v in table.items():
        want = types[k]
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise ConfigError(f"{spec_path}: {where}.{k} = {v!r}: expected {want.__name__}")
        out[k] = v
    return out


def load_spec(path: str | Path, *, need_baselines: bool = True) -> Spec:
    """Read and check a spec. With `need_baselines` (dqc regress run) every metric must carry a baseline
    measured under the case's conditions."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such spec file; see `dqc regress run --help` for the format")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    _check_keys(raw, {"settings", "cases"}, "", path)
    settings = _typed(raw.get("settings", {}), SETTINGS_KEYS, "settings", path)
    for k in ("latency_rounds", "latency_reps", "memory_rounds", "bootstrap"):
        if k in settings and settings[k] < 1:
            raise ConfigError(f"{path}: settings.{k} = {settings[k]}: must be at least 1")
    cases_raw = raw.get("cases")
    if not isinstance(cases_raw, dict) or not cases_raw:
        raise ConfigError(f"{path}: no cases; add a [cases.NAME] table")
    cases = {name: _case(name, body, path, need_baselines) for name, body in cases_raw.items()}
    return Spec(path, settings, cases)


def _case(name: str, body, path: Path, need_baselines: bool) -> Case:
    where = f"cases.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"{path}: case name {name!r}: use letters, digits, '-' and '_'")
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: {where} must be a table")
    _check_keys(body, CASE_KEYS, where, path)
    model, bundle = body.get("model"), body.get("bundle")
    for key, v in (("model", model), ("bundle", bundle)):
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{path}: {where}.{key} = {v!r}: expected a string")
    if model is None and bundle is None:
        raise ConfigError(f"{path}: {where}: give model = \"reference\" (or tiny, or a model directory) or "
                          "bundle = \"path\"")  # fmt: skip
    if bundle is not None and body.get("compile"):
        raise ConfigError(f"{path}: {where}.compile: a case with a ready bundle is not compiled; drop one of them")
    compile_ = _typed(body.get("compile", {}), COMPILE_KEYS, f"{where}.compile", path)
    sample = SAMPLE_DEFAULTS | _typed(body.get("sample", {}), SAMPLE_KEYS, f"{where}.sample", path)
    sample.setdefault("guidance", _default_guidance(model, bundle, path))
    if sample["n"] < 2:
        raise ConfigError(f"{path}: {where}.sample.n = {sample['n']}: at least 2 samples")
    if sample["backend"] not in ("ort", "openvino"):
        raise ConfigError(f"{path}: {where}.sample.backend = {sample['backend']!r}: use ort or openvino")
    metrics_raw = body.get("metrics")
    if not isinstance(metrics_raw, dict) or not metrics_raw:
        raise ConfigError(f"{path}: {where}.metrics: name at least one of {', '.join(METRICS)}")
    metrics = {}
    for mname, m in metrics_raw.items():
        if mname not in METRICS:
            raise ConfigError(f"{path}: unknown key {where}.metrics.{mname}; metrics: {', '.join(METRICS)}")
        metrics[mname] = _metric(METRICS[mname], m, f"{where}.metrics.{mname}", sample, path, need_baselines)
    return Case(name, model, bundle, compile_, sample, metrics)


def _default_guidance(model: str | None, bundle: str | None, path: Path) -> float:
    """The guidance a case samples at unless it says: the reference model card's, a ready bundle's calibrated
    one, else 1 (none)."""
    from tools.reference.model import card_guidance

    if card_guidance(model) is not None:
        return card_guidance(model)
    if bundle is not None:
        try:
            manifest = json.loads((path.parent / bundle / "manifest.json").read_text())  # relative to the spec
            return float(manifest["calibration"]["guidance"])
        except (OSError, ValueError, KeyError, TypeError):
            return 1.0
    return 1.0


def _metric(metric: Metric, m, where: str, sample: dict, path: Path, need_baselines: bool) -> MetricSpec:
    if not isinstance(m, dict):
        raise ConfigError(f'{path}: {where} must be an inline table, e.g. {{ tolerance = "auto" }}')
    _check_keys(m, METRIC_KEYS, where, path)
    tol = m.get("tolerance", "auto")
    if not (tol == "auto" or (isinstance(tol, int | float) and not isinstance(tol, bool) and tol >= 0)):
        raise ConfigError(f'{path}: {where}.tolerance = {tol!r}: a number ≥ 0 in the metric\'s unit, or "auto"')
    baseline, noise = m.get("baseline"), m.get("noise")
    for key, v in (("baseline", baseline), ("noise", noise)):
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)):
            raise ConfigError(f"{path}: {where}.{key} = {v!r}: expected a finite number")
    at = {k: m[k] for k in metric.conditions if k in m}
    if need_baselines:
        if baseline is None:
            raise ConfigError(f"{path}: {where}.baseline is missing; measure one with `dqc regress update {path}`")
        for k in metric.conditions:
            if k not in m:
                raise ConfigError(f"{path}: {where}.{k} is missing: the baseline does not say under which "
                                  f"{k} it was measured; re-measure it with `dqc regress update {path}`")  # fmt: skip
            if m[k] != sample[k]:
                raise ConfigError(f"{path}: {where}.{k} = {m[k]!r}: the baseline was measured at {k} = {m[k]!r} "
                                  f"and the case samples at {k} = {sample[k]!r}; re-measure it with "
                                  f"`dqc regress update {path}`")  # fmt: skip
    return MetricSpec(metric, None if baseline is None else float(baseline),
                      None if noise is None else float(noise), tol, at)  # fmt: skip


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


def metric_line(name: str, fields: dict) -> str:
    return f"{name} = {{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in fields.items()) + " }"


def rewrite_baselines(text: str, updates: dict[str, dict[str, dict]]) -> str:
    """`text` with each `[cases.CASE.metrics]` line `METRIC = {...}` replaced by the given fields (a comment
    after the line is kept). A metric written in another form than an inline table on one line is refused."""
    lines = text.splitlines(keepends=True)
    header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")
    section = None
    done: set[tuple[str, str]] = set()
    for i, line in enumerate(lines):
        h = header.match(line)
        if h:
            section = h.group(1).replace(" ", "")
            continue
        m = re.match(r"^(\s*)([A-Za-z_]+)\s*=\s*(\{.*\})\s*(#.*)?$", line.rstrip("\n"))
        if not m or section is None or not section.startswith("cases.") or not section.endswith(".metrics"):
            continue
        case = section[len("cases.") : -len(".metrics")]
        if case in updates and m.group(2) in updates[case]:
            comment = f"  {m.group(4)}" if m.group(4) else ""
            lines[i] = m.group(1) + metric_line(m.group(2), updates[case][m.group(2)]) + comment + "\n"
            done.add((case, m.group(2)))
    missing = [(c, k) for c, ms in updates.items() for k in ms if (c, k) not in done]
    if missing:
        c, k = missing[0]
        raise ConfigError(f"cases.{c}.metrics.{k}: not found as one line `{k} = {{ ... }}` under [cases.{c}.metrics]; "
                          "write each metric as an inline table on its own line")  # fmt: skip
    return "".join(lines)
