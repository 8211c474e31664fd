"""Which layers are quantized, where their quantization points sit, and the fake-quant reference model."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calibration.profiles import TargetProfile
from calibration.quantizers import ActParams, quantize_bias
from runtime.errors import CalibrationError


@dataclass(frozen=True)
class QuantLayer:
    name: str  # module path in the UNet, e.g. "down_blocks.0.resnets.0.conv1"
    op: str  # "conv" or "linear"
    shares: str | None = None  # an earlier layer reading the same input tensor: its input quantizer is this one's

    @property
    def input_point(self) -> str:
        """The point whose quantizer this layer's input uses: its own, or that of the layer it shares it with."""
        return f"{self.shares or self.name}:input"

    def points(self, profile: TargetProfile) -> list[str]:
        """Activation quantization points of this layer under the profile: "<name>:input" / ":output"."""
        out = profile.conv_output if self.op == "conv" else profile.linear_output
        return [f"{self.name}:input"] + ([f"{self.name}:output"] if out else [])


RESIDUAL = ":residual"


def _has_residual(module: nn.Module) -> bool:
    """A diffusers ResnetBlock2D whose skip-Add residual is its conv_shortcut's output or, with no shortcut
    and no resampling, the block's own input (a resampled identity residual is not a separate tensor); or a
    Transformer2DModel whose output is a 1×1 conv (proj_out) plus the block's input (continuous input, no
    linear projection; asked of its config, as proj_out may already be a quantized wrapper)."""
    kind = type(module).__name__
    if kind == "Transformer2DModel":
        return bool(getattr(module, "is_input_continuous", False)) and not module.use_linear_projection
    if kind != "ResnetBlock2D":
        return False
    return module.conv_shortcut is not None or (module.upsample is None and module.downsample is None)


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def residual_points(unet: nn.Module, profile: TargetProfile) -> list[str]:
    """'<resnet>:residual' for every resnet skip Add whose residual input the profile quantizes (TensorRT
    fuses Conv + Add into one int8 kernel when the residual arrives quantized)."""
    if not profile.residual_input:
        return []
    return [f"{name}{RESIDUAL}" for name, m in unet.named_modules() if _has_residual(m)]


def observe_residual(unet: nn.Module, point: str, fn: Callable[[torch.Tensor], None]):
    """Hook that passes the residual tensor of `point` to fn; returns the hook handle."""
    block = unet.get_submodule(point.removesuffix(RESIDUAL))
    if getattr(block, "conv_shortcut", None) is not None:
        return block.conv_shortcut.register_forward_hook(lambda m, args, y: fn(y))
    return block.register_forward_pre_hook(lambda m, args, kwargs: fn(_input_of(args, kwargs)), with_kwargs=True)


ATTENTION = (":q", ":k", ":probs", ":v")  # the inputs of an attention's two activation×activation products
_SDPA_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")  # diffusers' default processors: softmax(q kᵀ/√d) v


def _attentions(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in unet.named_modules() if type(m).__name__ == "Attention"]


def attention_points(unet: nn.Module, enabled: bool) -> list[str]:
    """'<attention>:q', ':k', ':probs', ':v' for every diffusers Attention when the attention products are
    quantized (CalibrationConfig.attention_products): the scaled query and key of the score product
    q·kᵀ and the softmax output and value of the value product."""
    if not enabled:
        return []
    for name, m in _attentions(unet):
        kind = type(m.processor).__name__
        if kind not in _SDPA_PROCESSORS and not isinstance(m.processor, ProductsProcessor):
            raise CalibrationError(f"attention {name}: processor {kind}; quantized attention products need diffusers' "
                             f"default {' or '.join(_SDPA_PROCESSORS)}")  # fmt: skip
    return [f"{name}{s}" for name, _ in _attentions(unet) for s in ATTENTION]


