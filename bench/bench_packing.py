"""Issue 19: padding-free packing vs padding, real supervised tokens/s on a mixed-length multimodal dataset.

Dataset: SAMPLES synthetic samples, lengths spread 30-1000 tokens, 0-2 images (8x8 patches = 16 tokens each),
the answer half of the text supervised. Each optimizer step takes the same GLOBAL_BATCH samples both ways:
padded = one sample per row, rows padded to the step's longest (a multiple of 8); packed = the step's samples
first-fit-decreasing into rows of ROW tokens (autoparallel.data.packing), each with its own M-RoPE positions and
block-diagonal attention. Plain model (single process), fp32, fwd + bwd + AdamW; the epochs alternate
(padded, packed, packed, padded) so load drift on the shared machine hits both alike.
Model: hidden 256, 2 layers, vocab 16384 (a smaller head than the real 151936, whose cost is the same for both
sides since both supervise the same tokens: the padding shows in the decoder and attention).
"""
import common  # noqa: I001  (first: pins BLAS threads)

import os
import sys
import time

import numpy as np
import paddle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "helpers"))
from hf_oracle import Sample, build_batch  # noqa: E402

from autoparallel.data.collator import collate  # noqa: E402
from autoparallel.data.packing import collate_packed, first_fit_decreasing  # noqa: E402
from network.config import Qwen2VLConfig, Qwen2VLVisionConfig  # noqa: E402
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration  # noqa: E402
from network.rope_index import get_rope_index_for_config  # noqa: E402

BENCH = "packing"
BENCH_TIMEOUT = 900
SAMPLES, GLOBAL_BATCH, ROW = 32, 8, 1024  # a global batch of 8: first-fit-decreasing has samples to combine
IMAGE = (1, 8, 8)
KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "labels", "segment_ids")


def config() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        vocab_size=16384, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
        mrope_section=[8, 12, 12], tie_word_embeddings=True, image_token_id=16000, video_token_id=16001,
        vision_start_token_id=16002, vision_end_token_id=16003, pad_token_id=16004,
        vision_config=Qwen2VLVisionConfig(depth=1, embed_dim=128, hidden_size=256, num_heads=2, mlp_ratio=2),
    )


def dataset(cfg: Qwen2VLConfig) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(SAMPLES):
        images = int(rng.integers(0, 3))
        text = int(rng.integers(30, 1000)) - images * (IMAGE[1] * IMAGE[2] // 4 + 4)
        text = max(text, 4)
        b = build_batch(cfg, [Sample(text // 2, [("image", IMAGE)] * images, text - text // 2)], seed=i)
        positions, _ = get_rope_index_for_config(cfg, b["input_ids"], b.get("image_grid_thw"), None,
                                                 b["attention_mask"])
        out.append(dict(input_ids=b["input_ids"][0], labels=b["labels"][0], attention_mask=b["attention_mask"][0],
                        position_ids=positions[:, 0], pixel_values=b.get("pixel_values"),
                        image_grid_thw=b.get("image_grid_thw"), index=i))
    return out


def steps(cfg: Qwen2VLConfig, samples: list[dict], packed: bool) -> list[dict]:
    out = []
    for start in range(0, len(samples), GLOBAL_BATCH):
        group = samples[start:start + GLOBAL_BATCH]
        if packed:
            rows = first_fit_decreasing([len(s["input_ids"]) for s in group], ROW, window=len(group))
            out.append(collate_packed([[group[i] for i in r] for r in rows], pad_token_id=cfg.pad_token_id))
        else:
            out.append(collate(group, pad_token_id=cfg.pad_token_id))
    return out


def main() -> None:
    cfg = config()
    samples = dataset(cfg)
    paddle.seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    model.train()
    common.pin_threads()
    optimizer = paddle.optimizer.AdamW(1e-5, parameters=model.parameters(), weight_decay=0.01)
    batches = {"padded": steps(cfg, samples, False), "packed": steps(cfg, samples, True)}
    supervised = {k: sum(int((b["labels"][:, 1:] != -100).sum()) for b in v) for k, v in batches.items()}
    computed = {k: sum(int(b["input_ids"].size) for b in v) for k, v in batches.items()}
    real = sum(len(s["input_ids"]) for s in samples)
    losses: dict[str, list[float]] = {"padded": [], "packed": []}

    def epoch(kind: str) -> None:
        for b in batches[kind]:
            out = model(**{k: paddle.to_tensor(b[k]) for k in KEYS if b.get(k) is not None})
            out.loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            losses[kind].append(float(out.loss))

    seconds: dict[str, list[float]] = {"padded": [], "packed": []}
    epoch("packed")  # warm-up
    for kind in ("padded", "packed", "packed", "padded"):
        start = time.perf_counter()
        epoch(kind)
        seconds[kind].append(time.perf_counter() - start)
    rate = {k: supervised[k] / common.median(seconds[k]) for k in seconds}
    pad_fraction = {k: 1 - real / computed[k] for k in computed}
    print(f"[packing] epoch s {seconds}; supervised tokens {supervised}; computed positions {computed}, real {real}")
    common.emit(common.Record(
        BENCH, f"real supervised tokens/s, packed vs padded ({SAMPLES} samples of 30-1000 tokens, 0-2 images, "
               f"global batch {GLOBAL_BATCH}, rows of {ROW})", "tokens/s", rate["packed"], rate["padded"],
        "the same samples padded one per row", extra=dict(seconds=seconds, supervised=supervised,
                                                           computed=computed, real_tokens=real),
        note=f"padding fraction of computed positions: packed {pad_fraction['packed']:.1%}, padded "
             f"{pad_fraction['padded']:.1%}; fill ratio packed {1 - pad_fraction['packed']:.1%}"))


if __name__ == "__main__":
    main()
