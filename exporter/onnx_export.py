"""torch → ONNX export of the full-precision model (TorchScript exporter, opset 17, dynamic batch), through a
temporary file so that models past protobuf's 2 GiB limit export too (exporter.large_model)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto

from calibration.model_io import LoadedModel
from exporter.simplify import inline_shape_ifs
from runtime.errors import ExportError

OPSET = 17


def export_float(model: LoadedModel) -> onnx.ModelProto:
    """The float graph: inputs sample, timestep (int64; float32 for a flow model), and the condition the spec
    names: class_labels (int64) or encoder_hidden_states (float, (B, L, D)); output eps (the prediction, whatever
    its type). Exported through a temporary file, so models past 2 GiB come back whole (torch writes their weights as
    external data; they are loaded into memory)."""
    c, h, w = model.spec.sample_shape
    forward = model.wrapper().cpu().eval()  # moves the model to the CPU: export traces there
    flow = model.spec.timestep_type == "float32"
    args = [torch.zeros(2, c, h, w), torch.tensor([1.5, 2.5]) if flow else torch.tensor([1, 2], dtype=torch.int64)]
    names = model.spec.names
    if model.spec.condition == "class_labels":
        args.append(torch.tensor([0, 1], dtype=torch.int64))
    elif model.spec.condition == "encoder_hidden_states":
        args.append(torch.zeros(2, *model.spec.context_shape))
    dynamic = {n: {0: "batch"} for n in [*names, "eps"]}
    with tempfile.TemporaryDirectory(prefix="dqc-export-") as tmp:
        path = Path(tmp) / "float.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    forward,
                    tuple(args),
                    str(path),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=names,
                    output_names=["eps"],
                    dynamic_axes=dynamic,
                    do_constant_folding=True,
                )
        except Exception as e:  # the exporter raises many unrelated types
            raise ExportError(f"torch.onnx.export failed for {model.source}: {e}") from e
        graph = onnx.load(str(path))  # external data, if torch wrote any, loaded from tmp
    for t in graph.graph.initializer:  # nothing may point into the deleted folder
        if t.data_location == TensorProto.EXTERNAL:
            raise ExportError(f"torch.onnx.export: initializer {t.name} was not loaded from its external data")
    return inline_shape_ifs(graph)
