"""Sample-quality metrics (`dqc eval`): the digits classifier shipped beside the reference model, its
penultimate features as the feature space of a Fréchet distance against the held-out real images,
class-conditional accuracy, and PSNR/MSE against a reference file drawn from the same seeds.

Fréchet distance (Heusel et al. 2017, eq. 6 — FID with our own features):
    FD = ||μ_s − μ_r||² + Tr(Σ_s + Σ_r − 2 (Σ_s^½ Σ_r Σ_s^½)^½)
FD is biased upward at small N, so a report always carries N and the seeds, and only equal-N, equal-seed
figures are compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.errors import ConfigError

FEATURE_DIM = 128
RANGE_TOLERANCE = 0.1  # samples may overshoot [−1, 1] by this much (unclipped samplers); they are then clipped


def _torch():
    import torch

    return torch


def DigitClassifier():  # noqa: N802 — a factory that reads like the class it returns
    """Small CNN for 1×8×8 digits in [−1, 1]: three 3×3 convs (32, 64, 128), two 2× max-pools,
    a 128-wide penultimate layer (the feature space) and a 10-way head."""
    nn = _torch().nn

    class _Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(512, FEATURE_DIM), nn.ReLU(),
            )  # fmt: skip
            self.drop = nn.Dropout(0.3)
            self.head = nn.Linear(FEATURE_DIM, 10)

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.head(self.drop(self.body(x)))

    return _Net()


def load_classifier(path: str | Path | None = None):
    """The shipped classifier (or one at `path`), in eval mode on the CPU."""
    from safetensors.torch import load_file

    from tools.reference.model import classifier_path

    path = Path(path) if path is not None else classifier_path()
    if not path.is_file():
        raise ConfigError(
            f"classifier weights {path} not found; train them with `dqc train-reference --part classifier`"
        )
    net = DigitClassifier()
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as e:  # safetensors' header errors, or tensors of other names/shapes
        raise ConfigError(f"--classifier {path}: not the digits classifier's safetensors weights ({e})") from e
    return net.eval()


def _batched(net, images: np.ndarray, fn: str, batch: int = 512) -> np.ndarray:
    torch = _torch()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch], dtype=np.float32))
            out.append(getattr(net, fn)(x).numpy())
    return np.concatenate(out).astype(np.float64)


def classify(net, images: np.ndarray) -> np.ndarray:
    return _batched(net, images, "forward").argmax(1)


def features(net, images: np.ndarray) -> np.ndarray:
    return _batched(net, images, "features")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between two feature sets (rows are samples), in float64 via symmetric eigendecompositions."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fd_floor(classifier: str | Path | None = None) -> float:
    """FD of the held-out test split against the training split: the best a generator of the training
    distribution can expect at this N (360 against 1437 images)."""
    from tools.reference.digits import load_digits_split

    net = load_classifier(classifier)
    train, test = load_digits_split()
    return frechet_distance(features(net, test.images), features(net, train.images))


PSNR_CAP = 100.0  # identical samples count as 100 dB


def _psnr(mse: np.ndarray | float) -> np.ndarray:
    """10·log10(4 / MSE): data in [−1, 1], peak-to-peak 2."""
    return np.minimum(10 * np.log10(4.0 / np.maximum(mse, 1e-30)), PSNR_CAP)


def psnr_mse(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The mean of per-sample PSNRs (data in [−1, 1], peak-to-peak 2) and the mean MSE."""
    mse = np.mean((a.astype(np.float64) - b) ** 2, axis=tuple(range(1, a.ndim)))
    return float(_psnr(mse).mean()), float(mse.mean())


def psnr_report(a: np.ndarray, b: np.ndarray, *, boot: int = 1000, seed: int = 0) -> dict:
    """PSNR of samples `a` against `b` (same seeds) both ways, with 95 % bootstrap intervals over samples:
    pooled, 10·log10(4 / mean MSE), and the mean of per-sample PSNRs (which weights a few badly drifted
    samples less). The two differ whenever per-sample errors spread."""
    mse = np.mean((a.astype(np.float64) - b) ** 2, axis=tuple(range(1, a.ndim)))
    per = _psnr(mse)
    rows = np.random.default_rng(seed).integers(0, len(mse), size=(boot, len(mse)))
    pooled = _psnr(mse[rows].mean(1))
    mean = per[rows].mean(1)
    ci = lambda v: [round(float(np.percentile(v, 2.5)), 3), round(float(np.percentile(v, 97.5)), 3)]  # noqa: E731
    return {
        "psnr_pooled": float(_psnr(mse.mean())),
        "psnr_pooled_ci95": ci(pooled),
        "psnr_mean": float(per.mean()),
        "psnr_mean_ci95": ci(mean),
        "mse": float(mse.mean()),
    }


def psnr_cells(report: dict) -> dict:
    """A table row's PSNR fields from an `evaluate` report (None where it has no reference)."""
    return {
        "psnr_db": report.get("psnr_vs_reference"),
        "psnr_ci95": report.get("psnr_ci95"),
        "psnr_pooled_db": report.get("psnr_pooled_vs_reference"),
        "psnr_pooled_ci95": report.get("psnr_pooled_ci95"),
    }


def format_psnr(row: dict) -> str:
    """'mean [lo, hi] / pooled [lo, hi]' for a markdown cell; '—' without a reference."""
    if row.get("psnr_db") is None:
        return "—"
    out = f"{row['psnr_db']:.2f}"
    if row.get("psnr_ci95"):
        out += " [{:.2f}, {:.2f}]".format(*row["psnr_ci95"])
    if row.get("psnr_pooled_db") is not None:
        out += f" / {row['psnr_pooled_db']:.2f}"
        if row.get("psnr_pooled_ci95"):
            out += " [{:.2f}, {:.2f}]".format(*row["psnr_pooled_ci95"])
    return out


def read_samples(path: str | Path, expect_shape: tuple[int, ...] = (1, 8, 8)) -> tuple[np.ndarray, dict]:
    """(samples clipped to [−1, 1], file contents besides samples) from a `dqc sample` .npz, checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; make one with `dqc sample MODEL -o {path.name}`")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:  # zip or format errors from numpy
        raise ConfigError(f"{path}: not a readable .npz file ({e})") from e
    if "samples" not in data:
        have = sorted(data) or "nothing"
        raise ConfigError(f"{path}: no 'samples' array (it has {have}); write it with `dqc sample`")
    x = data.pop("samples")
    if x.ndim != 4 or tuple(x.shape[1:]) != expect_shape:
        want = ", ".join(map(str, expect_shape))
        raise ConfigError(f"{path}: samples have shape {tuple(x.shape)}; the digits classifier takes (N, {want})")
    if len(x) < 2:
        raise ConfigError(f"{path}: {len(x)} sample(s); a Fréchet distance needs at least 2")
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"{path}: samples are {x.dtype}; expected floating-point images scaled to [-1, 1]")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ConfigError(f"{path}: samples contain {bad} NaN/Inf values (a diverged sampler or engine?)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ConfigError(f"{path}: samples span [{lo:.3g}, {hi:.3g}]; dqc eval expects images scaled to [-1, 1]")
    return np.clip(x, -1, 1).astype(np.float32), data


def _file_meta(data: dict) -> dict:
    if "meta" not in data:
        return {}
    try:
        return json.loads(str(data["meta"]))
    except ValueError:
        return {}


def _digits_of(path, prompts: list[str], n: int) -> np.ndarray:
    """The digit each prompt of a text pipeline's sample file asks for (tools.reference.prompts.parse_digit)."""
    from tools.reference.prompts import parse_digit

    if len(prompts) != n:
        raise ConfigError(f"{path}: {len(prompts)} prompts for {n} samples; pass --labels")
    try:
        return np.array([parse_digit(p) for p in prompts], dtype=np.int64)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def evaluate(
    samples_path: str | Path,
    *,
    reference: str | Path | None = None,
    labels: str | None = None,
    classifier: str | Path | None = None,
    fid_inception: bool = False,
    inception_weights: str | Path | None = None,
) -> dict:
    """`dqc eval`: fd, accuracy, psnr/mse vs reference, n, seeds — one dict, JSON-ready."""
    from tools.deploy.pipeline import parse_labels
    from tools.reference.digits import NUM_CLASSES, load_digits_split

    x, data = read_samples(samples_path)
    n = len(x)
    if labels is not None:
        y = parse_labels(labels, n, NUM_CLASSES + 1, flag="--labels")
    elif "labels" in data:
        try:
            y = np.asarray(data["labels"]).astype(np.int64).reshape(-1)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{samples_path}: labels are not integers ({e}); pass --labels to override") from e
        if len(y) != n:
            raise ConfigError(f"{samples_path}: {len(y)} labels for {n} samples")
    elif _file_meta(data).get("prompts"):
        y = _digits_of(samples_path, _file_meta(data)["prompts"], n)
    else:
        y = None
    if y is not None and (y.min() < 0 or y.max() >= NUM_CLASSES):
        where = "--labels" if labels is not None else f"{samples_path}: labels"
        raise ConfigError(f"{where} must be digits 0..{NUM_CLASSES - 1} (got {y.min()}..{y.max()})")

    net = load_classifier(classifier)
    _, test = load_digits_split()
    meta = _file_meta(data)
    report: dict = {
        "samples": str(samples_path),
        "n": n,
        "seed": meta.get("seed"),
        "sampler": {k: meta.get(k) for k in ("source", "sampler", "steps", "eta", "guidance")},
        "fd": frechet_distance(features(net, x), features(net, test.images)),
        "fd_reference_set": f"digits held-out test split ({len(test.images)} images), classifier penultimate features",
        "accuracy": None if y is None else float((classify(net, x) == y).mean()),
    }
    if reference is not None:
        r, rdata = read_samples(reference)
        if len(r) != n:
            raise ConfigError(
                f"{reference}: {len(r)} reference samples for {n} in {samples_path}; "
                "draw both with the same -n and --seed"
            )
        rseed = _file_meta(rdata).get("seed")
        if rseed is not None and report["seed"] is not None and rseed != report["seed"]:
            raise ConfigError(
                f"{reference}: drawn with seed {rseed}, {samples_path} with seed {report['seed']}; "
                "PSNR compares samples from identical seeds"
            )
        p = psnr_report(x, r)
        report["psnr_vs_reference"], report["mse_vs_reference"] = p["psnr_mean"], p["mse"]
        report["psnr_ci95"] = p["psnr_mean_ci95"]
        report["psnr_pooled_vs_reference"], report["psnr_pooled_ci95"] = p["psnr_pooled"], p["psnr_pooled_ci95"]
        report["psnr_definition"] = (
            "psnr_vs_reference: mean of per-sample 10·log10(4/MSE_i) on samples clipped to [-1, 1]; "
            "psnr_pooled_vs_reference: 10·log10(4/mean MSE); intervals: 95 % bootstrap over samples"
        )
        report["reference"] = str(reference)
    if fid_inception:
        report["fid_inception"], report["fid_inception_note"] = inception_fid(x, test.images, inception_weights)
    return report


def inception_fid(x: np.ndarray, real: np.ndarray, weights: str | Path | None) -> tuple[float | None, str]:
    """Standard FID with pytorch-fid's Inception-v3 (pool3, 2048-d) when the package and its weights are
    local; otherwise (None, why). Nothing is downloaded: the weights must be in the torch hub cache or given."""
    try:
        import torch
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError:
        return None, "pytorch-fid is not installed (pip install pytorch-fid); standard FID skipped"
    import os
    import tempfile

    name = os.path.basename(FID_WEIGHTS_URL)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if weights is None and not cached.is_file():
        return None, f"Inception weights not found at {cached}; pass --inception-weights FILE ({name}); FID skipped"
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        if weights is not None:
            wpath = Path(weights).resolve()
            if not wpath.is_file():
                raise ConfigError(f"--inception-weights {weights}: no such file")
            (Path(hub) / "checkpoints").mkdir()
            os.symlink(wpath, Path(hub) / "checkpoints" / name)
            torch.hub.set_dir(hub)  # load_state_dict_from_url then finds the file and does not download
        try:
            net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        finally:
            torch.hub.set_dir(old)

    def feats(imgs: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(imgs), 100):
                b = torch.from_numpy((imgs[i : i + 100] + 1) / 2).repeat(1, 3, 1, 1)
                out.append(net(b)[0].squeeze(-1).squeeze(-1).double().numpy())
        return np.concatenate(out)

    return frechet_distance(feats(x), feats(real)), "pytorch-fid Inception-v3 pool3 vs the held-out test split"
