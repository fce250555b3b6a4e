"""A small real dataset on disk for the demo: coloured shapes with one-word answers a tiny model can learn.

Question kinds (single-word answers, easy to score):
  colour  "What colour is the shape?"                          → red | green | blue | yellow   (56×56, 4 tokens)
  shape   "What shape is this?"                                → circle | square | triangle    (56×56)
  count   "How many squares are there?"                        → 1..4   (112×112, one square per occupied quadrant)
  which   "<image><image>Which image is red, the first or the second?" → first | second (two 56×56 images)

Layout of `out_dir`: `images/{split}_{i:05d}_{k}.png`, `train.json` / `eval.json` (messages form),
`meta_train.json` / `meta_eval.json` (PaddleMIX meta, relative paths + `root`, so the folder can be moved) and
`params.json`. Deterministic in the parameters; a second call with the same parameters reuses the files.
Generation writes into a temporary folder renamed into place, so concurrent callers (e.g. every rank of a demo)
are safe.

CLI: `python -m autoparallel.data.synthetic OUT_DIR [--n-train N] [--n-eval N] [--seed S]` prints the meta paths.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
KINDS = (("colour", 0.3), ("shape", 0.3), ("count", 0.25), ("which", 0.15))
PARAMS_FILE = "params.json"
GENERATOR_VERSION = 1


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in rgb)


def _single(rng: np.random.Generator, size: int, shape: str, colour: str) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    side = size * rng.uniform(0.5, 0.8)
    x0, y0 = rng.uniform(0, size - side, 2)
    _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), _jitter(rng, COLOURS[colour]))
    return img


def _squares(rng: np.random.Generator, size: int, count: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw, half = ImageDraw.Draw(img), size // 2
    colour = COLOURS[str(rng.choice(list(COLOURS)))]
    for quadrant in rng.choice(4, size=count, replace=False):
        qx, qy = (quadrant % 2) * half, (quadrant // 2) * half
        side = half * rng.uniform(0.5, 0.8)
        x0, y0 = qx + rng.uniform(0, half - side), qy + rng.uniform(0, half - side)
        draw.rectangle((x0, y0, x0 + side, y0 + side), fill=_jitter(rng, colour))
    return img


def _example(rng: np.random.Generator, size: int) -> tuple[str, str, str, list[Image.Image]]:
    """(kind, question with placeholders, answer, images)."""
    kind = str(rng.choice([k for k, _ in KINDS], p=[p for _, p in KINDS]))
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    if kind == "colour":
        return kind, "<image>What colour is the shape?", colour, [_single(rng, size, shape, colour)]
    if kind == "shape":
        return kind, "<image>What shape is this?", shape, [_single(rng, size, shape, colour)]
    if kind == "count":
        count = int(rng.integers(1, 5))
        return kind, "<image>How many squares are there?", str(count), [_squares(rng, 2 * size, count)]
    other = str(rng.choice([c for c in COLOURS if c != colour]))
    first_is_target = bool(rng.integers(2))
    colours = (colour, other) if first_is_target else (other, colour)
    images = [_single(rng, size, str(rng.choice(SHAPES)), c) for c in colours]
    question = f"<image><image>Which image is {colour}, the first or the second?"
    return kind, question, "first" if first_is_target else "second", images


def _write_split(root: str, split: str, n: int, rng: np.random.Generator, size: int) -> None:
    records = []
    for i in range(n):
        kind, question, answer, images = _example(rng, size)
        names = []
        for k, img in enumerate(images):
            names.append(f"images/{split}_{i:05d}_{k}.png")
            img.save(os.path.join(root, names[-1]))
        records.append({"id": f"{split}_{i:05d}", "kind": kind, "images": names, "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    with open(os.path.join(root, f"{split}.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    meta = {f"synthetic_shapes_{split}": {"annotation": f"{split}.json", "root": ".", "repeat_time": 1,
                                          "length": n}}
    with open(os.path.join(root, f"meta_{split}.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def _params_match(out_dir: str, params: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(out_dir, PARAMS_FILE), encoding="utf-8") as f:
            return json.load(f) == params
    except (OSError, json.JSONDecodeError):
        return False


def make_synthetic_dataset(out_dir: str, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                           image_size: int = 56) -> str:
    """Write (or reuse) the dataset and return the train meta path; the held-out split is `eval_meta_path`.

    `image_size` is the side of single-shape images (a multiple of 28 keeps it unresized: 56 → 4 LLM tokens);
    counting images are twice that."""
    if image_size % 28 or n_train < 1 or n_eval < 0:
        raise ValueError("image_size must be a multiple of 28, n_train >= 1 and n_eval >= 0")
    params = {"version": GENERATOR_VERSION, "n_train": n_train, "n_eval": n_eval, "seed": seed,
              "image_size": image_size}
    out_dir = os.path.abspath(out_dir)
    if not _params_match(out_dir, params):
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=parent)
        os.makedirs(os.path.join(tmp, "images"))
        for split, n, stream in (("train", n_train, 0), ("eval", n_eval, 1)):
            _write_split(tmp, split, n, np.random.default_rng([seed, stream]), image_size)
        with open(os.path.join(tmp, PARAMS_FILE), "w", encoding="utf-8") as f:
            json.dump(params, f)  # written last: its presence marks a complete dataset
        if os.path.isdir(out_dir) and not _params_match(out_dir, params):
            shutil.rmtree(out_dir, ignore_errors=True)  # stale parameters
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process published the same dataset first
            shutil.rmtree(tmp, ignore_errors=True)
            if not _params_match(out_dir, params):
                raise
    return os.path.join(out_dir, "meta_train.json")


def eval_meta_path(out_dir: str) -> str:
    return os.path.join(os.path.abspath(out_dir), "meta_eval.json")


def eval_questions(out_dir: str) -> list[dict[str, Any]]:
    """Held-out questions: [{"id", "kind", "question" (with <image> placeholders), "images" (absolute paths),
    "answer"}]; render prompts with `SFTDataset.generation_inputs(question, images)`."""
    root = os.path.abspath(out_dir)
    with open(os.path.join(root, "eval.json"), encoding="utf-8") as f:
        records = json.load(f)
    return [{"id": r["id"], "kind": r["kind"], "question": r["messages"][0]["content"],
             "images": [os.path.join(root, p) for p in r["images"]], "answer": r["messages"][1]["content"]}
            for r in records]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=56)
    args = parser.parse_args(argv)
    print(make_synthetic_dataset(args.out_dir, args.n_train, args.n_eval, args.seed, args.image_size))
    print(eval_meta_path(args.out_dir))


if __name__ == "__main__":
    main()
