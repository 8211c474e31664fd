"""Training of the shipped reference model (`dqc train-reference`): a class-conditional DDPM on the
scikit-learn digits training split, and the small CNN classifier whose penultimate features `dqc eval`
uses. Both are seeded and log their loss; the diffusion model keeps an EMA of its weights, which is what
ships.

Diffusion objective (DDPM, Ho et al. 2020, eq. 14): E_{x0,t,eps} ||eps − eps_θ(√ᾱ_t x0 + √(1−ᾱ_t) eps, t, c)||²,
with the class label replaced by the null class with probability `class_dropout` so that one network gives
both terms of classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import ConfigError

REFERENCE_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=32,
    num_class_embeds=11,  # digits 0..9 and the null class 10
)
# clip_sample does not enter training (only ᾱ_t does). It is off because clipping x̂_0 while the DDIM
# direction keeps the unclipped guided ε breaks classifier-free guidance on this model (model card).
# The text pipeline (`reference-text`): the same UNet widths, with self- and cross-attention (4 heads of 32) at
# 4×4 instead of self-attention alone, conditioned on a small CLIP text encoder trained with it from scratch.
REFERENCE_TEXT_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    cross_attention_dim=64,
    attention_head_dim=4,  # UNet2DConditionModel reads it as the number of heads
)
REFERENCE_TEXT_ENCODER = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16
)
REFERENCE_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
# The transformer reference (`reference-dit`): a class-conditional DiT (adaLN-Zero, 2×2 patches: 16 tokens of an 8×8
# digit, 6 blocks of width 128 = 4 heads of 32) trained with flow matching, sampled with the Euler flow solver.
REFERENCE_DIT = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    patch_size=2,
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=32,
    num_embeds_ada_norm=10,  # the digits; the label table's 11th row is the null class of guidance
)
REFERENCE_FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)


@dataclass(frozen=True)
class DiffusionTrainConfig:
    steps: int = 8000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 250
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    class_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 1000
    log_every: int = 50


# The text pipeline's steps cost about 1.5× the class model's (the transformer blocks); its defaults keep
# training near an hour on two CPU cores.
TEXT_TRAIN = DiffusionTrainConfig(steps=6000, batch_size=96)
DIT_TRAIN = DiffusionTrainConfig(steps=8000, batch_size=128)


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"


def _lr_factor(step: int, cfg: DiffusionTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


class _DdpmObjective:
    """DDPM (Ho et al. 2020, eq. 14): x_t = √ā_t x_0 + √(1−ā_t) ε with t uniform over 0..T−1; target ε."""

    def scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**REFERENCE_SCHEDULER)

    def noisy(self, scheduler, x0, gen):
        """(x_t, t, target) for a batch; draws t, then ε, from `gen`."""
        import torch

        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        a = scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps

    def scheduler_config(self) -> dict:
        return REFERENCE_SCHEDULER


class _ClassTask(_DdpmObjective):
    """The class-conditional model: labels, with the null class for dropped conditions."""

    text = False

    def __init__(self, dev, out: Path) -> None:
        self.null = REFERENCE_UNET["num_class_embeds"] - 1

    def build(self):
        from diffusers import UNet2DModel

        from tools.reference.denoisers import ClassDenoiser

        return ClassDenoiser(UNet2DModel(**REFERENCE_UNET))

    def condition(self, y, drop, gen):
        y = y.clone()
        y[drop] = self.null
        return y

    def save(self, model, scheduler, root: Path) -> None:
        _save_pipeline({"unet": model.unet}, scheduler, root)

    def describe(self) -> dict:
        return {"unet": _listed(REFERENCE_UNET)}


class _TextTask(_DdpmObjective):
    """The text-conditioned pipeline: a random training template names each image's digit; a dropped condition is
    the empty prompt (what the sampler's negative prompt defaults to)."""

    text = True

    def __init__(self, dev, out: Path) -> None:
        import torch
        from transformers import CLIPTokenizer
        from transformers.utils import logging as hf_logging

        from tools.reference.prompts import MAX_LENGTH, TRAIN_TEMPLATES, prompt, save_tokenizer

        hf_logging.disable_progress_bar()
        self.tok_dir = save_tokenizer(out / ".tokenizer")
        tok = CLIPTokenizer.from_pretrained(str(self.tok_dir), local_files_only=True)
        table = [[prompt(t, d) for d in range(10)] for t in TRAIN_TEMPLATES]
        ids = [tok(row, padding="max_length", max_length=MAX_LENGTH).input_ids for row in table]
        self.ids = torch.tensor(ids, dtype=torch.int64, device=dev)  # (templates, 10, L)
        self.null = torch.tensor(tok("", padding="max_length", max_length=MAX_LENGTH).input_ids, device=dev)
        self.vocab = len(tok)

    def encoder_config(self):
        from transformers import CLIPTextConfig

        v = self.vocab
        return CLIPTextConfig(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1,
                              **REFERENCE_TEXT_ENCODER)  # fmt: skip

    def build(self):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        from tools.reference.denoisers import TextDenoiser

        return TextDenoiser(UNet2DConditionModel(**REFERENCE_TEXT_UNET), CLIPTextModel(self.encoder_config()))

    def condition(self, y, drop, gen):
        import torch

        template = torch.randint(0, self.ids.shape[0], (len(y),), generator=gen).to(y.device)
        ids = self.ids[template, y]
        ids[drop] = self.null
        return ids

    def save(self, model, scheduler, root: Path) -> None:
        _save_pipeline({"unet": model.unet, "text_encoder": model.text_encoder}, scheduler, root, self.tok_dir)

    def describe(self) -> dict:
        from tools.reference.prompts import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES

        encoder = REFERENCE_TEXT_ENCODER | {"vocab_size": self.vocab}
        return {"unet": _listed(REFERENCE_TEXT_UNET), "text_encoder": encoder, "train_templates": list(TRAIN_TEMPLATES),
                "held_out_templates": list(HELD_OUT_TEMPLATES)}  # fmt: skip


class _DiTTask:
    """The transformer reference, trained with flow matching (rectified flow; Lipman et al. 2023, Liu et al. 2023):
    x_σ = (1 − σ) x_0 + σ ε with σ uniform in [0, 1), fed t = σ·T; target the velocity v = ε − x_0. Dropped labels
    become the null class (the label table's last row); DiT's own label dropout is switched off, so the seeded
    generator decides every drop."""

    text = False

    def __init__(self, dev, out: Path) -> None:
        self.null = REFERENCE_DIT["num_embeds_ada_norm"]

    def build(self):
        from diffusers import DiTTransformer2DModel

        from tools.reference.denoisers import ClassDenoiser

        dit = DiTTransformer2DModel(**REFERENCE_DIT)
        for block in dit.transformer_blocks:  # the label embedding's own random drop (training mode)
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        return ClassDenoiser(dit)

    def condition(self, y, drop, gen):
        return _ClassTask.condition(self, y, drop, gen)

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**REFERENCE_FLOW_SCHEDULER)

    def noisy(self, scheduler, x0, gen):
        """(x_σ, t = σ·T, target v) for a batch; draws ε, then σ, from `gen`."""
        import torch

        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        sigma = torch.rand(len(x0), generator=gen).to(x0.device)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * eps, sigma * scheduler.config.num_train_timesteps, eps - x0

    def scheduler_config(self) -> dict:
        return REFERENCE_FLOW_SCHEDULER

    def save(self, model, scheduler, root: Path) -> None:
        _save_pipeline({"transformer": model.unet}, scheduler, root)

    def describe(self) -> dict:
        return {"transformer": _listed(REFERENCE_DIT)}


