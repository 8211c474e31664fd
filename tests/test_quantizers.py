import numpy as np
import pytest
import torch

from calibration.quantizers import (
    RangeObserver,
    activation_params,
    fake_quant,
    quantize_bias,
    quantize_weight,
    search_weight_scale,
)


def _ref_fake_quant(x, s, z, qmin, qmax):
    """float64 reference with numpy's round-half-to-even (as ONNX QuantizeLinear)."""
    return (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s


def test_fake_quant_matches_float64_reference():
    x = np.random.default_rng(0).normal(0, 3, 10_000)
    x[:4] = [0.5 * 0.1, 1.5 * 0.1, 2.5 * 0.1, -0.5 * 0.1]  # ties: half to even
    got = fake_quant(torch.tensor(x), torch.tensor(0.1, dtype=torch.float64), torch.tensor(3.0), 0, 255).numpy()
    np.testing.assert_allclose(got, _ref_fake_quant(x, 0.1, 3, 0, 255), atol=1e-12)


def test_weight_range_search_beats_plain_minmax_and_stays_on_grid():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64) * torch.linspace(0.1, 2, 16).view(-1, 1, 1, 1)
    w[0, 0, 0, 0] = 25.0  # an outlier the search should clip
    scale = search_weight_scale(w, bits=8, p=2.4)
    q = quantize_weight(w, scale, bits=8)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    minmax = w.abs().amax(dim=(1, 2, 3)) / 127
    err = lambda s: ((q.double() * s.double().view(-1, 1, 1, 1) - w).abs() ** 2.4).sum()  # noqa: E731
    q_mm = quantize_weight(w, minmax.float(), bits=8)
    err_mm = ((q_mm.double() * minmax.view(-1, 1, 1, 1) - w).abs() ** 2.4).sum()
    assert err(scale) <= err_mm
    assert scale[0] < minmax[0]  # the outlier channel was shrunk


def test_activation_params_asymmetric_and_symmetric():
    p = activation_params(-1.0, 3.0, signed=False)
    assert (p.qmin, p.qmax) == (0, 255)
    x = torch.linspace(-1, 3, 1001, dtype=torch.float64)
    assert (p.apply(x) - x).abs().max() <= p.scale / 2 + 1e-9
    assert p.apply(torch.zeros(1, dtype=torch.float64)).item() == 0.0  # zero is exact
    s = activation_params(-2.0, 1.0, signed=True)
    assert s.zero_point == 0 and abs(s.scale - 2.0 / 127) < 1e-7
    assert activation_params(0.0, 0.0, signed=False).scale > 0  # constant tensors do not divide by zero


def test_bias_on_accumulator_grid():
    b = torch.randn(8)
    q, scale = quantize_bias(b, 0.02, torch.full((8,), 0.01))
    assert q.dtype == torch.int32
    assert (q.float() * scale - b).abs().max() <= scale.max() / 2 + 1e-7


def test_percentile_observer_ignores_outliers():
    obs = RangeObserver()
    obs.observe(torch.cat([torch.randn(100_000), torch.tensor([1e4])]))
    lo, hi = obs.range("percentile", 99.9)
    assert hi < 10 and obs.range("minmax", 100)[1] == 1e4


def test_observer_keeps_its_subsample_not_the_activation():
    obs = RangeObserver(keep=1024)
    for _ in range(4):
        obs.observe(torch.randn(1 << 22))  # 16 MiB each
    held = sum(s.untyped_storage().nbytes() for s in obs._samples)
    assert held <= 4 * 2048 * 4, f"the observer holds {held} bytes for 4 x 1024 samples"


def test_lsq_forward_is_fake_quant_and_gradients_follow_lsq():
    from calibration.quantizers import LsqQuantizer, fake_quant

    torch.manual_seed(0)
    x = (torch.randn(4096, dtype=torch.float64) * 2).requires_grad_(True)
    q = LsqQuantizer(torch.tensor(0.05), 0, 15, zero_point=7).double()
    y = q(x)
    s = q.scale.detach()  # 0.05 as stored (float32-rounded, then float64)
    ref = fake_quant(x.detach(), s, torch.tensor(7.0, dtype=torch.float64), 0, 15)
    assert torch.equal(y.detach(), ref)
    w = torch.randn_like(x)
    (y * w).sum().backward()
    # float64 reference of LSQ eq. 3 with the eq. 4 gradient scale
    v = torch.round(x.detach() / s) + 7  # the clip acts on the rounded value
    inside = (v >= 0) & (v <= 15)
    ds = torch.where(inside, torch.round(x.detach() / s) - x.detach() / s, torch.where(v < 0, -7.0, 8.0).double())
    g = 1 / (4096 * 15) ** 0.5
    assert q.scale.grad.item() == pytest.approx((w * ds).sum().item() * g, rel=1e-9)
    assert torch.allclose(x.grad, torch.where(inside, w, torch.zeros_like(w)), rtol=1e-12, atol=0)  # STE


