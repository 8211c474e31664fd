"""One TensorRT engine for every timestep group of a precision, by refitting its Q/DQ scales at a group switch.

A bundle's group graphs differ only in their activation scales (`runtime.single_engine.varying_initializers`).
`dqc build --trt-engines refit` builds one plan from the first group's graph with those scales marked
refittable (BuilderFlag.REFIT_INDIVIDUAL and INetworkDefinition.mark_weights_refittable: only they may change,
everything else TensorRT optimizes as constants), and the runtime writes a group's scales into the engine with a
Refitter (set_named_weights, refit_cuda_engine) when the sampler moves to that group: one plan and one copy of the
weights on the GPU for all groups, a few hundred scalars written per switch.

Why not scales as network inputs: TensorRT requires the scale of an INT8 Q/DQ to be a build-time constant (NvInfer.h,
IQuantizeLayer). Zero points are not refittable (onnx-tensorrt's Q/DQ import), so a bundle whose groups differ in
anything but Q/DQ scales keeps per-group plans. A refittable plan has one optimization profile (NvInfer.h), which
is what dqc builds anyway.

TensorRT is imported inside functions (runtime.tensorrt._import_trt); nothing here touches the GPU before the
first inference.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BundleError
from runtime.tensorrt import BuildError, TrtEngine, _import_trt, _logger

ENGINE_MODES = ("auto", "refit", "per-group")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def refit_problems(model, names: list[str]) -> list[str]:
    """Why the initializers `names` of `model` cannot be refitted in a TensorRT plan: each must be read only as
    the scale (input 1) of QuantizeLinear / DequantizeLinear nodes. [] when they all can."""
    reads: dict[str, list[tuple[str, str, int]]] = {}
    for n in model.graph.node:
        for slot, x in enumerate(n.input):
            reads.setdefault(x, []).append((n.name or n.op_type, n.op_type, slot))
    problems = []
    for name in names:
        for node, op, slot in reads.get(name, []):
            if op not in _QDQ or slot != 1:
                what = "the zero point" if op in _QDQ and slot == 2 else f"input {slot}"
                problems.append(f"{name!r} differs between groups and feeds {what} of {op} {node!r}: only Q/DQ "
                                "scales can be refitted in a TensorRT engine")  # fmt: skip
    return problems


def refit_tables(bundle, groups: list[int]) -> tuple[object, dict[str, np.ndarray]]:
    """(group `groups[0]`'s graph, {scale name: values [G, ...] in the order of `groups`}) of the Q/DQ scales
    that differ between `groups`; raises BuildError when anything else differs."""
    from runtime.single_engine import varying_initializers

    try:
        base, differ, values = varying_initializers(bundle, groups)
    except BundleError as e:
        raise BuildError(f"{e}; build per-group TensorRT plans (dqc build --trt-engines per-group)") from e
    used = {i for n in base.graph.node for i in n.input}
    differ = [n for n in differ if n in used]
    problems = refit_problems(base, differ)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BuildError(f"{bundle.root}: groups {groups} cannot share one TensorRT engine: "
                         + "; ".join(problems[:3]) + f"{more}; build per-group plans with "
                         "`dqc build BUNDLE --trt-engines per-group`")  # fmt: skip
    return base, {name: np.stack([v[name][0] for v in values]) for name in differ}


def precision_groups(bundle) -> list[list[int]]:
    """The bundle's groups by precision (Bundle.precision_groups): the sets one refitted engine can serve."""
    return bundle.precision_groups()


_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}


def trt_weights(trt, array: np.ndarray):
    """trt.Weights over `array`'s memory (float32, float16 or bfloat16, as the graph stores the scale). The caller
    keeps `array` alive until the refit has run: TensorRT reads the host memory then."""
    kind = _DTYPES.get(array.dtype.name)
    if kind is None:
        raise BuildError(f"a Q/DQ scale of dtype {array.dtype} cannot be refitted; expected one of {sorted(_DTYPES)}")
    return trt.Weights(getattr(trt.DataType, kind), array.ctypes.data, array.size)


class RefitEngine:
    """One TensorRT plan serving `groups`: a TrtEngine whose Q/DQ scales are rewritten (Refitter) to the group
    each call asks for. The plan was built from `groups[0]`'s graph, so that group needs no refit. A switch costs
    one refit_cuda_engine call; calls within a group cost what a per-group engine's do."""

    def __init__(self, engine: TrtEngine, tables: dict[str, np.ndarray], groups: list[int]) -> None:
        self.engine, self.groups, self.spec = engine, list(groups), engine.spec
        self.tables = {k: np.ascontiguousarray(v) for k, v in tables.items()}
        self.current = self.groups[0]  # the scales the plan was built with
        self.refits = 0  # group switches that wrote scales, for reports and tests
        self._refitter = None

    def _refitter_for(self, trt):
        if self._refitter is None:
            self.engine.activate()
            refitter = trt.Refitter(self.engine._engine, _logger(trt))
            refittable = set(refitter.get_all_weights())
            missing = sorted(set(self.tables) - refittable)
            if missing:
                raise BuildError(
                    f"{self.engine.plan}: the plan cannot refit {len(missing)} of the bundle's per-group scales "
                    f"(first: {missing[:3]}); it was not built for this bundle's groups: rebuild with "
                    "`dqc build BUNDLE --trt-engines refit`"
                )
            self._refitter = refitter
        return self._refitter

    def select(self, group: int) -> None:
        """Write `group`'s scales into the engine unless they are there already."""
        if group == self.current:
            return
        if group not in self.groups:
            raise BuildError(f"{self.engine.plan}: no group {group} (this engine serves {self.groups})")
        trt, _ = _import_trt()
        refitter = self._refitter_for(trt)
        row = self.groups.index(group)
        values = {name: np.ascontiguousarray(table[row]) for name, table in self.tables.items()}  # kept to the refit
        for name, value in values.items():
            if not refitter.set_named_weights(name, trt_weights(trt, value)):
                raise BuildError(f"{self.engine.plan}: TensorRT refused new values for scale {name!r}")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise BuildError(f"{self.engine.plan}: refitting group {group} leaves weights without values: "
                             f"{missing[:5]}; rebuild with `dqc build BUNDLE --trt-engines refit`")  # fmt: skip
        self.engine.scratch.stream().synchronize()  # no call may still run on the old scales
        if not refitter.refit_cuda_engine():
            raise BuildError(f"{self.engine.plan}: TensorRT failed to refit group {group}'s scales (its log says why)")
        self.current = group
        self.refits += 1

    def infer(self, group: int, sample, timestep, cond=None) -> np.ndarray:
        self.select(group)
        return self.engine.infer(sample, timestep, cond)

    def for_group(self, group: int) -> RefitGroupEngine:
        return RefitGroupEngine(self, group)


class RefitGroupEngine:
    """The Engine of one group of a RefitEngine: the same plan, that group's scales."""

    def __init__(self, refit: RefitEngine, group: int) -> None:
        self.refit, self.group, self.spec = refit, group, refit.spec

    @property
    def name(self) -> str:
        return f"{self.refit.engine.plan} (group {self.group})"

    def infer(self, sample, timestep, cond=None) -> np.ndarray:
        return self.refit.infer(self.group, sample, timestep, cond)
