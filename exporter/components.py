"""The rest of a text-to-image pipeline in the bundle: the text encoder and the VAE decoder as float ONNX
graphs, and the tokenizer's files, so the runtime goes from prompt to image without torch.

- `text_encoder.onnx`: input_ids (B, L) int64 → last_hidden_state (B, L, D), the UNet's encoder_hidden_states;
  float, or W8A8 (`quantize_text_encoder`, `dqc compile --text-encoder w8a8`).
- `vae_decoder.onnx`: latents (B, C, h, w), as the sampler ends them → images (B, 3, H, W) in [−1, 1]
  nominal; the VAE's scaling (and shift) factor is applied inside the graph: D(z / s + shift).
- `tokenizer/`: the pipeline's tokenizer folder, copied file by file.
"""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import onnx
import torch

from exporter.onnx_export import OPSET
from runtime.errors import ExportError

TEXT_ENCODER, VAE_DECODER, TOKENIZER = "text_encoder.onnx", "vae_decoder.onnx", "tokenizer"


class _TextForward(torch.nn.Module):
    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids=input_ids).last_hidden_state


class DecodeForward(torch.nn.Module):
    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents):
        return self.vae.decode(latents / self.scale + self.shift).sample


def _export(module: torch.nn.Module, example: torch.Tensor, inputs: str, output: str, what: str) -> onnx.ModelProto:
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.cpu().eval(), (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=[inputs], output_names=[output], do_constant_folding=True,
                              dynamic_axes={inputs: {0: "batch"}, output: {0: "batch"}})  # fmt: skip
    except Exception as e:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for the {what}: {e}") from e
    return onnx.load_from_string(buf.getvalue())


def export_text_encoder(prompts) -> onnx.ModelProto:
    """The text encoder of a PromptEncoder (calibration.families.text) as a float graph."""
    length, _ = prompts.context_shape
    example = torch.from_numpy(prompts.token_ids(["a", ""]))
    assert example.shape == (2, length)
    return _export(_TextForward(prompts.encoder), example, "input_ids", "last_hidden_state", "text encoder")


TEXT_PRECISIONS = ("fp32", "w8a8")


def quantize_text_encoder(graph: onnx.ModelProto, token_ids) -> tuple[onnx.ModelProto, int]:
    """The text encoder W8A8 (ONNX Runtime's integer MatMul): every MatMul with a constant 2-D weight (CLIP's
    Linear layers on (B, L, D) inputs) gets int8 weights, symmetric per output channel (max |w| / 127, the
    naive range), and a uint8 Q/DQ on its input with the min-max range the float graph shows on
    `token_ids` (the calibration prompts and the empty prompt); one Q/DQ per tensor (q/k/v read one).
    Embeddings, LayerNorm, GELU and the attention products stay float. Returns (graph, quantized layers)."""
    import numpy as np
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from calibration.quantizers import activation_params, minmax_weight_scale, quantize_weight
    from exporter.large_model import ort_session
    from exporter.qdq import _dq_const, _qdq
    from runtime.engine import session_options

    g = gs.import_onnx(graph)
    linears = [n for n in g.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)
               and n.inputs[1].values.ndim == 2]  # fmt: skip
    if not linears:
        raise ExportError("text encoder: no MatMul with a constant weight to quantize")
    inputs = list(dict.fromkeys(n.inputs[0].name for n in linears))
    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    probe.graph.output.extend(onnx.ValueInfoProto(name=x) for x in inputs)
    opts = session_options(ort, optimize=False)  # keep every tensor as named
    session = ort_session(probe, opts)
    values = dict(zip(inputs, session.run(inputs, {"input_ids": np.asarray(token_ids, np.int64)}), strict=True))
    dq_of = {}
    for x in inputs:
        v = values[x]
        params = activation_params(float(v.min()), float(v.max()), signed=False, bits=8)
        tensor = next(n.inputs[0] for n in linears if n.inputs[0].name == x)
        new, dq_of[x] = _qdq(tensor, params, f"text_encoder/{x.strip('/')}/input")
        g.nodes.extend(new)
    for i, node in enumerate(linears):
        w = torch.from_numpy(np.asarray(node.inputs[1].values, np.float32))  # (in, out): channels on axis 1
        scale = minmax_weight_scale(w, 8, axis=1)
        w_int = quantize_weight(w, scale, 8, axis=1).numpy()
        dq, w_deq = _dq_const(f"text_encoder/linear_{i}/weight", w_int, scale.numpy(), axis=1)
        g.nodes.append(dq)
        node.inputs[0], node.inputs[1] = dq_of[node.inputs[0].name], w_deq
    g.cleanup().toposort()
    out = gs.export_onnx(g)
    out.opset_import[0].version = graph.opset_import[0].version
    out.ir_version = graph.ir_version
    onnx.checker.check_model(out)
    return out, len(linears)


def export_vae_decoder(vae, latent_shape: tuple[int, int, int]) -> onnx.ModelProto:
    """The VAE's decoder, scaling included, as a float graph."""
    return _export(DecodeForward(vae), torch.zeros(1, *latent_shape), "latents", "images", "VAE decoder")


def write_components(model, folder: Path, text_encoder: str = "fp32") -> dict:
    """Write a loaded model's pipeline components into a staged bundle `folder`; returns the manifest's
    `components` entry ({} for a bare denoiser). `text_encoder`: fp32, or w8a8 (quantize_text_encoder,
    calibrated on the model's calibration prompts)."""
    if text_encoder not in TEXT_PRECISIONS:
        raise ExportError(f"text encoder precision {text_encoder!r}: use one of {', '.join(TEXT_PRECISIONS)}")
    if text_encoder != "fp32" and model.text is None:
        raise ExportError(f"--text-encoder {text_encoder}: {model.source} has no text encoder")
    out = {}
    if model.text is not None:
        graph = export_text_encoder(model.text)
        entry = {"file": TEXT_ENCODER, "class": type(model.text.encoder).__name__, "precision": "float32"}
        if text_encoder == "w8a8":
            graph, layers = quantize_text_encoder(graph, model.text.token_ids([*model.text.prompts, ""]))
            entry |= {"precision": "w8a8", "quantized_layers": layers}
        onnx.save(graph, str(folder / TEXT_ENCODER))
        shutil.copytree(model.text.tokenizer_dir, folder / TOKENIZER)
        length, width = model.text.context_shape
        out["text_encoder"] = entry | {"context_shape": [length, width]}
        out["tokenizer"] = {"folder": TOKENIZER, "class": type(model.text.tokenizer).__name__, "max_length": length}
        out["calibration_prompts"] = list(model.text.prompts)
    if model.vae is not None:
        c, h, w = model.spec.sample_shape
        onnx.save(export_vae_decoder(model.vae, (c, h, w)), str(folder / VAE_DECODER))
        with torch.no_grad():
            image = list(DecodeForward(model.vae)(torch.zeros(1, c, h, w)).shape[1:])
        scale = float(model.vae.config.scaling_factor)
        out["vae_decoder"] = {"file": VAE_DECODER, "class": type(model.vae).__name__, "precision": "float32",
                              "scaling_factor": scale, "image_shape": image}  # fmt: skip
    return out