def _listed(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def train_diffusion(
    out_dir: str | Path,
    cfg: DiffusionTrainConfig = DiffusionTrainConfig(),
    progress: bool = True,
    stop_after: int | None = None,
    text: bool = False,
    kind: str | None = None,
) -> Path:
    """Train a reference model: `kind` "class" (the class DDPM, the default), "text" (the text-conditioned
    pipeline, UNet and text encoder together; `text=True` says the same) or "dit" (the flow-matching DiT). Writes
    out_dir/{unet,scheduler}/ (+ text_encoder/, tokenizer/, model_index.json for text; transformer/ instead of unet/
    for dit; EMA weights, save_pretrained layout), out_dir/train_log.jsonl and out_dir/training.json. Resumes from
    out_dir/checkpoint.pt if present (same configuration only); `stop_after` checkpoints and returns early at that
    step."""
    import torch
    from tqdm.auto import tqdm

    from tools.reference.digits import load_digits_split

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    train, _ = load_digits_split()
    x_all = torch.from_numpy(train.images).to(dev)
    y_all = torch.from_numpy(train.labels).to(dev)
    kind = kind or ("text" if text else "class")
    if kind not in _TASKS:
        raise ConfigError(f"reference model kind {kind!r}: use one of {sorted(_TASKS)}")
    task = _TASKS[kind](dev, out)

    model = task.build().to(dev).train()
    ema = task.build().to(dev).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    scheduler = task.scheduler()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    ckpt = out / "checkpoint.pt"
    start, seconds = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        saved = state.get("config")
        if saved is not None and _trajectory(json.loads(saved)) != _trajectory(_recorded(cfg, kind)):
            raise ConfigError(
                f"{ckpt} was written with {json.loads(saved)}; resume with the same configuration "
                "or train into a new directory"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start, seconds = int(state["step"]), float(state["seconds"])
    _truncate_log(out / "train_log.jsonl", start)

    log = (out / "train_log.jsonl").open("a")
    desc = {"class": "train diffusion", "text": "train text diffusion", "dit": "train flow DiT"}[kind]
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc, disable=not progress)
    t0, running = time.perf_counter(), (state.get("running") if start else None)
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen).to(dev)
        x0, y = x_all[idx], y_all[idx]
        drop = torch.rand(cfg.batch_size, generator=gen).to(dev) < cfg.class_dropout
        c = task.condition(y, drop, gen)
        xt, t, target = task.noisy(scheduler, x0, gen)
        loss = torch.nn.functional.mse_loss(model(xt, t, c), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        if done % cfg.log_every == 0:
            elapsed = seconds + time.perf_counter() - t0
            log.write(
                json.dumps(
                    {
                        "step": done,
                        "loss": round(running, 5),
                        "lr": sched.get_last_lr()[0],
                        "seconds": round(elapsed, 1),
                    }
                )
                + "\n"
            )
            log.flush()
        if done % cfg.checkpoint_every == 0 or done in (cfg.steps, stop_after):
            elapsed = seconds + time.perf_counter() - t0
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "gen": gen.get_state(),
                    "step": done,
                    "seconds": elapsed,
                    "running": running,
                    "config": json.dumps(_recorded(cfg, kind)),
                },
                tmp,
            )
            os.replace(tmp, ckpt)
            task.save(ema, scheduler, out / f"step_{done}")
        if done == stop_after:
            log.close()
            return out
    log.close()
    elapsed = seconds + time.perf_counter() - t0
    final = out / f"step_{cfg.steps}"
    if not final.exists():
        task.save(ema, scheduler, final)
    for entry in final.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, target)
    meta = {
        "config": asdict(cfg),
        **task.describe(),
        "scheduler": task.scheduler_config(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images": len(x_all),
        "final_loss_ema": running,
        "seconds": round(elapsed, 1),
        "hardware": _hardware(dev),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(meta, indent=1))
    return out


_TASKS = {"class": _ClassTask, "text": _TextTask, "dit": _DiTTask}


def _recorded(cfg: DiffusionTrainConfig, kind: str) -> dict:
    """What a checkpoint records of its run (the class and text models' checkpoints predate `kind`)."""
    out = asdict(cfg) | {"text": kind == "text"}
    return out | {"kind": kind} if kind == "dit" else out


def _trajectory(cfg: dict) -> dict:
    """The fields that decide the weights (not where or how often they are written)."""
    return {"text": False} | {k: v for k, v in cfg.items() if k not in ("checkpoint_every", "log_every", "device")}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run starts from."""
    if not path.exists():
        return
    keep = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
    path.write_text("".join(x + "\n" for x in keep))


def _save_pipeline(modules: dict, scheduler, root: Path, tokenizer: Path | None = None) -> None:
    """modules ({folder: module}), the scheduler and, for a text pipeline, the tokenizer files and
    model_index.json and its prompt files, published whole at `root`."""
    from tools.reference.prompts import write_prompt_files

    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    for folder, module in modules.items():
        module.save_pretrained(tmp / folder, safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    if tokenizer is not None:
        shutil.copytree(tokenizer, tmp / "tokenizer")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        write_prompt_files(tmp)
    _publish(tmp, root)


def _hardware(dev) -> str:
    import platform

    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def train_classifier(
    out_dir: str | Path, cfg: ClassifierTrainConfig = ClassifierTrainConfig(), progress: bool = True
) -> dict:
    """Train the digits classifier on the training split (random ±1 pixel shifts); writes
    out_dir/classifier.safetensors with its test accuracy in the metadata. Returns the metadata."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from tools.reference.digits import load_digits_split
    from tools.reference.metrics import DigitClassifier, classify

    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    train, test = load_digits_split()
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    net = DigitClassifier().to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.epochs), desc="train classifier", disable=not progress)
    for _ in bar:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            b = perm[i : i + cfg.batch_size]
            xb = _shift(x[b], gen).to(dev)
            loss = torch.nn.functional.cross_entropy(net(xb), y[b].to(dev), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    net = net.cpu().eval()
    acc = float((classify(net, test.images) == test.labels).mean())
    if acc < 0.97:
        raise ConfigError(f"classifier reached {acc:.2%} test accuracy, below the 97 % the metrics need")
    meta = {"test_accuracy": acc, "train_images": len(x), "test_images": len(test.images), **asdict(cfg)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".classifier.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata={"dqc": json.dumps(meta)})
    os.replace(tmp, out / "classifier.safetensors")
    return meta


def _shift(x, gen):
    """Random translation by up to one pixel (background −1 fills the border)."""
    import torch

    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[:, :, dy : dy + 8, dx : dx + 8]
