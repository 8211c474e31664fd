"""The peers a user would otherwise pick, each calibrated on exactly the inputs our calibration recorded (the same
full-precision trajectories):

- ONNX Runtime's own static quantizer on the exported float graph: `quant_pre_process` (symbolic shape inference
  with auto-merge of the dynamic batch, ORT's basic graph optimisations) then `quantize_static` in QDQ format,
  per-channel S8 weights, U8 activations, MinMax ranges;
- OpenVINO + NNCF: `nncf.quantize` with its defaults (the performance preset: symmetric INT8 activations and
  per-channel weights, fast bias correction) on the float graph read by OpenVINO, saved as OpenVINO IR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over recorded calibration inputs."""

    def __init__(self, data, batch: int) -> None:
        self.feeds = [self._feed(*b) for b in data.batches(batch)]
        self._next, self._end = 0, len(self.feeds)

    @staticmethod
    def _feed(x, t, c) -> dict:
        feeds = {"sample": x.numpy(), "timestep": t.numpy()}
        if c is not None:  # prompt embeddings (float) or class labels
            feeds["encoder_hidden_states" if c.is_floating_point() else "class_labels"] = c.numpy()
        return feeds

    def __len__(self) -> int:
        return len(self.feeds)

    def get_next(self) -> dict | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def set_range(self, start_index: int, end_index: int) -> None:  # ORT's strided calibration: batches [start, end)
        self._next, self._end = start_index, min(end_index, len(self.feeds))

    def rewind(self) -> None:
        self._next, self._end = 0, len(self.feeds)


def quantize_static_peer(fp32_path: str | Path, out_path: str | Path, data, *, batch: int = 2) -> Path:
    """ORT's QDQ static quantization of `fp32_path` with MinMax ranges over `data` (CalibrationData).

    The calibrator keeps every intermediate tensor of every batch it is given until it computes the ranges; on a
    DiT-XL/2-shaped model that is about 1 GB per input (64 inputs at once: killed at 23 GiB). It is given one batch
    of `batch` inputs at a time (ORT's CalibStridedMinMax) and merges the ranges (MinMax: the min of the minima,
    the max of the maxima, the ranges of one pass over all inputs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Feeds, CalibrationDataReader):
        pass

    out_path = Path(out_path)
    pre = out_path.with_name(f"{out_path.stem}.pre.onnx")
    large = Path(f"{fp32_path}.data").is_file()  # past protobuf's 2 GiB: its weights live beside it
    # the dynamic batch defeats plain symbolic shape inference ("Incomplete symbolic shape inference");
    # auto_merge unifies the batch symbols, as ORT's documentation suggests for such models
    quant_pre_process(str(fp32_path), str(pre), auto_merge=True, save_as_external_data=large,
                      all_tensors_to_one_file=True)  # fmt: skip
    quantize_static(
        str(pre),
        str(out_path),
        Reader(data, batch),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=large,
        extra_options={"CalibStridedMinMax": 1},
    )
    # The quantizer also quantizes constants no integer kernel reads (GroupNorm's InstanceNormalization scale,
    # one DQ read by every norm). With exact integer kernels (runtime.engine.session_options) ORT 1.31 then
    # fails to load the graph ("Attempt to replace the existing tensor" in QDQS8ToU8Transformer); their DQs
    # become the float constants they compute, and every Conv/Gemm/MatMul keeps its int8 weights.
    from exporter.large_model import fits_in_protobuf, save
    from runtime.openvino import dequantize_weights

    model = onnx.load(str(out_path))  # with its external data, if any
    if dequantize_weights(model, unless_read_by=("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")):
        save(model, out_path)  # whole where the int8 graph fits in one protobuf, else beside `<name>.data`
        if fits_in_protobuf(model):
            Path(f"{out_path}.data").unlink(missing_ok=True)
    if large:  # quant_pre_process wrote the pre graph's weights to a file of its own naming: remove it
        from runtime.bundle import external_data_locations

        for name in external_data_locations(pre):
            if name not in (f"{Path(fp32_path).name}.data", f"{out_path.name}.data"):
                (pre.parent / name).unlink(missing_ok=True)
    return out_path


def nncf_peer(fp32_path: str | Path, out_path: str | Path, data, *, batch: int = 2, progress: bool = True) -> Path:
    """NNCF's INT8 post-training quantization of `fp32_path` over `data` (CalibrationData), as OpenVINO IR
    (`out_path`: the .xml; its .bin beside it). Raises a one-line ConfigError when nncf is not installed."""
    from runtime.errors import ConfigError
    from runtime.openvino import core, import_openvino

    ov = import_openvino()
    try:
        import nncf
    except ImportError as e:
        raise ConfigError("the OpenVINO + NNCF peer needs nncf: pip install nncf") from e
    import contextlib
    import io

    feeds = _Feeds(data, batch).feeds
    model = core().read_model(str(fp32_path))
    with contextlib.redirect_stdout(io.StringIO()) if not progress else contextlib.nullcontext():  # NNCF's bars
        quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))
    out_path = Path(out_path)
    ov.save_model(quantized, str(out_path), compress_to_fp16=False)
    return out_path


def labels_for(spec, n: int) -> np.ndarray | None:
    return None if spec.num_class_embeds is None else np.arange(n, dtype=np.int64) % max(spec.num_class_embeds - 1, 1)
