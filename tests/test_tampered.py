"""Bundles tampered with and their hashes recomputed (what an attacker does): poisoned numbers are refused
at load time with the file and the value named, never sampled into NaN (issue 17, item 6)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from runtime.bundle import MANIFEST, load_bundle, sha256_file
from runtime.errors import DqcError
from tools.cli import main


def _copy(bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out


def _rehash(root, name):
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"][name] = sha256_file(root / name)
    (root / MANIFEST).write_text(json.dumps(manifest))


def _poison_scale(root, value):
    path = root / "group_0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    t = next(t for t in model.graph.initializer if t.name in scales and not t.external_data)
    array = numpy_helper.to_array(t).copy()
    array.flat[0] = value
    t.CopyFrom(numpy_helper.from_array(array, t.name))
    onnx.save(model, str(path))
    _rehash(root, "group_0.onnx")
    return t.name


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e38, 0.0, -1.0])
def test_poisoned_graph_scales_are_refused_by_name(tiny_bundle, tmp_path, value):
    root = _copy(tiny_bundle, tmp_path)
    name = _poison_scale(root, value)
    with pytest.raises(DqcError, match=f"group_0.onnx: scale '{name}'"):
        load_bundle(root).engines().for_timestep(0)
    assert main(["sample", str(root), "-n", "1", "--steps", "2", "-o", str(tmp_path / "s.npz"), "-q"]) == 2
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("beta", [float("nan"), 0.0, 1.5])
def test_poisoned_betas_are_refused(tiny_bundle, tmp_path, beta):
    root = _copy(tiny_bundle, tmp_path)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["schedule"]["betas"][7] = beta
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DqcError, match=r"betas\[7\]"):
        _ = load_bundle(root).schedule
    assert main(["sample", str(root), "-n", "1", "--steps", "2", "-o", str(tmp_path / "s.npz"), "-q"]) == 2


@pytest.mark.parametrize("field, value", [("bias", 1e300), ("k", -1e9), ("sigma_q", 1e50)])
def test_absurd_ptqd_statistics_are_refused(field, value):
    from runtime.errors import BundleError
    from runtime.ptqd import PtqdTables

    ts, n = np.arange(4) * 10, 4
    stats = {"k": np.zeros(n), "bias": np.zeros((n, 1)), "sigma_q": np.full(n, 0.1)}
    stats[field] = stats[field].copy()
    stats[field].flat[2] = value
    with pytest.raises(BundleError, match=f"\\|{field}\\| exceeds .* timesteps \\[20\\]"):
        PtqdTables.checked(ts, stats["k"], stats["bias"], stats["sigma_q"], sampler="ddim", steps=4, eta=0.0,
                           channels=1)  # fmt: skip


def _set(path: str, value):
    def edit(m):
        keys = path.split(".")
        d = m
        for k in keys[:-1]:
            d = d[int(k)] if isinstance(d, list) else d[k]
        last = keys[-1]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
        return m

    return edit


MUTATIONS = [
    (_set("files", ["group_0.onnx"]), "files: expected an object, got list"),
    (_set("groups", "group_0.onnx"), "groups: expected a list, got str"),
    (_set("groups.0", "group_0.onnx"), r"groups\[0\]: expected an object, got str"),
    (_set("groups.0.id", "0"), r"groups\[0\].id: expected int, got str"),
    (lambda m: m | {"groups": m["groups"] * 2}, "id 0 appears more than once"),
    (_set("precisions", ["W8A8"]), "precisions: expected an object, got list"),
    (_set("input_spec.sample_shape", [1, 8]), "input_spec.sample_shape: expected 3 entries"),
    (_set("input_spec.num_train_timesteps", "1000"), "input_spec.num_train_timesteps: expected int, got str"),
    (_set("schedule.betas", "cosine"), "schedule.betas: expected a list, got str"),
    (_set("format_version", "1"), "format_version: expected int, got str"),
    (_set("ptqd", {"W8A8": {"file": 3}}), r"ptqd.W8A8.file: expected str, got int"),
    (_set("timestep_to_group.5", 0.5), r"timestep_to_group\[5\]: expected int, got float"),
    (_set("calibration.steps", 5000), r"calibration.steps = 5000 must lie in \[1, 1000\]"),
    (_set("calibration.steps", "100"), "calibration.steps: expected int, got str"),
]


@pytest.mark.parametrize("edit, message", MUTATIONS)
def test_manifest_fields_of_the_wrong_type_are_named(tiny_bundle, tmp_path, capsys, edit, message):
    from runtime.errors import BundleError

    root = _copy(tiny_bundle, tmp_path)
    manifest = edit(json.loads((root / MANIFEST).read_text()))
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(root)
    assert main(["info", str(root)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "manifest.json" in err


def test_external_data_of_a_constant_node_outside_the_bundle_is_refused(tiny_bundle, tmp_path):
    """A Constant node whose tensor lives in a file outside the bundle (dqc once checked initializers only)."""
    from onnx import TensorProto, helper

    from runtime.errors import BundleError

    root = _copy(tiny_bundle, tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = root / "group_0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    value = TensorProto(name="leak", data_type=TensorProto.FLOAT, dims=[4])
    value.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        value.external_data.add(key=k, value=v)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["leak_out"], value=value))
    onnx.save(model, str(path))
    _rehash(root, "group_0.onnx")
    with pytest.raises(BundleError, match="leaves the bundle directory"):
        load_bundle(root)


def test_a_truncated_graph_with_its_hash_recomputed_is_named(tiny_bundle, tmp_path):
    from runtime.errors import BundleError

    root = _copy(tiny_bundle, tmp_path)
    data = (root / "group_0.onnx").read_bytes()
    (root / "group_0.onnx").write_bytes(data[: len(data) // 3])
    _rehash(root, "group_0.onnx")
    with pytest.raises(BundleError, match="group_0.onnx: not a readable ONNX graph"):
        load_bundle(root)


def test_eval_names_the_bad_flag_or_file(tmp_path, capsys):
    from tools.deploy.pipeline import save_npz

    x = np.zeros((4, 1, 8, 8), np.float32)
    save_npz(tmp_path / "s.npz", samples=x, labels=np.array(["a", "b", "c", "d"]))
    save_npz(tmp_path / "ok.npz", samples=x)
    (tmp_path / "junk.safetensors").write_bytes(b"not weights")
    cases = [
        (["eval", str(tmp_path / "s.npz")], "s.npz: labels are not integers"),
        (["eval", str(tmp_path / "ok.npz"), "--labels", "x"], "--labels 'x'"),
        (["eval", str(tmp_path / "ok.npz"), "--labels", "10"], "--labels must be digits"),
        (["eval", str(tmp_path / "ok.npz"), "--classifier", str(tmp_path / "junk.safetensors")], "--classifier"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "--class-label" not in err, (argv, err)


@pytest.mark.parametrize("offset", ["-8", "abc"])
def test_external_data_offsets_must_be_non_negative_integers(tiny_bundle, tmp_path, offset):
    from runtime.errors import BundleError

    root = _copy(tiny_bundle, tmp_path)
    path = root / "group_0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.external_data)
    next(e for e in t.external_data if e.key == "offset").value = offset
    onnx.save(model, str(path))
    _rehash(root, "group_0.onnx")
    with pytest.raises(BundleError, match=f"external data offset '{offset}'"):
        load_bundle(root).engines().for_timestep(0)


def test_ptqd_timesteps_outside_the_schedule_are_refused(tiny_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    from exporter.bundle_writer import add_ptqd
    from runtime.errors import BundleError
    from runtime.ptqd import PtqdTables

    root = _copy(tiny_bundle, tmp_path)
    ts = np.array([900, 500, 100])
    tables = PtqdTables.checked(ts, np.zeros(3), np.zeros((3, 1)), np.full(3, 0.1), sampler="ddim", steps=3, eta=0.0,
                                channels=1, eps_power=np.ones(3))  # fmt: skip
    add_ptqd(root, {"W8A8": tables}, samples=4)
    name = "ptqd_W8A8.safetensors"
    stats = load_file(str(root / name))
    stats["timesteps"] = np.array([5000, 500, 100])
    save_file(stats, str(root / name))
    _rehash(root, name)
    with pytest.raises(BundleError, match=r"PTQD timesteps must be integers in \[0, 1000\)"):
        load_bundle(root).ptqd()


def test_scheduler_config_numbers_of_the_wrong_type_are_named(tmp_path):
    from runtime.errors import ModelLoadError
    from runtime.schedule import load_schedule

    for field, value in (("num_train_timesteps", "1000"), ("beta_end", "0.02")):
        (tmp_path / "scheduler_config.json").write_text(json.dumps({field: value}))
        with pytest.raises(ModelLoadError, match=f"{field}='"):
            load_schedule(tmp_path)


def test_info_plots_at_a_file_is_refused(tiny_bundle, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["info", str(tiny_bundle), "--plots", str(tmp_path / "f")]) == 2
    assert "--plots" in capsys.readouterr().err and (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("classes", [20, None])
def test_a_class_embedding_count_unlike_the_graphs_is_refused(tiny_bundle, tmp_path, classes):
    from runtime.errors import BundleError

    root = _copy(tiny_bundle, tmp_path)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["input_spec"]["num_class_embeds"] = classes
    (root / MANIFEST).write_text(json.dumps(manifest))
    # 20 classes: the graph's table has 11 rows; none: the manifest's own named inputs still list class_labels
    match = "group_0.onnx: the class embedding .* has 11 rows|input_spec.inputs = .* does not match num_class_embeds"
    with pytest.raises(BundleError, match=match):
        load_bundle(root).engines().for_timestep(0)
