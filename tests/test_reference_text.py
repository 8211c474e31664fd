"""The shipped text-to-image reference pipeline (`reference-text`): its files, size and architecture against its
training configuration, its prompts (tokenizer, held-out templates, the digit parsed back for `dqc eval`), that its
full-precision samples on held-out prompts are the requested digits, seeded resumable training, and the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import ConfigError
from tools.cli import main
from tools.reference.model import (
    CALIBRATION_PROMPTS,
    HELD_OUT_PROMPTS,
    REFERENCE_TEXT_DIR,
    REFERENCE_TEXT_GUIDANCE,
    TEXT_KEYWORD,
    reference_dir,
)
from tools.reference.prompts import (
    HELD_OUT_TEMPLATES,
    MAX_LENGTH,
    TRAIN_TEMPLATES,
    parse_digit,
    prompt,
    prompts_for,
    save_tokenizer,
)
from tools.reference.train import (
    REFERENCE_SCHEDULER,
    REFERENCE_TEXT_ENCODER,
    REFERENCE_TEXT_UNET,
    DiffusionTrainConfig,
    train_diffusion,
)


@pytest.fixture(scope="module")
def pipeline():
    from calibration.model_io import load_model

    return load_model(reference_dir(TEXT_KEYWORD), prompts=("the digit seven",))


def test_shipped_files_and_size():
    files = [p for p in REFERENCE_TEXT_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20e6
    for name in ("README.md", "training.json", "train_log.jsonl", "model_index.json", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json", CALIBRATION_PROMPTS, HELD_OUT_PROMPTS):  # fmt: skip
        assert (REFERENCE_TEXT_DIR / name).is_file(), name


def test_architecture_is_the_training_configuration_and_the_card(pipeline):
    cfg = pipeline.unet.config
    for k, v in REFERENCE_TEXT_UNET.items():
        assert cfg[k] == (list(v) if isinstance(v, tuple) else v), k
    assert "CrossAttnDownBlock2D" in cfg.down_block_types  # self- and cross-attention at 4×4
    enc = pipeline.text.encoder.config
    for k, v in REFERENCE_TEXT_ENCODER.items():
        assert getattr(enc, k) == v, k
    assert cfg.cross_attention_dim == enc.hidden_size
    sched = json.loads((REFERENCE_TEXT_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert {k: sched[k] for k in REFERENCE_SCHEDULER} == REFERENCE_SCHEDULER
    meta = json.loads((REFERENCE_TEXT_DIR / "training.json").read_text())
    params = sum(p.numel() for p in pipeline.unet.parameters()) + sum(
        p.numel() for p in pipeline.text.encoder.parameters()
    )
    assert meta["parameters"] == params
    card = (REFERENCE_TEXT_DIR / "README.md").read_text()
    assert f"{params:,}" in card
    assert meta["held_out_templates"] == list(HELD_OUT_TEMPLATES) and meta["train_templates"] == list(TRAIN_TEMPLATES)
    for t in HELD_OUT_TEMPLATES:
        assert t in card


def test_prompt_files_keep_held_out_templates_out_of_calibration():
    calib = (REFERENCE_TEXT_DIR / CALIBRATION_PROMPTS).read_text().splitlines()
    held = (REFERENCE_TEXT_DIR / HELD_OUT_PROMPTS).read_text().splitlines()
    assert calib == prompts_for("train", 80)[0] and held == prompts_for("held-out", 30)[0]
    assert sorted(calib) == sorted(prompt(t, d) for t in TRAIN_TEMPLATES for d in range(10))
    assert sorted(held) == sorted(prompt(t, d) for t in HELD_OUT_TEMPLATES for d in range(10))
    assert not set(calib) & set(held)
    assert [parse_digit(p) for p in calib[:10]] == list(range(10)) and len({p.split()[0] for p in calib[:10]}) > 3


def test_tokenizer_knows_every_training_word_and_never_falls_to_unknown(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(save_tokenizer(tmp_path / "tok")), local_files_only=True)
    for p in [prompt(t, d) for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES for d in range(10)]:
        ids = tok(p).input_ids
        assert len(ids) == len(p.split()) + 2 <= MAX_LENGTH, p  # one token per word, plus start and end
    unseen = tok("a scan of a 7").input_ids  # words no training prompt has fall back to characters
    assert tok.unk_token_id not in unseen[1:-1]
    shipped = CLIPTokenizer.from_pretrained(str(REFERENCE_TEXT_DIR / "tokenizer"), local_files_only=True)
    assert shipped.get_vocab() == tok.get_vocab()


def test_parse_digit():
    assert parse_digit("a handwritten 7") == 7
    assert parse_digit("The Digit SEVEN.") == 7
    assert parse_digit("seven, drawn as a 7") == 7
    for d in range(10):
        for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES:
            assert parse_digit(prompt(t, d)) == d
    with pytest.raises(ConfigError, match="names no digit.*--labels"):
        parse_digit("a handwritten letter")
    with pytest.raises(ConfigError, match=r"several digits \(3, 7\)"):
        parse_digit("a 3 next to a seven")
    prompts, digits = prompts_for("held-out", 40)
    assert [parse_digit(p) for p in prompts] == digits and len(set(prompts)) == 30
    with pytest.raises(ConfigError, match="template set"):
        prompts_for("test", 4)


def test_samples_on_held_out_prompts_are_the_requested_digits(tmp_path):
    """40 samples of the full-precision pipeline (25 DDIM steps) on the held-out templates, judged by the
    classifier with the digits parsed from the prompts. The card's figure is the 100-step N = 1000 one."""
    out = tmp_path / "fp.npz"
    assert main(["sample", TEXT_KEYWORD, "--prompts-file", str(REFERENCE_TEXT_DIR / HELD_OUT_PROMPTS), "-n", "40",
                 "--steps", "25", "--guidance", str(REFERENCE_TEXT_GUIDANCE), "-o", str(out), "-q"]) == 0  # fmt: skip
    from tools.reference.metrics import evaluate

    r = evaluate(out)
    assert r["n"] == 40 and r["accuracy"] >= 0.9, r


