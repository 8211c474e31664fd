"""APQ-DM active timestep selection (Eq. 12), one group per step, activation errors, and the runtime side
of group bundles: overlays, bounded resident engines, load-time errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from calibration.active import select_active


def test_active_score_is_entropy_plus_eta_over_draws():
    ts = np.array([900, 700, 500, 300, 100])
    counts = np.array([1, 1, 0, 1, 1])
    entropy = np.array([0.2, 1.9, 0.0, 0.3, 0.1])
    # never-drawn 500 reads its entropy at the nearest drawn step (700 and 300 tie by distance: the first)
    # s(500) = 1.9 + 1.5 = 3.4 beats s(700) = 1.9 + 0.75
    assert ts[select_active(entropy, counts, ts, eta=1.5)] == 500
    # with η = 0 only the entropy counts: 700 (and 500, which copies it) tie; the tie goes farthest from
    # the drawn steps: 500 (200 away) over 700 (0 away)
    assert ts[select_active(entropy, counts, ts, eta=0.0)] == 500
    # everything drawn twice: the highest entropy wins
    assert ts[select_active(entropy, np.full(5, 2), ts)] == 700
    # nothing drawn and equal entropy: the later step (larger t) first
    assert ts[select_active(np.zeros(5), np.zeros(5, int), ts)] == 900


def test_record_at_stops_the_trajectory_at_t(tiny_model):
    from calibration.collect import record_at
    from calibration.config import CalibrationConfig

    cfg = CalibrationConfig(steps=10, calib_timesteps=4)
    ts = tiny_model.schedule.timesteps(10)
    data = record_at(tiny_model, cfg, int(ts[4]), 3, draw=5)
    assert len(data.samples) == 1 and data.samples[0].shape[0] == 3
    assert set(data.timesteps[0].tolist()) == {int(ts[4])}
    again = record_at(tiny_model, cfg, int(ts[4]), 3, draw=5)
    np.testing.assert_array_equal(again.samples[0], data.samples[0])  # seeded
    other = record_at(tiny_model, cfg, int(ts[4]), 3, draw=6)
    assert not np.allclose(other.samples[0], data.samples[0])
    with pytest.raises(ValueError, match="not a step"):
        record_at(tiny_model, cfg, int(ts[4]) + 1, 3, draw=5)


def test_active_search_draws_rounds_and_assigns_drawn_steps(tiny_model):
    """G = 3 over 5 rounds: the first three rounds seed one group each, the next two are chosen by Eq. 12;
    the assignment covers exactly the drawn steps and every group starts from its own data."""
    from calibration.active import run_active_search
    from calibration.calibrate import quantize_weights
    from calibration.config import CalibrationConfig
    from calibration.qmodules import quantizable_layers

    cfg = CalibrationConfig(bits="W6A6", steps=10, calib_samples=4, calib_timesteps=5, batch_size=8,
                            timestep_selection="active", groups=3)  # fmt: skip
    layers = quantizable_layers(tiny_model.unet)
    weights = quantize_weights(tiny_model, layers, cfg, False)
    result, acts, data = run_active_search(tiny_model, layers, weights, cfg, groups=3, rounds=5, per_round=4,
                                           epochs=2, lr=3e-3)  # fmt: skip
    assert sum(result.counts.values()) == 5 and len(data) == 20
    assert sorted(result.assignment) == sorted(result.counts) == sorted(result.timesteps)
    # group_search "loss": each drawn step goes to the group of least loss after the refinement
    rows, losses = result.assigned_by_loss["loss_rows"], np.array(result.assigned_by_loss["loss_final"])
    assert all(result.assignment[t] == int(losses[rows.index(t)].argmin()) for t in result.timesteps)
    assert all(len(v) == 3 for v in acts.values())
    assert len(result.history) == 1 + (5 - 3 + 1)  # the start and one point per training phase
    assert result.rows == [int(t) for t in tiny_model.schedule.timesteps(10)]  # σ rows: every candidate step
    assert all(len(h["sigma"]) == 10 for h in result.history)
    table = result.group_of_t(tiny_model.schedule.num_train_timesteps)
    assert len(table) == tiny_model.schedule.num_train_timesteps and set(table.tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="one round per group"):
        run_active_search(tiny_model, layers, weights, cfg, groups=4, rounds=3, per_round=4, epochs=1, lr=3e-3)


def test_one_group_per_step_is_fixed_and_each_step_keeps_its_own_quantizers(tiny_model):
    from calibration.calibrate import quantize_weights
    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig
    from calibration.groups import run_group_search
    from calibration.qmodules import quantizable_layers

    cfg = CalibrationConfig(bits="W6A6", steps=10, calib_samples=4, calib_timesteps=4, batch_size=8)
    data = record_trajectories(tiny_model, cfg, progress=False)
    layers = quantizable_layers(tiny_model.unet)
    weights = quantize_weights(tiny_model, layers, cfg, False)
    result, acts = run_group_search(tiny_model, layers, weights, data, cfg, groups=4, epochs=1, lr=3e-3)
    # sorted ascending: the i-th smallest calibrated step is group i, and σ stayed one-hot
    assert [result.assignment[t] for t in sorted(result.assignment)] == [0, 1, 2, 3]
    assert np.array_equal(result.sigma, np.eye(4)[[result.assignment[t] for t in result.timesteps]])
    assert all(len(v) == 4 for v in acts.values())


def test_activation_error_falls_with_more_bits_and_generation_error_is_reported(tiny_model):
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig

    errors = {}
    for bits in ("W8A4", "W8A8"):
        cfg = CalibrationConfig(bits=bits, steps=10, calib_samples=4, calib_timesteps=4, activation_error=True)
        errors[bits] = calibrate(tiny_model, cfg, progress=False).stats["activation_error"]
    assert 0 < errors["W8A8"]["c_error"] < errors["W8A4"]["c_error"] / 10
    assert 0 < errors["W8A8"]["g_error"] < errors["W8A4"]["g_error"] / 10


def test_active_selection_refuses_reconstruction():
    from calibration.config import CalibrationConfig
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="active"):
        CalibrationConfig(timestep_selection="active", weight_rounding="brecq")
    assert CalibrationConfig.for_method("apqdm").timestep_selection == "active"


def test_engine_set_keeps_at_most_max_resident_engines():
    from runtime.engine import EngineSet, InputSpec

    spec = InputSpec(sample_shape=(1, 4, 4), num_train_timesteps=10, num_class_embeds=None)
    made = []

    def factory(g):
        def make():
            made.append(g)
            return f"engine{g}"

        return make

    table = np.array([0] * 4 + [1] * 3 + [2] * 3)
    engines = EngineSet({g: factory(g) for g in range(3)}, table, spec, max_resident=2)
    for t in (9, 8, 5, 4, 0, 9):  # groups 2, 2, 1, 1, 0, 2
        engines.for_timestep(t)
    assert made == [2, 1, 0, 2] and engines.loaded_groups == [0, 2]
    unbounded = EngineSet({g: factory(g) for g in range(3)}, table, spec)
    for t in (9, 5, 0, 9, 5, 0):
        unbounded.for_timestep(t)
    assert unbounded.created == 3 and unbounded.loaded_groups == [0, 1, 2]
    with pytest.raises(Exception, match="max_resident=0"):
        EngineSet({0: factory(0)}, np.zeros(10, int), spec, max_resident=0)


@pytest.fixture(scope="module")
def group_bundle(tiny_dir, tmp_path_factory):
    from tools.cli import main

    out = tmp_path_factory.mktemp("gb") / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "apqdm", "--groups", "3", "--group-epochs", "1",
            "--timesteps", "uniform", "--steps", "10", "--calib-samples", "4", "--calib-timesteps", "6",
            "-q"]  # fmt: skip
    assert main(argv) == 0
    return out


def _rewrite(src, dst, edit):
    """A copy of the bundle at src with the manifest edited and its hashes left as they are."""
    from runtime.bundle import sha256_file

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest, dst)
    manifest["files"] = {name: sha256_file(dst / name) for name in manifest["files"] if (dst / name).exists()} | {
        name: digest for name, digest in manifest["files"].items() if not (dst / name).exists()
    }
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_group_table_holes_and_missing_graphs_fail_at_load(group_bundle, tmp_path):
    from runtime.bundle import load_bundle
    from runtime.errors import BundleError

    def hole(m, d):
        m["timestep_to_group"][100:200] = [7] * 100

    with pytest.raises(BundleError, match=r"routes timesteps 100-199 to no listed group"):
        load_bundle(_rewrite(group_bundle, tmp_path / "hole", hole))

    def drop_graph(m, d):
        (d / m["groups"][1]["file"]).unlink()

    with pytest.raises(BundleError, match="missing"):
        load_bundle(_rewrite(group_bundle, tmp_path / "gone", drop_graph))

    def unhashed_base(m, d):
        m["groups"][1]["base"] = "other.onnx"

    with pytest.raises(BundleError, match="other.onnx"):
        load_bundle(_rewrite(group_bundle, tmp_path / "base", unhashed_base))


def test_overlay_naming_an_unknown_initializer_is_refused(group_bundle, tmp_path):
    import onnx
    from onnx import numpy_helper

    from runtime.bundle import load_bundle
    from runtime.errors import BundleError

    def stray(m, d):
        path = d / m["groups"][1]["file"]
        delta = onnx.load(str(path))
        delta.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "no/such/tensor"))
        onnx.save(delta, str(path))

    bundle = load_bundle(_rewrite(group_bundle, tmp_path / "stray", stray))
    with pytest.raises(BundleError, match="no/such/tensor"):
        bundle.group_model(1)

    def wrong_dtype(m, d):  # an overlay scale stored as float64: the session would fail with a traceback
        path = d / m["groups"][1]["file"]
        delta = onnx.load(str(path))
        t = delta.graph.initializer[0]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
        onnx.save(delta, str(path))

    bundle = load_bundle(_rewrite(group_bundle, tmp_path / "dtype", wrong_dtype))
    with pytest.raises(BundleError, match="overlay initializer .* has type 11"):
        bundle.group_model(1)


def test_per_step_groups_and_active_timesteps_from_the_cli(tiny_dir, tmp_path):
    from runtime.bundle import load_bundle
    from tools.cli import main

    out = tmp_path / "ps"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "apqdm", "--groups", "per-step", "--timesteps",
            "uniform", "--group-epochs", "1", "--steps", "10", "--calib-samples", "4", "--calib-timesteps", "4",
            "-q"]  # fmt: skip
    assert main(argv) == 0
    assert len(load_bundle(out).manifest["groups"]) == 4
    out = tmp_path / "act"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "apqdm", "--groups", "2", "--group-epochs", "1",
            "--steps", "10", "--calib-samples", "4", "--calib-timesteps", "3", "--ptqd", "--ptqd-samples", "4",
            "-q"]  # fmt: skip
    assert main(argv) == 0
    stats = load_bundle(out).manifest["calibration"]["stats"]
    assert sum(stats["group_search"]["draws"].values()) == 3 and stats["calibration_inputs"] == 12
    assert main(["info", str(out), "--plots", str(tmp_path / "plots")]) == 0
    pngs = {name: (tmp_path / "plots" / name).read_bytes() for name in ("group_map.png", "sigma_evolution.png",
                                                                          "ptqd.png")}  # fmt: skip
    assert all(v[:8] == b"\x89PNG\r\n\x1a\n" for v in pngs.values())
    assert len(set(pngs.values())) == 3  # each chart in its own file (σ's evolution once overwrote ptqd.png)
    with pytest.raises(SystemExit):
        main(["compile", str(tiny_dir), "-o", str(tmp_path / "x"), "--groups", "many"])


def test_group_bench_reports_disk_memory_and_switching(group_bundle, tiny_bundle, tmp_path):
    """The measurement, not its numbers: overlays add only scale tables to the disk, every memory
    configuration loads what it says (all groups, or one), and each latency variant ran."""
    from tools.bench.group_bench import run_group_bench

    report = run_group_bench(str(group_bundle), str(tiny_bundle), batch=2, reps=1, json_out=str(tmp_path / "r.json"),
                             progress=False)  # fmt: skip
    sizes = report["disk"]["bytes"]
    graph = (group_bundle / "group_0.onnx").stat().st_size
    overlays = sum(p.stat().st_size for p in group_bundle.glob("group_*.overlay.onnx"))
    assert overlays < graph and sizes[str(group_bundle.resolve())] > sizes[str(tiny_bundle.resolve())]
    loaded = {m["config"]: m["resident_engines"] for m in report["memory"][1:]}
    assert loaded["per-group sessions, one resident at a time"] == 1
    assert loaded["per-group sessions, all resident"] == loaded["one session for all groups (the default)"] == 3
    assert all(m["rss_mb"] > 0 for m in report["memory"])
    lat = report["latency"]
    assert lat["group_switches"] >= 2 and all(v > 0 for v in lat["ms_per_step"].values())
    assert json.loads((tmp_path / "r.json").read_text())["batch"] == 2


@pytest.mark.parametrize("steps", [7, 23, 100])
def test_any_step_count_routes_every_step_to_its_tables_group(group_bundle, steps):
    """Calibrated for 10 steps, sampled with another count: each step runs on the engine the
    training-timestep table names, and the sampler reports which group served which step."""
    from runtime.bundle import load_bundle
    from runtime.sampler import SamplerConfig, sample

    bundle = load_bundle(group_bundle)
    engines = bundle.engines()
    labels = None if bundle.spec.num_class_embeds is None else np.zeros(1, np.int64)
    run = sample(engines, bundle.schedule, SamplerConfig("ddim", steps, 0.0, 1.0), n=1, cond=labels,
                 null_cond=bundle.null_class, progress=False)  # fmt: skip
    want = [int(bundle.group_of_t[t]) for t in bundle.schedule.timesteps(steps)]
    assert run.step_groups == want and len(set(want)) > 1
    assert engines.loaded_groups == sorted(set(want))
