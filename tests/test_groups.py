"""APQ-DM group search core: valid assignments, the entropy regulariser, nearest-timestep routing."""

from __future__ import annotations

import numpy as np
import torch

from calibration.groups import (
    GroupMixer,
    MixedQuantizer,
    _Search,
    assignment_from_sigma,
    contiguous_assignment,
    nearest_group_table,
    run_group_search,
    search_loop,
)


def test_contiguous_assignment_and_nearest_table():
    ts = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    init = contiguous_assignment(ts, 4)
    assert sorted(set(init)) == [0, 1, 2, 3]
    assert init[ts.index(1)] == 0 and init[ts.index(901)] == 3  # sorted ascending: low t → group 0
    table = nearest_group_table(dict(zip(ts, init, strict=True)), 1000)
    assert table.shape == (1000,) and table.dtype == np.int64
    for t in (0, 1, 50, 51, 950, 999, 455):
        nearest = min(ts, key=lambda s: (abs(s - t), s))
        assert table[t] == init[ts.index(nearest)], t


def test_sigma_argmax_gives_one_group_per_timestep():
    sigma = torch.softmax(torch.randn(7, 3, generator=torch.Generator().manual_seed(0)), -1)
    ts = list(range(10, 80, 10))
    a = assignment_from_sigma(sigma, ts)
    assert set(a) == set(ts) and all(0 <= g < 3 for g in a.values())
    assert all(a[t] == int(sigma[i].argmax()) for i, t in enumerate(ts))


def test_group_search_on_tiny_model_is_valid_and_entropy_falls(tiny_model):
    """Search G = 3 groups on the tiny model's calibration data: each calibrated t gets exactly the argmax
    group of its σ, the entropy of σ decreases under the λ-weighted regulariser, and every group has its
    own quantizers for every activation point."""
    from calibration.calibrate import calibrate
    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig
    from calibration.qmodules import quantizable_layers

    cfg = CalibrationConfig(bits="W6A6", steps=10, calib_samples=8, calib_timesteps=6, batch_size=16,
                            group_search="sigma")  # fmt: skip
    base = calibrate(tiny_model, cfg, progress=False)
    data = record_trajectories(tiny_model, cfg, progress=False)
    layers = quantizable_layers(tiny_model.unet)
    result, acts = run_group_search(tiny_model, layers, base.weights, data, cfg, groups=3, epochs=6, lr=5e-3)
    assert len(result.assignment) == 6
    assert all(result.assignment[t] == int(result.sigma[i].argmax()) for i, t in enumerate(result.timesteps))
    entropies = [h["entropy"] for h in result.history]
    print("entropy per epoch", np.round(entropies, 4))
    assert entropies[-1] < entropies[0]
    assert set(acts) == set(base.activations) and all(len(v) == 3 for v in acts.values())
    table = result.group_of_t(tiny_model.schedule.num_train_timesteps)
    assert set(table.tolist()) <= {0, 1, 2} and len(table) == tiny_model.schedule.num_train_timesteps
    assert GroupMixer.entropy(torch.tensor(result.sigma)) < np.log(3)