def test_eval_parses_prompts_and_refuses_unparseable_ones(tmp_path):
    from tools.deploy.pipeline import save_npz
    from tools.reference.digits import load_digits_split
    from tools.reference.metrics import evaluate

    _, test = load_digits_split()
    x, y = test.images[:20], test.labels[:20]
    words = [prompt("the digit {w}", int(d)) for d in y]
    save_npz(tmp_path / "ok.npz", samples=x, meta=np.array(json.dumps({"prompts": words})))
    assert evaluate(tmp_path / "ok.npz")["accuracy"] >= 0.9  # the classifier on real digits, asked by prompt
    wrong = [prompt("the digit {w}", (int(d) + 1) % 10) for d in y]
    save_npz(tmp_path / "wrong.npz", samples=x, meta=np.array(json.dumps({"prompts": wrong})))
    assert evaluate(tmp_path / "wrong.npz")["accuracy"] <= 0.1
    assert evaluate(tmp_path / "wrong.npz", labels=",".join(map(str, y)))["accuracy"] >= 0.9  # --labels wins
    bad = words[:-1] + ["a handwritten letter"]
    save_npz(tmp_path / "bad.npz", samples=x, meta=np.array(json.dumps({"prompts": bad})))
    with pytest.raises(ConfigError, match="bad.npz: prompt 'a handwritten letter' names no digit"):
        evaluate(tmp_path / "bad.npz")


def test_text_training_is_seeded_and_resumes_bit_identically(tmp_path):
    from calibration.model_io import load_model

    cfg = DiffusionTrainConfig(steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    train_diffusion(tmp_path / "a", cfg, progress=False, text=True)
    train_diffusion(tmp_path / "b", cfg, progress=False, stop_after=3, text=True)  # an interrupted run …
    train_diffusion(tmp_path / "b", cfg, progress=False, text=True)  # … resumed from its checkpoint
    with pytest.raises(ConfigError, match="same configuration"):
        train_diffusion(tmp_path / "b", cfg, progress=False)  # the class model cannot resume a text run
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [x["loss"] for x in logs[0]] == [x["loss"] for x in logs[1]] and len(logs[1]) == 4
    a, b = (load_model(tmp_path / d, prompts=("seven",)) for d in "ab")
    for ma, mb in ((a.unet, b.unet), (a.text.encoder, b.text.encoder)):
        for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
            assert np.array_equal(va.numpy(), vb.numpy()), k
    assert (tmp_path / "a" / CALIBRATION_PROMPTS).is_file() and (tmp_path / "a" / "model_index.json").is_file()


def test_text_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--text", "-o", str(out), "-n", "20", "--steps", "10", "--calib-samples", "8", "--groups", "2",
            "--group-epochs", "1", "--ptqd-samples", "16", "-q"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"].startswith(TEXT_KEYWORD) and report["sampler"]["guidance"] == REFERENCE_TEXT_GUIDANCE
    assert report["groups"] == 2 and report["w8a8"]["psnr_vs_reference"] > 10
    fp = np.load(out / "samples_fp32.npz")
    prompts = json.loads(str(fp["meta"]))["prompts"]
    assert prompts == prompts_for("held-out", 20)[0] and list(fp["labels"]) == [i % 10 for i in range(20)]
    assert (out / "comparison.png").is_file()
    assert "W8A8 ORT" in capsys.readouterr().out


def test_method_table_samples_each_prompt_set(tmp_path, capsys):
    """`dqc bench reference-text --methods`: calibrated on the training prompts, each cell sampled on the training
    and the held-out templates (one row each); --with-ptqd then reuses that calibration, gathers the statistics
    (as compile does) and samples with them."""
    out = tmp_path / "t"
    argv = ["bench", TEXT_KEYWORD, "--methods", "naive", "--bits", "W8A8", "-n", "10", "--steps", "5",
            "--calib-samples", "4", "--calib-timesteps", "2", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--with-ptqd", "--ptqd-samples", "8"]) == 0
    said = capsys.readouterr().out
    assert "reused the calibration of naive_W8A8" in said and "compiled in" not in said
    table = json.loads((out / "table.json").read_text())
    assert [(r["method"], r["prompts"]) for r in table["rows"]] == [
        ("fp", "train"), ("fp", "held-out"), ("naive + PTQD", "train"), ("naive + PTQD", "held-out")
    ]  # fmt: skip
    cell = out / "naive_W8A8_ptqd"
    manifest = json.loads((cell / "bundle" / "manifest.json").read_text())
    base = json.loads((out / "naive_W8A8" / "bundle" / "manifest.json").read_text())
    assert manifest["ptqd"] and not base.get("ptqd")
    assert manifest["files"]["weights.bin"] == base["files"]["weights.bin"]
    assert manifest["ptqd"]["W8A8"]["samples"] == 8 and not list(out.glob("*/*.tmp"))
    calibrated_on = manifest["components"]["calibration_prompts"]
    assert calibrated_on == prompts_for("train", 80)[0] and not set(calibrated_on) & set(prompts_for("held-out", 30)[0])
    for ps in ("train", "held-out"):
        meta = json.loads(str(np.load(cell / f"samples_{ps}.npz")["meta"]))
        assert meta["prompts"] == prompts_for(ps, 10)[0] and meta["ptqd"]
    assert "| prompts |" in (out / "table.md").read_text()