class ProductsProcessor:
    """diffusers' AttnProcessor2_0 with scaled_dot_product_attention spelled out as the exported graph computes
    it (torch's ONNX decomposition): q' = q·√s and k' = k·√s with s = 1/√d, P = softmax(q'·k'ᵀ), out = P·v; and
    `fns[suffix]` (a fake quantizer, or an observer that returns its input) applied to q', k', P and v, the
    inputs of the two products. Masks are not supported (dqc's engines pass none)."""

    def __init__(self, fns: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.fns = fns

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):  # fmt: skip
        if attention_mask is not None:
            raise CalibrationError("quantized attention products: attention masks are not supported")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        root = head_dim**-0.25  # √s, s = 1/√d: scaled_dot_product_attention's default scale
        q, k = self.fns[":q"](query * root), self.fns[":k"](key * root)
        probs = self.fns[":probs"]((q @ k.transpose(-2, -1)).softmax(dim=-1))
        hidden_states = probs @ self.fns[":v"](value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class _Observing:
    """Handle of observe_attention: removing it drops its function; the last one puts the module's own
    processor back."""

    def __init__(self, module: nn.Module, suffix: str) -> None:
        self.module, self.suffix = module, suffix

    def remove(self) -> None:
        proc = self.module.processor
        proc.fns[self.suffix] = _identity
        if all(f is _identity for f in proc.fns.values()):
            self.module.set_processor(proc.restore)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def observe_attention(unet: nn.Module, point: str, fn: Callable[[torch.Tensor], None]) -> _Observing:
    """Passes the tensor of attention point `point` to fn on every call; returns a handle with remove()."""
    name, _, suffix = point.rpartition(":")
    module = unet.get_submodule(name)
    if not isinstance(module.processor, ProductsProcessor):
        observing = ProductsProcessor(dict.fromkeys(ATTENTION, _identity))
        observing.restore = module.processor  # put back when the last observer is removed
        module.set_processor(observing)

    def observe(x: torch.Tensor) -> torch.Tensor:
        fn(x)
        return x

    module.processor.fns[f":{suffix}"] = observe
    return _Observing(module, f":{suffix}")


def extra_points(unet: nn.Module, profile: TargetProfile, attention: bool) -> list[str]:
    """The quantization points beside the layers' own: residual inputs (profile) and attention products."""
    return residual_points(unet, profile) + attention_points(unet, attention)


def observe_point(unet: nn.Module, point: str, fn: Callable[[torch.Tensor], None]):
    """observe_residual or observe_attention, by the point's kind."""
    return observe_residual(unet, point, fn) if point.endswith(RESIDUAL) else observe_attention(unet, point, fn)


class ActQuant(nn.Module):
    """A fixed per-tensor activation quantizer as a module; `enabled` False passes values through."""

    def __init__(self, params: ActParams) -> None:
        super().__init__()
        self.params, self.enabled = params, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.params.apply(x) if self.enabled else x


class ResidualQuant(nn.Module):
    """A resnet's shortcut (a conv, or none: the identity) followed by its residual quantizer."""

    def __init__(self, shortcut: nn.Module | None, quantizer: nn.Module) -> None:
        super().__init__()
        self.shortcut, self.quantizer = shortcut, quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x if self.shortcut is None else self.shortcut(x))


def _quantized_residual(module: nn.Module, args: tuple, kwargs: dict, out):
    """Forward hook of a Transformer2DModel whose residual is quantized: its output proj_out(h) + x becomes
    proj_out(h) + Q(x), as the graph's Add reads x through a Q/DQ pair (computed as y − x + Q(x))."""
    x = _input_of(args, kwargs)
    first = out[0] if isinstance(out, tuple) else out.sample
    y = first - x + module.residual_quant(x)
    return (y, *out[1:]) if isinstance(out, tuple) else type(out)(sample=y)


def wrap_residuals(model: nn.Module, quantizer_for: Callable[[str], nn.Module | None], prefix: str = "") -> nn.Module:
    """In place: every block under `prefix` (e.g. "unet.") with a residual point gets `quantizer_for(point)` on
    its residual: after a resnet's shortcut (diffusers' ResnetBlock2D calls conv_shortcut on the residual
    whenever it is set), on a transformer block's input where its output adds it back; every Attention whose
    four product points have quantizers computes its products through them (ProductsProcessor)."""
    for name, module in list(model.named_modules()):
        if name.startswith(prefix) and type(module).__name__ == "Attention" and not hasattr(module, "products_quant"):
            fns = {s: quantizer_for(f"{name.removeprefix(prefix)}{s}") for s in ATTENTION}
            if all(f is not None for f in fns.values()):
                module.products_quant = nn.ModuleDict({s.lstrip(":"): f for s, f in fns.items()})
                module.set_processor(ProductsProcessor(fns))
        if not name.startswith(prefix) or not _has_residual(module):
            continue
        is_resnet = type(module).__name__ == "ResnetBlock2D"
        if isinstance(module.conv_shortcut if is_resnet else getattr(module, "residual_quant", None), nn.Module):
            continue  # wrapped already
        quantizer = quantizer_for(f"{name.removeprefix(prefix)}{RESIDUAL}")
        if quantizer is None:
            continue
        if is_resnet:
            module.conv_shortcut = ResidualQuant(module.conv_shortcut, quantizer)
        else:
            module.residual_quant = quantizer
            module.register_forward_hook(_quantized_residual, with_kwargs=True)
    return model