def test_apqdm_compile_routes_steps_to_group_graphs_with_parity(tiny_dir, tmp_path):
    """`dqc compile --method apqdm --groups 3`: one graph per used group sharing one weights file, a table
    over every training timestep, each group's engine matching the fake-quant model with its scales."""
    import json

    from calibration.model_io import load_model
    from calibration.result import CalibrationResult
    from exporter.parity import layer_parity, noised_inputs
    from runtime.bundle import load_bundle
    from tools.cli import main

    out, calib = tmp_path / "b", tmp_path / "c.safetensors"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "apqdm", "--groups", "3", "--group-epochs", "2",
            "--bits", "W6A6", "--steps", "10", "--calib-samples", "8", "--calib-timesteps", "6",
            "--save-calibration", str(calib), "-q"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    result = CalibrationResult.load(calib)
    used = sorted(set(manifest["timestep_to_group"]))
    assert used == list(range(len(manifest["groups"]))) == list(range(result.num_groups))
    assert len(manifest["timestep_to_group"]) == 1000
    import onnx

    bundle = load_bundle(out)
    # group 0 is a whole graph; the others are overlays of the initializers that differ from it (no nodes)
    entries = manifest["groups"]
    assert "base" not in entries[0] and all(e["base"] == entries[0]["file"] for e in entries[1:])
    for e in entries[1:]:
        delta = onnx.load(str(out / e["file"]))
        assert not delta.graph.node and delta.graph.initializer
        assert all(t.name.endswith(("scale", "zero_point", "/bias/int", "clip_min", "clip_max"))
                   for t in delta.graph.initializer), [t.name for t in delta.graph.initializer]  # fmt: skip
    # every large initializer (the integer weights) is a reference into the one weights.bin, at the same
    # place for every group graph: the weight bytes exist once on disk
    refs = []
    for g in range(len(entries)):
        m = bundle.group_model(g)
        ext = {i.name: tuple((e.key, e.value) for e in i.external_data) for i in m.graph.initializer
               if i.data_location == onnx.TensorProto.EXTERNAL}  # fmt: skip
        assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in m.graph.initializer
                   if i.name.endswith("/weight/int") and len(i.dims) and np.prod(i.dims) >= 1024)  # fmt: skip
        refs.append(ext)
    assert refs[0] and all(r == refs[0] for r in refs)
    stored = sum(int(dict(v)["length"]) for v in refs[0].values())
    assert (out / "weights.bin").stat().st_size < stored + 64 * len(refs[0]) + 1
    engines = bundle.engines()
    for t in (0, 333, 999):
        assert engines.group_of(t) == manifest["timestep_to_group"][t]
    model = load_model(tiny_dir)
    feeds = noised_inputs(model.spec, model.schedule, 500, 4, 0)
    for g in range(len(entries)):
        graph = bundle.group_model(g, load_weights=True)
        report = layer_parity(graph, result.reference_model(model.wrapper(), group=g), feeds)
        assert report and all(r["flipped"] <= 2e-3 for r in report.values()), (g, report)
        # the shipped engine (shared weights and arena) computes what the standalone graph does
        t = next(t for t, x in enumerate(manifest["timestep_to_group"]) if x == g)
        feeds_t = dict(feeds, timestep=np.full(4, t, np.int64))
        import onnxruntime as ort

        alone = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        want = alone.run(["eps"], feeds_t)[0]
        got = engines.for_timestep(t).infer(feeds_t["sample"], feeds_t["timestep"], feeds_t.get("class_labels"))
        np.testing.assert_array_equal(got, want)


def test_more_groups_than_calibrated_timesteps_is_refused():
    import pytest

    from calibration.config import CalibrationConfig
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="--groups 9"):
        CalibrationConfig(groups=9, calib_timesteps=8)
    with pytest.raises(ConfigError, match="--groups 0"):
        CalibrationConfig(groups=0)
    assert CalibrationConfig.for_method("apqdm").groups == 8


