"""Loading a bundle safely: verify every file's hash, never unpickle, keep external data inside."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.engine import EngineSet, InputSpec, OrtEngine
from runtime.errors import BundleError
from runtime.schedule import NoiseSchedule

BUNDLE_FORMAT = "dqc-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED = (
    "format",
    "format_version",
    "model",
    "input_spec",
    "schedule",
    "groups",
    "timestep_to_group",
    "files",
    "target",
    "bits",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def external_data_locations(graph_path: Path) -> list[str]:
    """The external-data file names an ONNX graph refers to (read without loading the data)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            locations.add(entries.get("location", ""))
    return sorted(locations)


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input_spec"])

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_dict(self.manifest["schedule"])

    @property
    def group_of_t(self) -> np.ndarray:
        return np.asarray(self.manifest["timestep_to_group"], dtype=np.int64)

    @property
    def null_class(self) -> int | None:
        return self.manifest.get("null_class")

    def graph_path(self, group: int) -> Path:
        for g in self.manifest["groups"]:
            if g["id"] == group:
                return self.root / g["file"]
        raise BundleError(f"{self.root / MANIFEST}: no group {group} in 'groups'")

    def engines(self, providers: list[str] | None = None, threads: int = 0) -> EngineSet:
        """ONNX Runtime engines, one per group, created on first use."""
        spec = self.spec
        factories = {
            g["id"]: (lambda p=self.root / g["file"]: OrtEngine(p, spec, providers=providers, threads=threads))
            for g in self.manifest["groups"]
        }
        return EngineSet(factories, self.group_of_t, spec)


def _inside(root: Path, name: str) -> bool:
    try:
        (root / name).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return bool(name) and not Path(name).is_absolute()


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle directory; raises `BundleError` naming the bad file or field."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root}: not a dqc bundle ({MANIFEST} missing); create one with 'dqc compile'")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); recompile the bundle") from e
    missing = [k for k in _REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(_REQUIRED)
    if missing:
        raise BundleError(f"{mpath}: missing fields {missing}; recompile the bundle")
    if manifest["format"] != BUNDLE_FORMAT or manifest["format_version"] != BUNDLE_VERSION:
        raise BundleError(
            f"{mpath}: format {manifest['format']!r} v{manifest['format_version']} is not "
            f"{BUNDLE_FORMAT!r} v{BUNDLE_VERSION}; recompile it with this dqc"
        )
    for name, digest in manifest["files"].items():
        if not _inside(root, name):
            raise BundleError(f"{mpath}: file entry {name!r} points outside the bundle directory")
        fpath = root / name
        if not fpath.is_file():
            raise BundleError(f"{fpath}: listed in {MANIFEST} but missing; recompile or restore the bundle")
        if sha256_file(fpath) != digest:
            raise BundleError(
                f"{fpath}: sha256 does not match {MANIFEST} (file changed or corrupted); recompile the bundle"
            )
    bundle = Bundle(root, manifest)
    for g in manifest["groups"]:
        if g["file"] not in manifest["files"]:
            raise BundleError(f"{mpath}: group {g['id']} graph {g['file']!r} is not hashed in 'files'")
        for loc in external_data_locations(root / g["file"]):
            if not _inside(root, loc):
                raise BundleError(
                    f"{root / g['file']}: external data path {loc!r} leaves the bundle directory; refusing to load"
                )
            if loc not in manifest["files"]:
                raise BundleError(f"{root / g['file']}: external data {loc!r} is not hashed in {MANIFEST}")
    if len(bundle.group_of_t) != bundle.spec.num_train_timesteps:
        raise BundleError(f"{mpath}: 'timestep_to_group' must have one entry per training timestep")
    return bundle