def quantizable_layers(unet: nn.Module) -> list[QuantLayer]:
    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d):
            layers.append(QuantLayer(name, "conv"))
        elif isinstance(module, nn.Linear):
            layers.append(QuantLayer(name, "linear"))
    return layers


def run_with_pre_hooks(forward: nn.Module, names: list[str], fn: Callable[[str, tuple], object], example: tuple):
    """One inference call of `forward` on `example` with `fn(name, args)` called before each named submodule."""
    handles = [forward.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: fn(n, args)) for n in names]
    try:
        with torch.inference_mode():
            forward(*example)
    finally:
        for h in handles:
            h.remove()


def tie_shared_inputs(forward: nn.Module, layers: list[QuantLayer], example: tuple) -> list[QuantLayer]:
    """`layers` with `shares` set where a layer reads the same values as an earlier one on `example` (one call
    of `forward`, the family wrapper): the q/k/v projections of self-attention (one normalised tensor), the
    K/V projections of every cross-attention (the text embedding), each resnet's time projection (SiLU of
    the one time embedding). Such layers get one input quantizer, so the graph can carry one Q/DQ for the
    tensor: TensorRT fuses q/k/v only when they share it, and ONNX Runtime quantizes the tensor once."""
    seen: dict[str, torch.Tensor] = {}
    names = [f"unet.{layer.name}" for layer in layers]
    run_with_pre_hooks(forward, names, lambda n, args: seen.setdefault(n.removeprefix("unet."), args[0].detach()),
                       example)  # fmt: skip
    out, firsts = [], []  # firsts: (layer, its input) of the layers that share nobody's input
    for layer in layers:
        x = seen.get(layer.name)
        owner = None
        if x is not None:
            owner = next((f for f, y in firsts if f.op == layer.op and y.shape == x.shape and torch.equal(y, x)), None)
        if owner is None:
            out.append(QuantLayer(layer.name, layer.op))
            if x is not None:
                firsts.append((layer, x))
        else:
            out.append(QuantLayer(layer.name, layer.op, owner.name))
    return out


def float_modules(unet: nn.Module) -> list[dict]:
    """Modules with weights that the quantizer does not know (neither Conv2d nor Linear, nor a
    normalisation's per-channel affine): they run in float; reported so the manifest lists them."""
    known = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    out = []
    for name, module in unet.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(module, known) or not isinstance(w, torch.Tensor) or w.ndim < 2:
            continue
        kind = type(module).__name__
        reason = (
            "embedding lookup (class labels): no arithmetic to quantize, kept float"
            if isinstance(module, nn.Embedding)
            else f"layer type {kind} is not supported by the quantizer (Conv2d, Linear): kept float"
        )
        out.append({"node": name, "op": kind, "reason": reason})
    return out


class QuantLayerModule(nn.Module):
    """A Conv2d or Linear computing exactly what its Q/DQ-annotated graph node computes."""

    def __init__(
        self,
        layer: nn.Module,
        w_int: torch.Tensor,
        w_scale: torch.Tensor,
        act_in: ActParams | None,  # None: the input stays float (weight-only)
        act_out: ActParams | None,
        quantize_bias_int32: bool,
    ) -> None:
        super().__init__()
        self.layer, self.act_in, self.act_out = layer, act_in, act_out
        shape = [-1] + [1] * (w_int.ndim - 1)
        self.register_buffer("weight", w_int.float() * w_scale.float().reshape(shape))
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("bias_int32", None)
        if bias is not None and quantize_bias_int32 and act_in is not None:
            b_int, b_scale = quantize_bias(bias, act_in.scale, w_scale)
            self.bias_int32 = b_int.float() * b_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.act_in is None else self.act_in.apply(x)
        # the exported graph carries an int32 bias where the node has a bias input: Conv, and Linear on
        # 2-D inputs (Gemm); Linear on 3-D inputs becomes MatMul + a float Add
        int_bias = self.bias_int32 is not None and (isinstance(self.layer, nn.Conv2d) or x.ndim == 2)
        bias = self.bias_int32 if int_bias else self.bias
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            y = F.conv2d(x, self.weight, bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            y = F.linear(x, self.weight, bias)
        return y if self.act_out is None else self.act_out.apply(y)


def replace_layers(model: nn.Module, build) -> nn.Module:
    """A deep copy of `model` where each quantizable layer `name` is replaced by `build(name, layer)`."""
    model = copy.deepcopy(model)
    for layer in quantizable_layers(model):
        parent_name, _, child = layer.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(layer.name, getattr(parent, child)))
    return model
