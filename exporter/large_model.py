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
from google.protobuf.message import Message
from onnx import TensorProto

PROTOBUF_LIMIT = 2**31 - 2**28  # bytes of initializers a model may hold and still be serialized whole (margin 256 MiB)
_STRIP_MIN = 1024  # initializers at least this large are stripped / stored outside the graph file
_WEIGHTS_FILE = "weights.data"


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """Whether the model can be serialized as one protobuf (checked, inferred, handed to ONNX Runtime as bytes)."""
    return initializer_bytes(model) < PROTOBUF_LIMIT


def weightless(model: onnx.ModelProto, location: str = _WEIGHTS_FILE, out=None) -> onnx.ModelProto:
    """A new model equal to `model` but for its initializers of ≥ 1 KiB with inline data, which become
    external-data references into `location` (offsets as if written in order; written to the file object `out`
    when given). `model` is not touched: with protobuf's upb backend a cleared and re-set `raw_data` stays in
    the message's arena, so stripping a model in place and restoring it grew the process by the model's size on
    every pass (3 GB per save or shape inference of a DiT-XL/2-sized graph)."""
    skeleton = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(skeleton, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(skeleton.graph, field, value)
    offset = 0
    for t in model.graph.initializer:
        raw = b"" if t.data_location == TensorProto.EXTERNAL or t.ByteSize() < _STRIP_MIN else t.raw_data  # a copy
        if len(raw) < _STRIP_MIN:
            skeleton.graph.initializer.add().CopyFrom(t)
            continue
        if out is not None:
            out.write(raw)
        stub = skeleton.graph.initializer.add()
        stub.name, stub.data_type, stub.data_location = t.name, t.data_type, TensorProto.EXTERNAL
        stub.dims.extend(t.dims)
        if t.doc_string:
            stub.doc_string = t.doc_string
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        offset += len(raw)
    return skeleton


def _copy_field(target, field, value) -> None:
    if hasattr(value, "extend"):  # a repeated field (the descriptor's label attribute differs across protobufs)
        getattr(target, field.name).extend(value)
    elif isinstance(value, Message):
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def with_weights_of(target: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """In place: every external-data initializer of `target` that `source` holds inline gets its bytes (by
    name). `target` is a fresh model (not one stripped in place), so its arena holds each weight once."""
    inline = {t.name: t for t in source.graph.initializer if t.data_location != TensorProto.EXTERNAL}
    for t in target.graph.initializer:
        src = inline.get(t.name)
        if src is not None and t.data_location == TensorProto.EXTERNAL:
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = src.raw_data


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
    return onnx.shape_inference.infer_shapes(weightless(model), **kwargs)


def convert_version(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter.convert_version of a model of any size: the converter sees the graph with its
    large initializers stripped, and the result gets them back by name."""
    from onnx import version_converter

    if fits_in_protobuf(model):
        return version_converter.convert_version(model, opset)
    out = version_converter.convert_version(weightless(model), opset)
    with_weights_of(out, model)
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
        skeleton = weightless(model, location, f)
    onnx.save(skeleton, str(path))
    return path
