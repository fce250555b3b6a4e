"""Issue 10 item 6: is the trainer ever waiting for data?

Two datasets through the full pipeline (records → template → tokenizer → image decode/resize/patchify → global
batch planning → collate), `SFTDataLoader`, batch 2, one rank:
  synthetic  `make_synthetic_dataset` (56/112 px PNGs, ~70 tokens per sample)
  jpeg       generated 640-1500 px JPEGs, max_pixels 256*28*28 (<= 256 vision tokens per image)
For each: loader samples/s with 0 vs 2 worker threads (interleaved passes, nothing else running), then a training
loop fed by the 2-worker loader (tiny preset, real vocab, fwd+bwd+AdamW; decoding shares the cores with the step,
as in real training) giving the step's consumption rate, supply/demand = loader rate / step rate, and the
fraction of the loop's wall time spent blocked on `next(loader)` — the number that answers the question directly.
"""
import common  # noqa: I001  (first: pins BLAS threads)

import json
import os
import tempfile
import time

import numpy as np
import paddle
from PIL import Image

from autoparallel.data import DataConfig, SFTDataLoader, SFTDataset
from autoparallel.data.synthetic import make_synthetic_dataset
from network.config import Qwen2VLConfig
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.processor import Qwen2VLProcessor

BENCH = "dataloader"
BATCH, BATCHES, ROUNDS, TRAIN_STEPS = 2, 16, 3, 6
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_grid_thw")


def jpeg_dataset(root: str, n: int = 48, seed: int = 0) -> str:
    """Write n photo-like JPEGs of mixed sizes and a messages-form annotation; return the meta path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"))
    records = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(640, 1501, 2))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        pixels = np.stack([127 + 100 * np.sin(x / (9 + 13 * c) + y / (17 + 7 * c)) for c in range(3)], axis=-1)
        pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        name = f"images/{i:04d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, name), quality=90)
        answer = " ".join(["wave"] * int(rng.integers(5, 40)))
        records.append({"images": [name], "messages": [
            {"role": "user", "content": "<image>Describe the pattern."}, {"role": "assistant", "content": answer}]})
    with open(os.path.join(root, "train.json"), "w", encoding="utf-8") as f:
        json.dump(records, f)
    meta = os.path.join(root, "meta.json")
    with open(meta, "w", encoding="utf-8") as f:
        json.dump({"jpegs": {"annotation": "train.json", "root": ".", "repeat_time": 1}}, f)
    return meta


def drain(dataset: SFTDataset, workers: int) -> list[dict]:
    loader = SFTDataLoader(dataset, BATCH, num_workers=workers, shuffle=False)
    try:
        return [batch for _, batch in zip(range(BATCHES), loader)]
    finally:
        loader.close()


def train_step_fn(model: Qwen2VLForConditionalGeneration, optimizer: paddle.optimizer.Optimizer):
    def step(batch: dict) -> float:
        inputs = {k: paddle.to_tensor(batch[k]) for k in MODEL_KEYS if batch.get(k) is not None}
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)
    return step


def measure(name: str, dataset: SFTDataset, step) -> None:
    drain(dataset, 0)  # warm-up: probes (cached per index), tokenizer, file cache
    loader_s = common.interleave({"0": lambda: drain(dataset, 0), "2": lambda: drain(dataset, 2)}, ROUNDS, 0)
    rate0, rate2 = BATCHES * BATCH / common.median(loader_s["0"]), BATCHES * BATCH / common.median(loader_s["2"])

    # The direct answer: a training loop fed by the 2-worker loader (decoding competes with the step for the
    # same cores, as in real training); time blocked in next() vs the whole loop. Step 0 is warm-up.
    loader = SFTDataLoader(dataset, BATCH, num_workers=2, shuffle=False)
    waits, steps, tokens = [], [], []
    it = iter(loader)
    for _ in range(TRAIN_STEPS + 1):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        step(batch)
        waits.append(t1 - t0)
        steps.append(time.perf_counter() - t1)
        tokens.append(batch["input_ids"].shape[1])
    loader.close()
    waits, steps = waits[1:], steps[1:]
    demand = BATCH / common.median(steps)
    blocked = 100 * sum(waits) / (sum(waits) + sum(steps))
    print(f"[dataloader] {name}: loader s/pass 0w {loader_s['0']} 2w {loader_s['2']}; "
          f"train loop step s {steps}, waits s {waits}")

    desc = f"{name} ({BATCH}x{int(np.mean(tokens))} tokens per batch)"
    common.emit(common.Record(
        BENCH, f"loader samples/s, {desc}, 2 worker threads vs 0", "samples/s", rate2, rate0,
        "same loader, num_workers=0", extra=dict(pass_s_0=loader_s["0"], pass_s_2=loader_s["2"])))
    common.emit(common.Record(
        BENCH, f"loader supply / train-step demand, {desc}", "samples/s", rate2, demand,
        "tiny-preset train step consumption (fwd+bwd+AdamW)", extra=dict(step_s=steps),
        note=f"{name}: supply/demand {rate2 / demand:.0f}x, trainer blocked on data {blocked:.2f}% of the loop "
             f"({TRAIN_STEPS} steps, 2 workers); ratio > 1 means batches come faster than a tiny-model step "
             "eats them"))
    common.emit(common.Record(
        BENCH, f"trainer time blocked on next(loader), {desc}, 2 workers", "%", blocked,
        better="lower", extra=dict(wait_s=waits, step_s=steps)))


def main() -> None:
    processor = Qwen2VLProcessor.from_pretrained(None)
    paddle.seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.preset("tiny"))
    model.train()
    common.pin_threads()
    step = train_step_fn(model, paddle.optimizer.AdamW(learning_rate=1e-5, parameters=model.parameters()))
    with tempfile.TemporaryDirectory() as root:
        synthetic = make_synthetic_dataset(os.path.join(root, "synthetic"), n_train=BATCHES * BATCH, n_eval=0)
        measure("synthetic", SFTDataset(DataConfig(meta_path=synthetic, max_seq_length=512), processor), step)
        jpegs = jpeg_dataset(os.path.join(root, "jpeg"))
        config = DataConfig(meta_path=jpegs, max_seq_length=1024, max_pixels=256 * 28 * 28)
        measure("jpeg", SFTDataset(config, processor), step)


if __name__ == "__main__":
    main()
