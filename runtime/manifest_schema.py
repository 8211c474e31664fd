"""The bundle manifest's schema (format version 1), checked field by field before anything reads it, so a
field of the wrong type is reported by its path instead of failing somewhere later with a traceback.

A schema is a type, a tuple of alternatives, or one of the small combinators below; `check` walks the
manifest and raises BundleError naming the first bad field ("groups[2].id: expected int, got str").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.engine import InputSpec
from runtime.errors import BundleError


@dataclass(frozen=True)
class ListOf:
    item: object
    length: int | None = None


@dataclass(frozen=True)
class DictOf:
    value: object  # keys are strings


@dataclass(frozen=True)
class Record:
    fields: dict  # name → schema; names ending in "?" are optional
    open: bool = True  # other fields allowed


@dataclass(frozen=True)
class Tagged:
    """An object whose schema is chosen by the value of one of its fields (absent: `default`)."""

    key: str
    choices: dict  # value of `key` → schema
    default: str


INT, NUM, STR, BOOL = "int", "number", "str", "bool"

_GROUP = Record({"id": INT, "file": STR, "base?": STR, "bits?": STR})
_PTQD = Record({"file": STR, "sampler": STR, "steps": INT, "eta": NUM, "samples?": INT, "k_fallback?": ListOf(INT)})
MANIFEST_V1 = Record(
    {
        "format": STR,
        "format_version": INT,
        "model": Record({"weight_sha256?": STR}),
        "input_spec": Record(
            {
                "sample_shape": ListOf(INT, 3),
                "num_train_timesteps": INT,
                "num_class_embeds?": (INT, None),
                "inputs?": ListOf(STR),
                "context_shape?": (ListOf(INT, 2), None),
                "timestep_type?": STR,
            }
        ),
        "schedule": Tagged(
            "kind",
            {
                "diffusion": Record(
                    {
                        "betas": ListOf(NUM),
                        "beta_schedule": STR,
                        "clip_sample?": BOOL,
                        "clip_sample_range?": NUM,
                        "set_alpha_to_one?": BOOL,
                        "steps_offset?": INT,
                        "timestep_spacing?": STR,
                    }
                ),
                "flow": Record({"num_train_timesteps": INT, "shift": NUM}),
            },
            default="diffusion",
        ),  # fmt: skip
        "null_class?": (INT, None),
        "w4_linear?": (Record({"MatMulNBits?": INT, "INT4?": INT}), None),
        "groups": ListOf(_GROUP),
        "timestep_to_group": ListOf(INT),
        "files": DictOf(STR),
        "target": STR,
        "bits": STR,
        "calibration?": Record({"sampler?": STR, "steps?": INT, "eta?": NUM, "guidance?": NUM}),
        "precisions?": DictOf(Record({"groups": ListOf(INT), "timestep_to_group": ListOf(INT)})),
        "precision_plan?": (Record({"low": STR, "high": STR}), None),
        "ptqd?": (DictOf(_PTQD), None),
        "quantized_nodes?": ListOf(Record({"node": STR, "op": STR})),
        "float_nodes?": ListOf(Record({"node": STR, "op": STR, "reason": STR})),
        "shared_input_qdq?": DictOf(STR),
        "components?": Record(
            {
                "text_encoder?": Record({"file": STR, "context_shape": ListOf(INT, 2)}),
                "tokenizer?": Record({"folder": STR, "max_length": INT}),
                "vae_decoder?": Record({"file": STR, "scaling_factor": NUM, "image_shape": ListOf(INT, 3)}),
                "calibration_prompts?": ListOf(STR),
            }
        ),
    }
)


def _is(value, kind) -> bool:
    if kind is None:
        return value is None
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == STR:
        return isinstance(value, str)
    if kind == BOOL:
        return isinstance(value, bool)
    return False


def _name(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_name(k) for k in kind)
    if kind is None:
        return "null"
    if isinstance(kind, ListOf):
        return "a list"
    if isinstance(kind, (DictOf, Record, Tagged)):
        return "an object"
    return kind


def _walk(value, schema, path: str) -> str | None:
    """The first violation under `path`, or None."""
    if isinstance(schema, tuple):
        errors = [_walk(value, s, path) for s in schema]
        if all(errors):
            shallow = [e for e, s in zip(errors, schema, strict=True) if not _shallow_mismatch(value, s)]
            return shallow[0] if shallow else f"{path}: expected {_name(schema)}, got {_typename(value)}"
        return None
    if isinstance(schema, Tagged):
        if not isinstance(value, dict):
            return f"{path}: expected an object, got {_typename(value)}"
        tag = value.get(schema.key, schema.default)
        if tag not in schema.choices:
            return f"{path}.{schema.key}: {tag!r} is not one of {sorted(schema.choices)}"
        return _walk(value, schema.choices[tag], path)
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            return f"{path}: expected a list, got {_typename(value)}"
        if schema.length is not None and len(value) != schema.length:
            return f"{path}: expected {schema.length} entries, got {len(value)}"
        return next((e for i, v in enumerate(value) if (e := _walk(v, schema.item, f"{path}[{i}]"))), None)
    if isinstance(schema, DictOf):
        if not isinstance(value, dict):
            return f"{path}: expected an object, got {_typename(value)}"
        return next((e for k, v in value.items() if (e := _walk(v, schema.value, f"{path}.{k}"))), None)
    if isinstance(schema, Record):
        if not isinstance(value, dict):
            return f"{path}: expected an object, got {_typename(value)}"
        for key, sub in schema.fields.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"{path}.{name}: missing".lstrip(".")
            if error := _walk(value[name], sub, f"{path}.{name}".lstrip(".")):
                return error
        return None
    return None if _is(value, schema) else f"{path}: expected {_name(schema)}, got {_typename(value)}"


def _shallow_mismatch(value, schema) -> bool:
    """Whether `value` is not even of `schema`'s outer kind (so its inner errors are not the story)."""
    if isinstance(schema, ListOf):
        return not isinstance(value, list)
    if isinstance(schema, (DictOf, Record, Tagged)):
        return not isinstance(value, dict)
    return not _is(value, schema)


def _typename(value) -> str:
    return "null" if value is None else type(value).__name__


def check(manifest, mpath: Path) -> None:
    """Raise BundleError naming the first field of `manifest` that does not fit MANIFEST_V1."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: expected a JSON object, got {_typename(manifest)}; recompile the bundle")
    error = _walk(manifest, MANIFEST_V1, "")
    if error:
        raise BundleError(f"{mpath}: {error}; recompile the bundle")
    ids = [g["id"] for g in manifest["groups"]]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise BundleError(f"{mpath}: groups: id {dupes[0]} appears more than once; recompile the bundle")
    spec = manifest["input_spec"]
    if any(n <= 0 for n in spec["sample_shape"]) or spec["num_train_timesteps"] < 2:
        raise BundleError(f"{mpath}: input_spec: sample_shape entries and num_train_timesteps must be positive")
    names = InputSpec.from_dict(spec).names
    if spec.get("inputs", names) != names:
        raise BundleError(
            f"{mpath}: input_spec.inputs = {spec['inputs']} does not match num_class_embeds = "
            f"{spec.get('num_class_embeds')} (engine inputs {names}); recompile the bundle"
        )
    steps = manifest.get("calibration", {}).get("steps")
    if steps is not None and not 1 <= steps <= spec["num_train_timesteps"]:
        raise BundleError(
            f"{mpath}: calibration.steps = {steps} must lie in [1, {spec['num_train_timesteps']}]; recompile the bundle"
        )
