"""`CalibrationResult`: the calibration stage's file (safetensors tensor tables + JSON metadata).

It carries G activation-scale sets and a timestep→group table indexed by training timestep t, so later
methods (groups, reconstruction, PTQD) extend it without changing its shape.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from calibration.config import CalibrationConfig
from calibration.profiles import get_profile
from calibration.qmodules import ActQuant, QuantLayer, QuantLayerModule, replace_layers, wrap_residuals
from calibration.quantizers import ActParams
from calibration.shortcut import apply_splits
from runtime.errors import CalibrationError

RESULT_FORMAT = "dqc-calibration"
RESULT_VERSION = 1


@dataclass
class CalibrationResult:
    config: CalibrationConfig
    model: dict  # identity: class, config, weight_sha256, source
    layers: list[QuantLayer]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer → (int8 weight, float32 scale per channel)
    activations: dict[str, list[ActParams]]  # point → one quantizer per group
    group_of_t: np.ndarray  # (T,) int64
    skipped: list[dict] = field(default_factory=list)  # {"node", "op", "reason"} of modules left in float
    stats: dict = field(default_factory=dict)  # timings and counts, for reports
    splits: dict[str, int] = field(default_factory=dict)  # shortcut conv → channels of its first half

    @property
    def num_groups(self) -> int:
        return int(self.group_of_t.max()) + 1

    def group_activations(self, group: int) -> dict[str, ActParams]:
        return {p: qs[group] for p, qs in self.activations.items()}

    def reference_model(self, fp_forward: torch.nn.Module, group: int = 0, float_linear_inputs: bool = False
                        ) -> torch.nn.Module:  # fmt: skip
        """The fake-quant PyTorch model of one group: the function its shipped graph computes.
        `float_linear_inputs`: the Linear layers read float inputs (TensorRT's weight-only INT4, exporter.int4)."""
        profile = get_profile(self.config.target)
        acts = self.group_activations(group)
        linears = {x.name for x in self.layers if x.op == "linear"} if float_linear_inputs else set()

        def build(name: str, layer: torch.nn.Module) -> torch.nn.Module:
            if name not in self.weights:
                return layer
            w_int, w_scale = self.weights[name]
            return QuantLayerModule(
                layer,
                w_int,
                w_scale,
                None if name in linears else acts[f"{name}:input"],
                acts.get(f"{name}:output"),
                profile.quantize_bias,
            )

        fp_forward = apply_splits(fp_forward, self.splits, prefix="unet.")
        model = replace_layers(fp_forward, lambda n, m: build(n.removeprefix("unet."), m))
        return wrap_residuals(model, lambda p: ActQuant(acts[p]) if p in acts else None, prefix="unet.").eval()

    def save(self, path: str | Path) -> None:
        """Write atomically: a temp file in the same directory, renamed at the end."""
        path = Path(path)
        tensors = {"group_of_t": torch.from_numpy(np.asarray(self.group_of_t, np.int64))}
        for name, (w_int, w_scale) in self.weights.items():
            tensors[f"weight/{name}/int"] = w_int.contiguous()
            tensors[f"weight/{name}/scale"] = w_scale.float().contiguous()
        acts = {p: [[q.scale, q.zero_point, q.qmin, q.qmax] for q in qs] for p, qs in self.activations.items()}
        meta = {
            "format": RESULT_FORMAT,
            "format_version": RESULT_VERSION,
            "config": json.loads(self.config.to_json()),
            "model": self.model,
            "layers": [[layer.name, layer.op] + ([layer.shares] if layer.shares else []) for layer in self.layers],
            "activations": acts,
            "skipped": self.skipped,
            "stats": self.stats,
            "splits": self.splits,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"dqc": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationResult:
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: calibration result not found; create it with 'dqc calibrate'")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("dqc", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{path}: not a readable calibration result ({e})") from e
        if (
            not isinstance(meta, dict)
            or meta.get("format") != RESULT_FORMAT
            or meta.get("format_version") != RESULT_VERSION
        ):
            raise CalibrationError(f"{path}: not a {RESULT_FORMAT} v{RESULT_VERSION} file; recalibrate")
        layers = [QuantLayer(*entry) for entry in meta["layers"]]  # [name, op] or [name, op, shared-with]
        weights = {
            layer.name: (tensors[f"weight/{layer.name}/int"], tensors[f"weight/{layer.name}/scale"])
            for layer in layers
            if f"weight/{layer.name}/int" in tensors
        }
        acts = {
            p: [ActParams(float(s), int(z), int(lo), int(hi)) for s, z, lo, hi in qs]
            for p, qs in meta["activations"].items()
        }
        return cls(
            CalibrationConfig(**meta["config"]),
            meta["model"],
            layers,
            weights,
            acts,
            tensors["group_of_t"].numpy(),
            meta["skipped"],
            meta["stats"],
            {str(k): int(v) for k, v in meta.get("splits", {}).items()},
        )
