"""The prompts of the text reference pipeline (`reference-text`): templates that name a digit in words ("seven") or
as a numeral ("7"), split once into the templates used for training and calibration and the templates held out of
both, which only evaluation uses; the digit a prompt asks for, parsed back for `dqc eval`; and the word-level CLIP
tokenizer whose vocabulary is made from the training prompts.

A held-out template is made of words the training prompts contain, in an order no training prompt has: the
tokenizer knows every word, the text encoder has never seen the sentence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from runtime.errors import ConfigError

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit's word, {n}: its numeral
TRAIN_TEMPLATES = (
    "{w}",
    "{n}",
    "the digit {w}",
    "a handwritten {n}",
    "an image of the number {w}",
    "a drawing of a {n}",
    "the numeral {n}",
    "a picture of a handwritten digit {w}",
)
HELD_OUT_TEMPLATES = (
    "a handwritten {w}",
    "the number {n}",
    "a drawing of the digit {w}",
)
TEMPLATE_SETS = {"train": TRAIN_TEMPLATES, "held-out": HELD_OUT_TEMPLATES}
MAX_LENGTH = 16  # start + at most 7 words + end fits; the rest is padding
START, END = "<|startoftext|>", "<|endoftext|>"


def prompt(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], n=str(digit))


def prompts_for(templates: str, n: int, offset: int = 0) -> tuple[list[str], list[int]]:
    """n prompts and their digits: prompt i asks for digit i % 10 with template (i % 10 + i // 10) % len(set), so
    that any 10 consecutive prompts ask for every digit, mix the templates, and every 10 · len(set) prompts hold each
    (template, digit) pair once. `templates`: "train" or "held-out"."""
    if templates not in TEMPLATE_SETS:
        raise ConfigError(f"unknown template set {templates!r}; use one of {', '.join(TEMPLATE_SETS)}")
    table = TEMPLATE_SETS[templates]
    index = range(offset, offset + n)
    return [prompt(table[(i % 10 + i // 10) % len(table)], i % 10) for i in index], [i % 10 for i in index]


_TOKEN = re.compile(r"[a-z]+|[0-9]")


def parse_digit(text: str) -> int:
    """The one digit a prompt asks for, as a word or a numeral; refused when it names none or several."""
    tokens = _TOKEN.findall(text.lower())
    found = {WORDS.index(t) if t in WORDS else int(t) for t in tokens if t in WORDS or t.isdigit()}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits ({', '.join(map(str, sorted(found)))})"
        raise ConfigError(
            f"prompt {text!r} names {what}; the digits model's prompts name exactly one, as a word (seven) or a "
            "numeral (7); pass --labels to give the requested digits instead"
        )
    return found.pop()


def write_prompt_files(folder: str | Path) -> None:
    """The training templates × digits (calibration_prompts.txt, what `dqc compile reference-text` calibrates on)
    and the held-out templates × digits (held_out_prompts.txt, for evaluation only), one prompt per line."""
    from tools.reference.model import CALIBRATION_PROMPTS, HELD_OUT_PROMPTS

    for name, templates in ((CALIBRATION_PROMPTS, "train"), (HELD_OUT_PROMPTS, "held-out")):
        lines, _ = prompts_for(templates, 10 * len(TEMPLATE_SETS[templates]))
        (Path(folder) / name).write_text("".join(p + "\n" for p in lines))


def save_tokenizer(folder: str | Path, prompts: list[str] | tuple[str, ...] = ()) -> Path:
    """A CLIP tokenizer whose vocabulary is every character (alone and word-final), every word of `prompts`
    (default: all training prompts) and the prefixes the merges build them from; a training word is one token.
    Words the training prompts lack fall back to characters, so no prompt is unknown."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not prompts:
        prompts = [prompt(t, d) for t in TRAIN_TEMPLATES for d in range(10)]
    words = sorted({w for p in prompts for w in _TOKEN.findall(p.lower())})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in words:  # left to right: ((w0 w1) w2) … , the last symbol word-final
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            left += right
            vocab.setdefault(left, len(vocab))
    vocab |= {START: len(vocab), END: len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": START,
              "eos_token": END, "unk_token": END, "pad_token": END}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder
