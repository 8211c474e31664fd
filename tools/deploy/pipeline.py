"""What the CLI verbs call: one function each, driving the stages through their files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from runtime.bundle import MANIFEST, load_bundle
from runtime.engine import EngineSet, OrtEngine, TorchEngine, timestep_key
from runtime.errors import ConfigError, DqcError
from runtime.sampler import SamplerConfig, SampleRun, sample


def compile_model(
    model_dir,
    out: str | Path,
    cfg,
    *,
    scheduler: str | Path | None = None,
    overwrite: bool = False,
    calibration_out: str | Path | None = None,
    ptqd_samples: int | None = None,
    mixed_bits: str | None = None,
    switch_t: int | None = None,
    calib_prompts: str | Path | None = None,
    text_encoder: str = "fp32",
    w4_linear: str = "int8",
    sampler_given: bool = True,
    progress: bool = True,
) -> Path:
    """Calibrate + export: a model directory (or an already loaded model) in, a bundle directory out;
    with `ptqd_samples`, also gather PTQD statistics on the written bundle's engines. `mixed_bits` adds a
    second, cheaper precision (step-aware mixed precision): both are calibrated alike, their statistics
    gathered along the same trajectories, and the switch between them chosen by PTQD's SNR criterion
    (or set with `switch_t`). `text_encoder`: a text pipeline's text encoder in fp32 or w8a8. `w4_linear`: how
    4-bit Linear weights ship on ONNX Runtime (exporter.bundle_writer.W4_LINEAR). `sampler_given`: cfg.sampler was
    chosen by the user; if not, a flow-matching model is calibrated for its Euler flow solver instead."""
    import dataclasses

    from calibration.calibrate import calibrate
    from calibration.config import parse_bits
    from calibration.model_io import LoadedModel, load_model
    from exporter.bundle_writer import write_bundle
    from tools.reference.model import default_calib_prompts, resolve_model

    if mixed_bits is not None:
        high, low = parse_bits(cfg.bits), parse_bits(mixed_bits)
        if low == high or low.weight > high.weight or low.activation > high.activation:
            raise ConfigError(f"--mixed-bits {mixed_bits}: must be cheaper than --bits {cfg.bits} (no more weight "
                              "or activation bits, and not the same)")  # fmt: skip
        if not ptqd_samples:
            raise ConfigError("--mixed-bits: the switch between precisions is chosen from PTQD statistics; add --ptqd")
    elif switch_t is not None:
        raise ConfigError("--switch-t needs --mixed-bits (a second precision to switch to)")
    from exporter.publish import check_output

    check_output(Path(out), overwrite)  # before any work: calibration can take hours
    from exporter.bundle_writer import check_w4_linear

    check_w4_linear(w4_linear, [cfg] + ([dataclasses.replace(cfg, bits=mixed_bits)] if mixed_bits else []))
    if calibration_out is not None and Path(calibration_out).is_dir():
        raise ConfigError(f"--save-calibration {calibration_out}: is a directory; give a file path")
    from runtime.text import read_prompts

    calib_prompts = default_calib_prompts(model_dir) if calib_prompts is None else calib_prompts
    prompts = () if calib_prompts is None else tuple(read_prompts(calib_prompts, "--calib-prompts"))
    model_dir = resolve_model(model_dir)
    model = model_dir if isinstance(model_dir, LoadedModel) else load_model(model_dir, scheduler, device=cfg.device,
                                                                            prompts=prompts)  # fmt: skip
    cfg = _flow_sampler(model, cfg, sampler_given)
    configs = [cfg] + ([dataclasses.replace(cfg, bits=mixed_bits)] if mixed_bits else [])
    if model.text is not None and not model.text.prompts:
        raise ConfigError(f"{model.source}: a text-to-image pipeline is calibrated on prompts; pass --calib-prompts "
                          "FILE (one prompt per line)")  # fmt: skip
    if text_encoder != "fp32" and model.text is None:
        raise ConfigError(f"--text-encoder {text_encoder}: {model.source} has no text encoder (only text-to-image "
                          "pipelines do); leave the flag out")  # fmt: skip
    if mixed_bits and model.schedule.prediction_type not in ("epsilon", "flow"):
        raise ConfigError(f"--mixed-bits: the switch criterion compares the prediction's SNR with the state's for ε "
                          f"(PTQD Eq. 15) and flow velocities; {model.source} predicts "
                          f"{model.schedule.prediction_type}: compile one precision")  # fmt: skip
    results = [calibrate(model, cfg, progress=progress)]
    for c in configs[1:]:  # same weight bits: reuse the weights (unless BRECQ learns them with the activations)
        same = parse_bits(c.bits).weight == parse_bits(cfg.bits).weight and cfg.weight_rounding != "brecq"
        results.append(calibrate(model, c, weights=results[0].weights if same else None, progress=progress))
    if calibration_out is not None:
        results[0].save(calibration_out)
    model.unet.cpu()

    def add_statistics(staged: Path) -> None:  # PTQD statistics on the staged engines: the bundle appears whole
        gather_ptqd(staged, model, cfg.sampler_config, samples=ptqd_samples, seed=cfg.seed,
                    batch_size=cfg.batch_size, switch_t=switch_t, progress=progress)  # fmt: skip

    return write_bundle(model, results, out, overwrite=overwrite, progress=progress,
                        before_publish=add_statistics if ptqd_samples else None, text_encoder=text_encoder,
                        w4_linear=w4_linear)  # fmt: skip


def _flow_sampler(model, cfg, sampler_given: bool):
    """cfg for the model's sampler family: a flow-matching model is calibrated for --sampler euler (its Euler flow
    solver; the default for it), a DDPM-family model for ddim or ddpm."""
    import dataclasses

    flow = getattr(model.schedule, "kind", None) == "flow"
    if flow and cfg.sampler != "euler":
        if sampler_given:
            raise ConfigError(f"--sampler {cfg.sampler}: {model.source} is a flow-matching model (FlowMatch"
                              "EulerDiscreteScheduler), sampled with --sampler euler; drop the flag")  # fmt: skip
        cfg = dataclasses.replace(cfg, sampler="euler", eta=0.0)
    if flow:  # groups, calibration rows and PTQD rows key a step by timestep_key(t): two steps must not share one
        keys = timestep_key(model.schedule.timesteps(cfg.steps))
        if len(set(keys.tolist())) != len(keys):
            raise ConfigError(f"--steps {cfg.steps}: with shift {model.schedule.shift:g} some Euler steps lie within "
                              "one training timestep of each other, and dqc keys steps by training timestep; use "
                              "fewer steps")  # fmt: skip
        return cfg
    if not flow and cfg.sampler == "euler":
        raise ConfigError(f"--sampler euler: the Euler flow solver needs a flow-matching model; {model.source} is a "
                          "DDPM-family diffusion model: use ddim or ddpm")  # fmt: skip
    return cfg


def gather_ptqd(bundle_dir, model, sampler_cfg, *, samples: int, seed: int, batch_size: int,
                switch_t: int | None = None, progress: bool = True) -> Path:  # fmt: skip
    """(Re)gather a bundle's PTQD statistics for the deployment sampler `sampler_cfg`, for every precision
    it holds, along the same FP trajectories of the loaded `model`, and store them (replacing any)."""
    from calibration.ptqd import gather
    from exporter.bundle_writer import add_ptqd

    bundle = load_bundle(bundle_dir)
    engines = {bits: bundle.engines(route=bundle.route(precision=bits)) for bits in bundle.manifest["precisions"]}
    tables = gather(model, engines, sampler_cfg, n=samples, seed=seed, batch_size=batch_size, progress=progress)
    return add_ptqd(bundle_dir, tables, samples=samples, switch_t=switch_t)


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_engines(path: str | Path, *, scheduler: str | Path | None = None, device: str = "cpu", route=None,
                 backend: str = "auto", hint: str | None = None, batch: int = 1, ort_engines: str = "one",
                 model=None, kv_once: bool = False):  # fmt: skip
    """(EngineSet, schedule, null_class, sampler defaults) for a bundle (on `backend`, see Bundle.engines: auto
    times the CPU backends at `batch` rows per call; `route` from Bundle.route; `ort_engines` one: one engine
    (ONNX Runtime session or OpenVINO compiled model) for all groups of a precision, per-group: one per group;
    `kv_once`: text bundles compute the cross-attention K/V once per request, Bundle.engines' prompt_cache) or a
    model directory (FP torch; `model`: the directory already loaded)."""
    if ort_engines not in ("one", "per-group"):
        raise ConfigError(f"--ort-engines {ort_engines!r}: use one or per-group")
    from tools.reference.model import resolve_model

    path = resolve_model(path)
    if is_bundle(path):
        bundle = load_bundle(path)
        cal = bundle.manifest.get("calibration", {})
        defaults = {k: cal[k] for k in ("sampler", "steps", "eta", "guidance") if k in cal}
        engines = bundle.engines(route=route, backend=backend, hint=hint, batch=batch,
                                 single=None if ort_engines == "one" else False, prompt_cache=kv_once)  # fmt: skip
        return engines, bundle.schedule, bundle.null_class, defaults
    from calibration.model_io import load_model

    if backend not in ("auto", "torch"):
        raise ConfigError(f"--backend {backend}: {path} is a model directory, which runs in full precision on torch")
    if model is None:  # else a model directory loaded by the caller
        model = load_model(path, scheduler, device=device)
    engine = TorchEngine(model.wrapper(), model.spec, device=device)
    flow = getattr(model.schedule, "kind", None) == "flow"
    return EngineSet.single(engine), model.schedule, model.null_class, {"sampler": "euler"} if flow else {}


def parse_labels(text: str | None, n: int, num_class_embeds: int | None, flag: str = "--class-label"
                 ) -> np.ndarray | None:  # fmt: skip
    """'3' → all 3; '0,1,2' → cycled to n; None → cycle the real classes 0..K−2 (K−1 is the null class).
    `flag` names the option the text came from in errors."""
    if num_class_embeds is None:
        if text is not None:
            raise ConfigError(f"{flag}: the model is unconditional; drop the flag")
        return None
    if text is None:
        return np.arange(n, dtype=np.int64) % max(num_class_embeds - 1, 1)
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag} {text!r}: expected an integer or a comma-separated list") from e
    if not values or min(values) < 0 or max(values) >= num_class_embeds:
        raise ConfigError(f"{flag} {text!r}: labels must lie in [0, {num_class_embeds})")
    return np.resize(np.asarray(values, dtype=np.int64), n)


def save_npz(path: str | Path, **arrays) -> None:
    """Atomic .npz write (temp file renamed), so a failed run leaves no partial output."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # created with the umask's permissions (mkstemp's would be 0600)
            np.savez(f, **{k: v for k, v in arrays.items() if v is not None})

    _replace_atomically(Path(path), write)


def save_samples(path: str | Path, samples: np.ndarray, labels: np.ndarray | None, meta: dict) -> None:
    """A sample file as `dqc eval` reads it: samples (float32, clipped to [−1, 1]), labels, meta (JSON)."""
    save_npz(path, samples=samples, labels=labels, meta=np.array(json.dumps(meta)))


def check_output_file(path: str | Path | None, flag: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: a directory, or one whose
    parent is a file."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file path inside it")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory")


def _replace_atomically(path: Path, write) -> None:
    """write(tmp) then rename over `path`; the temporary file never outlives a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str | bytes) -> None:
    """Atomic text (or bytes) write."""
    _replace_atomically(Path(path), lambda tmp: tmp.write_bytes(text if isinstance(text, bytes) else text.encode()))


def write_json(path: str | Path, obj) -> None:
    """Atomic JSON write."""
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def save_grid_png(path: str | Path, images: np.ndarray, columns: int = 10) -> None:
    """Images in [−1, 1], (N, C, H, W), tiled row-major into one PNG, at most `columns` wide and no wider than
    N; small images are enlarged (nearest neighbour, up to ×4) until a tile is 64 pixels across, larger ones
    (a decoded latent image) stay at their size."""
    from PIL import Image

    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    zoom = max(1, min(4, 64 // max(h, w)))
    rows = -(-n // columns)
    grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
    for i, img in enumerate(images):
        r, k = divmod(i, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = (
            img.transpose(1, 2, 0) + 1
        ) / 2
    pixels = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    pixels = pixels[..., 0] if c == 1 else pixels
    image = Image.fromarray(pixels).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST)
    _replace_atomically(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def sample_to_file(
    path: str | Path,
    out: str | Path,
    *,
    n: int,
    steps: int | None = None,
    eta: float | None = None,
    sampler: str | None = None,
    seed: int = 0,
    class_label: str | None = None,
    prompts: list[str] | None = None,
    prompts_file: str | Path | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    batch_size: int = 16,
    png: str | Path | None = None,
    scheduler: str | Path | None = None,
    ptqd: tuple[str, ...] = ("cnc", "bc", "vsc"),
    precision: str | None = None,
    switch_t: int | None = None,
    backend: str = "auto",
    hint: str | None = None,
    ort_engines: str = "one",
    kv_once: bool = False,
    progress: bool = True,
) -> SampleRun:
    """`dqc sample`: draw n samples from a bundle or a model directory into an .npz (and a PNG grid).
    A bundle's PTQD statistics, when it has them, correct each step with the `ptqd` components. A
    mixed-precision bundle follows its plan unless `precision` (one precision at every step) or `switch_t`
    (low precision at t ≥ switch_t) says otherwise. A bundle runs on `backend` (ort, openvino, trt, or auto:
    the fastest available) with OpenVINO's float parts in `hint` precision; the file records which."""
    if not 1 <= n <= 2**31 - 1:
        raise ConfigError(f"-n {n}: the number of samples must be between 1 and 2**31 - 1")
    check_output_file(out, "-o")
    check_output_file(png, "--png")
    bundle = load_bundle(path) if is_bundle(path) else None
    if bundle is None and (precision or switch_t is not None):
        raise ConfigError("--precision / --switch-t choose between a bundle's precisions; the source is a model")
    route = None if bundle is None else bundle.route(precision, switch_t)
    model = None
    if bundle is None and (prompts or prompts_file is not None or negative_prompt is not None):
        from calibration.model_io import load_model
        from tools.reference.model import resolve_model

        model = load_model(resolve_model(path), scheduler)  # a text pipeline directory, in full precision
    text = _text_request(bundle, path, n, class_label, prompts, prompts_file, negative_prompt, model)
    if kv_once and (bundle is None or not text):
        raise ConfigError(f"--kv-once: {path} is not a text-to-image bundle; the cross-attention K/V cut is for those")
    rows = min(batch_size, n)  # rows per engine call: twice that with classifier-free guidance
    if bundle is not None and bundle.spec.condition is not None:
        rows *= (
            1
            if (bundle.manifest.get("calibration", {}).get("guidance", 1.0) if guidance is None else guidance) == 1
            else 2
        )
    engines, schedule, null_class, defaults = open_engines(path, scheduler=scheduler, route=route, backend=backend,
                                                           hint=hint, batch=rows, ort_engines=ort_engines,
                                                           model=model, kv_once=kv_once)  # fmt: skip
    cfg = SamplerConfig(
        defaults.get("sampler", "ddim") if sampler is None else sampler,
        defaults.get("steps", 100) if steps is None else steps,
        defaults.get("eta", 0.0) if eta is None else eta,
        defaults.get("guidance", 1.0) if guidance is None else guidance,
    )
    labels = None if text else parse_labels(class_label, n, engines.spec.num_class_embeds)
    start = time.perf_counter()
    cond, null_cond = (labels, null_class) if not text else (text["encoder"].encode(text["prompts"]),
                                                             text["encoder"].encode([text["negative"]])[0])  # fmt: skip
    run = sample(
        engines,
        schedule,
        cfg,
        n=n,
        seed=seed,
        cond=cond,
        null_cond=null_cond,
        batch_size=batch_size,
        progress=progress,
        ptqd=bundle.ptqd(route) if ptqd and bundle is not None else None,
        ptqd_components=ptqd,
    )
    if bundle is not None:
        run.step_precisions = bundle.precision_of(route[timestep_key(run.timesteps)])
    run.engine = engine_report(engines)
    latents = None
    if text and text["decoder"] is not None:  # latent pipeline: decode to images
        latents, samples = run.samples, text["decoder"].decode(run.samples)
    else:
        samples = np.clip(run.samples, -1, 1).astype(np.float32)
    if text:
        run.truncated = text["encoder"].truncated
    meta = {
        "source": str(path),
        "seed": seed,
        "sampler": cfg.name,
        "steps": cfg.steps,
        "eta": cfg.eta,
        "guidance": cfg.guidance,
        "seconds": round(time.perf_counter() - start, 3),
        "ptqd": run.ptqd,
        "ptqd_notes": run.ptqd_notes,
        "precision_split": precision_split(run.step_precisions),
        "engine": run.engine,
    }
    if text:
        meta |= {"prompts": text["prompts"], "negative_prompt": text["negative"], "truncated": run.truncated}
    save_npz(out, samples=samples, labels=labels, latents=latents, meta=np.array(json.dumps(meta)))
    if png is not None:
        save_grid_png(png, samples)
    return run


def _text_request(bundle, path, n: int, class_label, prompts, prompts_file, negative_prompt, model=None) -> dict:
    """For a text bundle, or a text pipeline directory (`model`, loaded; full precision on torch): its prompt
    encoder and VAE decoder, the n prompts (given ones cycled) and the negative prompt; {} for other sources,
    which must then get no prompt flags."""
    from runtime.text import PromptEncoder, VaeDecoder, read_prompts

    given = list(prompts or []) + (read_prompts(prompts_file) if prompts_file is not None else [])
    spec = bundle.spec if bundle is not None else None if model is None else model.spec
    if spec is None or spec.condition != "encoder_hidden_states":
        if given or negative_prompt is not None:
            flag = "--prompt" if prompts else "--prompts-file" if prompts_file else "--negative-prompt"
            takes = "--class-label" if spec is not None and spec.num_class_embeds else "no condition"
            kind = "bundle" if bundle is not None else "model"
            raise ConfigError(f"{flag}: {path} is not a text-to-image {kind}; it takes {takes}")
        return {}
    kind = "bundle" if bundle is not None else "pipeline"
    if class_label is not None:
        raise ConfigError(f"--class-label: {path} is a text-to-image {kind}; pass --prompt or --prompts-file")
    if not given:
        raise ConfigError(f'{path} is a text-to-image {kind}: pass --prompt "..." or --prompts-file FILE')
    if any(not p.strip() for p in given):
        raise ConfigError("--prompt: an empty prompt; use --guidance 1 with a prompt, or give text")
    if bundle is not None:
        components = bundle.manifest.get("components", {})
        encoder = PromptEncoder(bundle.root, components)
        decoder = VaeDecoder(bundle.root, components) if "vae_decoder" in components else None
    else:
        encoder, decoder = _TorchPrompts(model.text), None if model.vae is None else _TorchDecoder(model.vae)
    return {"encoder": encoder, "decoder": decoder, "prompts": [given[i % len(given)] for i in range(n)],
            "negative": negative_prompt or ""}  # fmt: skip


class _TorchPrompts:
    """A text pipeline directory's own tokenizer and text encoder (torch, full precision), as the bundle's
    PromptEncoder is called."""

    def __init__(self, text) -> None:
        self.text, self.truncated = text, []

    def encode(self, prompts: list[str]) -> np.ndarray:
        from runtime.text import note_truncated

        note_truncated(self.text.tokenizer, prompts, self.text.context_shape[0], self.truncated)
        return self.text.encode(prompts)


class _TorchDecoder:
    """A pipeline directory's AutoencoderKL decoder (torch, full precision), scaled as the bundle's graph is."""

    def __init__(self, vae) -> None:
        from exporter.components import DecodeForward

        self.forward = DecodeForward(vae)

    def decode(self, latents: np.ndarray, batch_size: int = 8) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = [self.forward(torch.from_numpy(latents[lo : lo + batch_size])).float().numpy()
                   for lo in range(0, len(latents), batch_size)]  # fmt: skip
        return np.clip(np.concatenate(out), -1, 1).astype(np.float32)


def engine_report(engines) -> dict:
    """What ran a sampling run: the backend, its version and, for OpenVINO, the float parts' precision."""
    from runtime.engine import OrtEngine, TorchEngine
    from runtime.openvino import OpenVinoEngine
    from runtime.openvino_single import OpenVinoGroup
    from runtime.single_engine import GroupEngine

    engine = (engines.resident or [engines.for_timestep(0)])[-1]
    chosen = {} if engines.choice is None else {"auto": engines.choice}
    if isinstance(engine, OpenVinoEngine | OpenVinoGroup):
        from runtime.openvino import openvino_version

        models = "one for all groups" if isinstance(engine, OpenVinoGroup) else "one per group"
        engine = engine.single.engine if isinstance(engine, OpenVinoGroup) else engine
        return {"backend": "openvino", "version": openvino_version(), "precision_hint": engine.execution_precision,
                "requested_hint": engine.config.get("INFERENCE_PRECISION_HINT"), "weights": engine.weights,
                "compiled_models": models, **chosen}  # fmt: skip
    if isinstance(engine, OrtEngine | GroupEngine):
        import onnxruntime

        sessions = "one for all groups" if isinstance(engine, GroupEngine) else "one per group"
        return {"backend": "ort", "version": onnxruntime.__version__, "sessions": sessions, **chosen}
    if isinstance(engine, TorchEngine):
        import torch

        return {"backend": "torch", "version": torch.__version__, "dtype": engine.dtype}
    from runtime.tensorrt import tensorrt_version

    return {"backend": "trt", "version": tensorrt_version()}


def precision_split(step_precisions: list[str]) -> list[dict]:
    """Runs of consecutive sampling steps on one precision: [{"bits", "step_from", "step_to"}]."""
    out = []
    for i, bits in enumerate(step_precisions):
        if out and out[-1]["bits"] == bits:
            out[-1]["step_to"] = i
        else:
            out.append({"bits": bits, "step_from": i, "step_to": i})
    return out


def bundle_info(path: str | Path) -> dict:
    """`dqc info`: groups with their step ranges, bits, profile, files and sizes."""
    bundle = load_bundle(path)
    m = bundle.manifest
    table = bundle.group_of_t
    tables = bundle.ptqd()
    ranges, start = [], 0
    for t in range(1, len(table) + 1):
        if t == len(table) or table[t] != table[start]:
            ranges.append({"group": int(table[start]), "t_from": start, "t_to": t - 1})
            start = t
    steps = timestep_key(bundle.schedule.timesteps(int(m.get("calibration", {}).get("steps", 100))))
    step_ranges, start = [], 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or table[steps[i]] != table[steps[start]]:
            step_ranges.append({"group": int(table[steps[start]]), "step_from": start, "step_to": i - 1,
                                "t_from": int(steps[start]), "t_to": int(steps[i - 1])})  # fmt: skip
            start = i
    return {
        "bundle": str(bundle.root),
        "format_version": m["format_version"],
        "target": m["target"],
        "bits": m["bits"],
        "model": {k: m["model"].get(k) for k in ("class", "weight_sha256", "source")},
        "inputs": bundle.spec.names,
        "components": m.get("components", {}),
        "calibration": {k: v for k, v in m.get("calibration", {}).items() if k != "stats"},
        "groups": m["groups"],
        "timestep_ranges": ranges,
        "step_ranges": step_ranges,
        "ptqd": None if tables is None else {bits: ptqd_summary(t) for bits, t in tables.tables.items()},
        "precisions": {
            b: {k: v for k, v in p.items() if k != "timestep_to_group"} for b, p in bundle.precisions.items()
        },  # fmt: skip
        "precision_plan": m.get("precision_plan"),
        "quantized_nodes": len(m.get("quantized_nodes", [])),
        "shared_input_qdq": len(m.get("shared_input_qdq", {})),
        "w4_linear": m.get("w4_linear"),
        "float_nodes": m.get("float_nodes", []),
        "files": {name: (bundle.root / name).stat().st_size for name in m["files"]},
    }


def ptqd_summary(tables) -> dict:
    """What `dqc info` shows of a bundle's PTQD statistics."""
    return {
        "sampler": tables.sampler,
        "steps": tables.steps,
        "eta": tables.eta,
        "k_range": [round(float(tables.k.min()), 4), round(float(tables.k.max()), 4)],
        "k_positive_share": round(float((tables.k > 0).mean()), 3),
        "sigma_q_range": [round(float(tables.sigma_q.min()), 4), round(float(tables.sigma_q.max()), 4)],
        "bias_abs_max": round(float(np.abs(tables.bias).max()), 4),
        "k_fallback": list(tables.k_fallback),
        "cnc_guard_off": list(tables.cnc_off),
    }


def ptqd_plot(path: str | Path, schedule, tables) -> None:
    """k_t, σ_q,t and VSC's σ'_t/σ_t per step (the sampler's own noise kept after VSC, with CNC's σ_q')."""
    from runtime.ptqd import calibrated_sigma, eps_coefficient
    from runtime.sampler import noise_sigma, step_alphas
    from tools.plots import line_chart_png

    ratio = []
    for i, t in enumerate(tables.timesteps):
        if tables.sampler == "euler":  # the Euler flow solver draws no noise: no VSC ratio
            ratio.append(None)
            continue
        prev = int(tables.timesteps[i + 1]) if i + 1 < len(tables.timesteps) else -1
        a_t, a_prev = step_alphas(schedule, tables.sampler, int(t), prev)
        sigma = noise_sigma(tables.sampler, tables.eta, a_t, a_prev, prev)
        sq = tables.sigma_q[i] / (1 + tables.at(int(t))[0])  # σ_q' as the sampler uses it (CNC guard included)
        ratio.append(calibrated_sigma(sigma, eps_coefficient(tables.sampler, a_t, a_prev, sigma), sq) / sigma
                     if sigma > 0 else None)  # fmt: skip
    labels = [str(i) if i % 10 == 0 else "" for i in range(len(tables.timesteps))]
    series = {"k_t": tables.k.tolist(), "sigma_q,t": tables.sigma_q.tolist()}
    if any(r is not None for r in ratio):
        series["VSC sigma'_t / sigma_t"] = ratio
    line_chart_png(path, labels, series,
                   title=f"PTQD statistics ({tables.sampler} {tables.steps} steps, eta {tables.eta:g})",
                   y_label="value", x_label="sampling step (0 = noisiest)")  # fmt: skip


def precision_plot(path: str | Path, plan: dict) -> None:
    """log10 of each precision's SNR_Q and of the diffusion's SNR_F per step: the low precision runs while
    its SNR_Q stays above SNR_F (PTQD Eq. 15)."""
    from tools.plots import line_chart_png

    snr = plan["snr"]
    n_low = plan["steps"][plan["low"]]
    series = {f"SNR_Q {b}": [None if v is None else float(np.log10(v)) for v in snr[b]]
              for b in (plan["low"], plan["high"])}  # fmt: skip
    series["SNR_F (diffusion)"] = [float(np.log10(v)) for v in snr["diffusion"]]
    labels = [str(i) if i % 10 == 0 else "" for i in range(len(snr["timesteps"]))]
    line_chart_png(path, labels, series, y_label="log10 SNR", x_label="sampling step (0 = noisiest)",
                   title=f"mixed precision: {plan['low']} on steps 0-{n_low - 1}, {plan['high']} after "
                   f"(switch t = {plan['switch_t']})")  # fmt: skip


def gac_plot(path: str | Path, record: dict) -> None:
    """GAC's learned sample weights against the timestep: per calibrated timestep, the ω mass there over its
    share of rows (1: uniform), the mean over the reconstructed blocks and the lowest and highest block."""
    from tools.plots import line_chart_png

    steps = sorted({t for unit in record.values() for t in unit["timesteps"]})
    ratio: dict[int, list[float]] = {t: [] for t in steps}
    for unit in record.values():
        for t, m, u in zip(unit["timesteps"], unit["mass"], unit["uniform_mass"], strict=True):
            ratio[t].append(m / u if u > 0 else 0.0)
    series = {"mean over blocks": [float(np.mean(ratio[t])) for t in steps],
              "lowest block": [float(np.min(ratio[t])) for t in steps],
              "highest block": [float(np.max(ratio[t])) for t in steps]}  # fmt: skip
    line_chart_png(path, [str(t) for t in steps], series, hline=("uniform", 1.0), y_label="omega mass / uniform",
                   x_label="calibrated timestep t", title=f"GAC sample weights ({len(record)} blocks)")  # fmt: skip


def group_plots(path: str | Path, out_dir: str | Path) -> list[Path]:
    """`dqc info --plots`: the timestep→group map over the calibrated sampler's steps and, for a searched
    bundle, the evolution of σ during the search; PTQD's statistics, the precision plan and GAC's sample
    weights where the bundle has them."""
    from tools.plots import group_map_png, sigma_evolution_png

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--plots {out_dir}: is a file; give a directory for the charts")
    bundle = load_bundle(path)
    cal = bundle.manifest.get("calibration", {})
    steps = timestep_key(bundle.schedule.timesteps(int(cal.get("steps", 100))))
    search = cal.get("stats", {}).get("group_search")
    drawn = {int(t): n for t, n in (search or {}).get("draws", {}).items()}
    out = Path(out_dir)
    written = [out / "group_map.png"]
    title = f"timestep -> group ({len(bundle.manifest['groups'])} groups, {cal.get('sampler')} {len(steps)} steps)"
    group_map_png(written[0], [int(t) for t in steps], [int(bundle.group_of_t[t]) for t in steps], title=title,
                  drawn=drawn)  # fmt: skip
    routed = bundle.ptqd()
    for bits, tables in (routed.tables if routed is not None else {}).items():
        written.append(out / ("ptqd.png" if len(routed.tables) == 1 else f"ptqd_{bits}.png"))
        ptqd_plot(written[-1], bundle.schedule, tables)
    plan = bundle.manifest.get("precision_plan")
    if plan:
        written.append(out / "precision.png")
        precision_plot(written[-1], plan)
    if search and search.get("history") and search.get("sigma_rows"):
        written.append(out / "sigma_evolution.png")
        assignment = {int(t): g for t, g in search["assignment"].items()}
        sigma_evolution_png(written[-1], search["history"], assignment, search["sigma_rows"],
                            title="group search: importance weights sigma (APQ-DM Eq. 6)")  # fmt: skip
    gac = cal.get("stats", {}).get("reconstruction", {}).get("gac")
    if gac:
        written.append(out / "gac_weights.png")
        gac_plot(written[-1], gac)
    return written


def fp32_engine(model, workdir: str | Path, *, spin: bool = True) -> OrtEngine:
    """A full-precision ONNX Runtime engine of a loaded model (the latency yardstick); `spin` as the
    engines it is compared with (a multi-group set's sessions do not spin-wait)."""
    from exporter.large_model import save
    from exporter.onnx_export import export_float

    path = save(export_float(model), Path(workdir) / "fp32.onnx")
    return OrtEngine(path, model.spec, spin=spin)


def latency_ratio(engines: dict[str, object], spec, *, batch: int = 1, reps: int = 20, seed: int = 0) -> dict:
    """Median per-call latency of each engine on one input, runs interleaved in one process."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spec.sample_shape), dtype=np.float32)
    ts = np.full(batch, spec.num_train_timesteps // 2, np.int64)
    from runtime.engine import example_cond

    labels = example_cond(spec, batch, rng)  # class labels, or prompt embeddings for text models
    times: dict[str, list[float]] = {k: [] for k in engines}
    for e in engines.values():
        e.infer(x, ts, labels)  # warm-up: session creation and first-run allocations
    for _ in range(reps):
        for name, e in engines.items():
            start = time.perf_counter()
            e.infer(x, ts, labels)
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_ms": 1e3 * float(np.median(v)),
            "p10_ms": 1e3 * float(np.percentile(v, 10)),
            "p90_ms": 1e3 * float(np.percentile(v, 90)),
        }
        for name, v in times.items()
    }


__all__ = ["DqcError", "bundle_info", "compile_model", "fp32_engine", "latency_ratio", "sample_to_file"]