def test_shared_weights_store_keeps_per_group_biases_in_their_graphs():
    """Group graphs share integer weights by reference, but a bias on the accumulator grid differs per group
    (its input scale does): it stays inside each graph instead of failing the export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from exporter.bundle_writer import SharedWeights

    w = np.arange(4096, dtype=np.int8)
    graphs = []
    for g in range(2):
        bias = np.full(512, 7 + g, np.int32)  # 2 KiB, differs by group
        scale = np.full(512, 0.01 * (g + 1), np.float32)
        inits = [numpy_helper.from_array(w, "conv/weight/int"), numpy_helper.from_array(bias, "conv/bias/int"),
                 numpy_helper.from_array(scale, "conv/bias/scale")]  # fmt: skip
        graph = helper.make_graph([], f"g{g}", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
        graphs.append(helper.make_model(graph))
    shared = SharedWeights()
    shared.externalize(graphs)
    assert len(shared.blob) == 4096  # the weights once
    for g, m in enumerate(graphs):
        by_name = {i.name: i for i in m.graph.initializer}
        assert by_name["conv/weight/int"].data_location == onnx.TensorProto.EXTERNAL
        assert by_name["conv/bias/int"].data_location != onnx.TensorProto.EXTERNAL
        assert by_name["conv/bias/scale"].data_location != onnx.TensorProto.EXTERNAL
        assert numpy_helper.to_array(by_name["conv/bias/int"])[0] == 7 + g


class _SyntheticSearch(_Search):
    """One 4-bit activation quantizer per group on data whose range depends on the timestep: t in SMALL
    carries values of ±0.1, the others ±10. Group 0 starts with a small range and serves the first half of
    the timesteps, group 1 a large one and the second half; the best assignment is SMALL → group 0, the
    rest → group 1, which moves t = 3 and t = 6 away from their contiguous start."""

    SMALL = {0, 1, 2, 6}

    def __init__(self, alpha_lr: float, alpha_bias: float) -> None:
        from calibration.config import CalibrationConfig
        from calibration.quantizers import activation_params

        timesteps = list(range(8))
        self.cfg = CalibrationConfig(batch_size=16, group_alpha_lr=alpha_lr, group_alpha_bias=alpha_bias)
        self.mixer = GroupMixer(timesteps, 2, contiguous_assignment(timesteps, 2), bias=alpha_bias)
        inits = [activation_params(-0.1, 0.1, True, 4), activation_params(-10, 10, True, 4)]
        quant = MixedQuantizer(inits, self.mixer)
        self.mixed = {"x": quant}
        self.forward = lambda x, t, c: quant(x)
        self.params = [q.scale for q in quant.quantizers]
        gen = torch.Generator().manual_seed(0)
        t = torch.arange(8).repeat_interleave(32)
        amp = torch.tensor([0.1 if int(v) in self.SMALL else 10.0 for v in t])
        x = (torch.rand(len(t), 1, 4, 4, generator=gen) * 2 - 1) * amp.reshape(-1, 1, 1, 1)
        self.rows, self.passes = [x, t, None, x.clone()], 0


def _searched(alpha_lr: float, alpha_bias: float, assign: bool) -> dict[int, int]:
    from calibration.group_assign import assign_by_loss
    from calibration.groups import _Optimizer

    search = _SyntheticSearch(alpha_lr, alpha_bias)
    steps = -(-len(search) // 16)
    with torch.enable_grad():
        result = search_loop(search.forward, search.mixer, search.params, search.batches, steps, epochs=10,
                             lr=5e-3, alpha_lr=alpha_lr)  # fmt: skip
        if not assign:
            return result.assignment
        optimizer = lambda total: _Optimizer(search.mixer, search.params, total, lr=1e-3)  # noqa: E731
        final, stats = assign_by_loss(search, optimizer, refine_epochs=1)
    return dict(zip(search.mixer.timesteps, final, strict=True))


def test_the_search_finds_an_assignment_other_than_the_contiguous_start():
    best = {t: 0 if t in _SyntheticSearch.SMALL else 1 for t in range(8)}
    contiguous = dict(enumerate(contiguous_assignment(list(range(8)), 2)))
    assert best != contiguous
    # as the search was: α's 1.0 lead, moved at the quantizers' decaying rate, never leaves the start
    assert _searched(alpha_lr=0.0, alpha_bias=1.0, assign=False) == contiguous
    # its own rate and a weak lead: the soft search moves t = 3, whose clipped ±10 inputs cost much; t = 6's
    # small error against Eq. 7's entropy term (λ = 0.8, pulling σ towards its current argmax) keeps it
    soft = _searched(alpha_lr=0.05, alpha_bias=0.1, assign=False)
    assert soft[3] == 1 and soft != contiguous
    # the per-timestep loss assignment finds the best, from the new search and even from the old one
    assert _searched(alpha_lr=0.05, alpha_bias=0.1, assign=True) == best
    assert _searched(alpha_lr=0.0, alpha_bias=1.0, assign=True) == best
