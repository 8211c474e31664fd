"""Models past protobuf's 2 GiB limit (a Stable-Diffusion-sized UNet holds 3.4 GB of float32 weights): such a
model lives in memory as usual but is never serialized whole. Passes that need the graph only (version
conversion, shape inference) see it with its weights stripped; ONNX Runtime loads it from a temporary folder
with its weights as external data. Small models take the plain in-memory path. No torch here."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import TensorProto

PROTOBUF_LIMIT = 2**31 - 2**28  # bytes of initializers a model may hold and still be serialized whole (margin 256 MiB)
_STRIP_MIN = 1024  # initializers at least this large are stripped / stored outside the graph file
_WEIGHTS_FILE = "weights.data"


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """Whether the model can be serialized as one protobuf (checked, inferred, handed to ONNX Runtime as bytes)."""
    return initializer_bytes(model) < PROTOBUF_LIMIT


def strip_weights(model: onnx.ModelProto, location: str = _WEIGHTS_FILE, out=None) -> dict[str, bytes]:
    """In place: every initializer of ≥ 1 KiB with inline data becomes an external-data reference into
    `location` (offsets as if written in order; written to the file object `out` when given). Returns their
    bytes by name, for `restore_weights`."""
    stash, offset = {}, 0
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) < _STRIP_MIN:
            continue
        raw = t.raw_data
        stash[t.name] = raw
        if out is not None:
            out.write(raw)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        offset += len(raw)
    return stash


def restore_weights(model: onnx.ModelProto, stash: dict[str, bytes]) -> None:
    """In place: the stripped initializers of `model` (matched by name) get their bytes back."""
    for t in model.graph.initializer:
        raw = stash.get(t.name)
        if raw is not None and t.data_location == TensorProto.EXTERNAL:
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = raw


@contextmanager
def saved(model: onnx.ModelProto) -> Iterator[Path]:
    """The model as a file in a temporary folder, weights as external data: for ONNX Runtime or the checker
    when the model is too large to hand over as bytes. The in-memory model is left as it was."""
    with tempfile.TemporaryDirectory(prefix="dqc-onnx-") as tmp:
        yield _write_external(model, Path(tmp) / "model.onnx", _WEIGHTS_FILE)


def ort_session(model: onnx.ModelProto, opts, providers=("CPUExecutionProvider",)):
    """An ONNX Runtime session of an in-memory model of any size."""
    import onnxruntime as ort

    if fits_in_protobuf(model):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
    with saved(model) as path:  # ONNX Runtime reads the weights while it builds the session
        return ort.InferenceSession(str(path), opts, providers=list(providers))


def infer_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """onnx.shape_inference.infer_shapes of a model of any size (the result's large initializers are stripped
    when the model is past the limit: read its value_info, not its weights)."""
    if fits_in_protobuf(model):
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    stash = strip_weights(model)
    try:
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    finally:
        restore_weights(model, stash)


def convert_version(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter.convert_version of a model of any size: the converter sees the graph with its
    large initializers stripped, and the result gets them back by name."""
    from onnx import version_converter

    if fits_in_protobuf(model):
        return version_converter.convert_version(model, opset)
    stash = strip_weights(model)
    try:
        out = version_converter.convert_version(model, opset)
    finally:
        restore_weights(model, stash)
    restore_weights(out, stash)
    return out


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """onnx.save for a model of any size: past the limit its large initializers go to `<name>.data` beside
    the graph file (ONNX external data; keep the two together). The in-memory model is left as it was."""
    path = Path(path)
    if fits_in_protobuf(model):
        onnx.save(model, str(path))
        return path
    return _write_external(model, path, f"{path.name}.data")


def _write_external(model: onnx.ModelProto, path: Path, location: str) -> Path:
    """The graph to `path`, its large initializers to `location` beside it; the in-memory model unchanged."""
    with open(path.parent / location, "wb") as f:
        stash = strip_weights(model, location, f)
    try:
        onnx.save(model, str(path))
    finally:
        restore_weights(model, stash)
    return path