def test_lsq_recovers_from_a_too_small_step():
    """Started at a quarter of the min-max step (heavy clipping), LSQ learns its way back to within 10 % of
    the least-squares step found by grid search."""
    from calibration.quantizers import LsqQuantizer, search_weight_scale, symmetric_range

    torch.manual_seed(1)
    w = torch.randn(8, 64) * torch.linspace(0.1, 2, 8)[:, None]
    qmin, qmax = symmetric_range(4)
    best = search_weight_scale(w, 4, p=2.0)
    best_err = (fake_quant(w, best[:, None], torch.zeros(()), qmin, qmax) - w).pow(2).mean().item()
    q = LsqQuantizer(w.abs().amax(1) / qmax / 4, qmin, qmax, axis=0)
    before = (q(w) - w).pow(2).mean().item()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        (q(w) - w).pow(2).mean().backward()
        opt.step()
    after = (q(w) - w).pow(2).mean().item()
    assert before > 3 * best_err and after < 1.1 * best_err


def test_adaround_reduces_layer_output_error_versus_nearest(tiny_model):
    """On a conv of the tiny model with inputs recorded from a forward pass, AdaRound's hardened 3-bit
    weights reconstruct the layer output better than round-to-nearest on the same scale."""
    import torch.nn.functional as F

    from calibration.adaround import adaround_layer

    unet = tiny_model.unet
    conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    seen = []
    h = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        unet(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 1000, (64,), generator=g),
             class_labels=torch.randint(0, 10, (64,), generator=g))  # fmt: skip
    h.remove()
    x = seen[0]
    bits = 3
    scale = search_weight_scale(conv.weight, bits, p=2.0)
    w_rtn = quantize_weight(conv.weight, scale, bits)
    w_ada = adaround_layer(conv, x, scale, bits, iters=300, seed=0)
    assert w_ada.dtype == torch.int8 and int(w_ada.abs().max()) <= 3
    assert ((w_ada.float() - w_rtn.float()).abs() <= 1).all()  # only the rounding direction changes

    def err(w_int):
        w = w_int.float() * scale.view(-1, 1, 1, 1)
        with torch.no_grad():
            y = F.conv2d(x, w, conv.bias, conv.stride, conv.padding)
            return (y - conv(x)).pow(2).mean().item()

    print("adaround vs nearest", err(w_ada), err(w_rtn))
    assert err(w_ada) < 0.9 * err(w_rtn)


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_quantizer_per_channel_on_every_layout_matches_float64(bits):
    """Conv (O, I, kh, kw) axis 0, ConvTranspose (I, O, kh, kw) axis 1, Linear (O, I) axis 0: min-max
    scale, integer weights on the restricted b-bit grid, against a float64 numpy reference."""
    from calibration.quantizers import minmax_weight_scale

    rng = np.random.default_rng(bits)
    q = 2 ** (bits - 1) - 1
    for shape, axis in (((6, 4, 3, 3), 0), ((4, 6, 2, 2), 1), ((6, 5), 0)):
        w = rng.normal(0, 1, shape) * rng.uniform(0.1, 3, shape[axis]).reshape(
            [-1 if d == axis else 1 for d in range(len(shape))]
        )
        scale = minmax_weight_scale(torch.tensor(w), bits, axis=axis)
        other = tuple(d for d in range(w.ndim) if d != axis)
        np.testing.assert_allclose(scale.numpy(), np.abs(w).max(axis=other) / q, rtol=1e-6)
        got = quantize_weight(torch.tensor(w), scale, bits, axis=axis).numpy()
        s = scale.double().numpy().reshape([-1 if d == axis else 1 for d in range(w.ndim)])
        np.testing.assert_array_equal(got, np.clip(np.round(w / s), -q, q))
        assert got.dtype == np.int8 and np.abs(got).max(axis=other).min() == q


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_activation_quantizer_at_every_bit_width_matches_float64(bits, signed):
    x = np.random.default_rng(bits).normal(0.3, 2.0, 5000)
    p = activation_params(-1.7, 2.9, signed, bits)
    # signed: the restricted symmetric grid, but at 8 bits the whole int8 range (TensorRT's Q clamps to it)
    lo = -128 if bits == 8 else -(2 ** (bits - 1) - 1)
    assert (p.qmin, p.qmax) == ((lo, 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1))
    got = p.apply(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, _ref_fake_quant(x, p.scale, p.zero_point, p.qmin, p.qmax), atol=1e-12)
    assert len(np.unique(got)) <= 2**bits
