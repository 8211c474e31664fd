"""torch → ONNX export of the full-precision model (TorchScript exporter, opset 17, dynamic batch)."""

from __future__ import annotations

import io
import warnings

import onnx
import torch

from calibration.model_io import LoadedModel
from runtime.errors import ExportError

OPSET = 17


def export_float(model: LoadedModel) -> onnx.ModelProto:
    """The float graph: inputs sample, timestep (int64), and the condition the spec names: class_labels
    (int64) or encoder_hidden_states (float, (B, L, D)); output eps (the prediction, whatever its type)."""
    c, h, w = model.spec.sample_shape
    forward = model.wrapper().cpu().eval()  # moves the model to the CPU: export traces there
    args = [torch.zeros(2, c, h, w), torch.tensor([1, 2], dtype=torch.int64)]
    names = model.spec.names
    if model.spec.condition == "class_labels":
        args.append(torch.tensor([0, 1], dtype=torch.int64))
    elif model.spec.condition == "encoder_hidden_states":
        args.append(torch.zeros(2, *model.spec.context_shape))
    dynamic = {n: {0: "batch"} for n in [*names, "eps"]}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                forward,
                tuple(args),
                buf,
                dynamo=False,
                opset_version=OPSET,
                input_names=names,
                output_names=["eps"],
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
    except Exception as e:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for {model.source}: {e}") from e
    return onnx.load_from_string(buf.getvalue())
