"""Tiny random HF Qwen2-VL / Qwen2.5-VL models and matching inputs, for parity tests (torch/transformers only
here)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import transformers

from network.config import Qwen2VLConfig

# Small vocabulary for speed; special ids remapped into it (the model does not care which ids they are).
SMALL_VOCAB = dict(
    vocab_size=512, image_token_id=505, video_token_id=506, vision_start_token_id=502, vision_end_token_id=503,
    bos_token_id=500, eos_token_id=501, pad_token_id=500,
)
TEXT_TOKENS = 480  # random text ids are drawn below this, away from the special ids


HF_CLASSES = {
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
}


def tiny_config(tied: bool = True, small_vocab: bool = True, preset: str = "tiny") -> Qwen2VLConfig:
    config = Qwen2VLConfig.preset(preset)
    config = dataclasses.replace(config, tie_word_embeddings=tied, **(SMALL_VOCAB if small_vocab else {}))
    return config


def hf_model(config: Qwen2VLConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """HF model of `config.model_type` with our config (through our flat `to_dict`) and O(1)-scale random weights.

    HF's own init (N(0, 0.02), zero biases, unit norms) would leave biases and norms untested and the
    logits tiny, so every parameter is redrawn: matrices ~ N(0, 1/fan_in), vectors around their identity.
    """
    config_cls, model_cls = HF_CLASSES[config.model_type]
    hf_config = config_cls(**config.to_dict())
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5)
            elif name.endswith("weight"):  # norm scales
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    model.tie_weights()
    return model.eval()


@dataclasses.dataclass
class Sample:
    """One row: text pieces and vision spans; `vision` items are ('image'|'video', (t, h, w)), or
    ('video', (t, h, w), seconds per temporal patch) for Qwen2.5-VL's `second_per_grid_ts`."""
    prompt_len: int
    vision: list
    answer_len: int


def build_batch(config: Qwen2VLConfig, samples: list[Sample], pad_side: str = "right", seed: int = 0) -> dict:
    """numpy inputs: input_ids, attention_mask, labels (prompt and padding = -100), pixel values and grids."""
    rng = np.random.default_rng(seed)
    v = config.vision_config
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    rows, label_rows = [], []
    images, videos, image_grids, video_grids, seconds = [], [], [], [], []
    for s in samples:
        ids = list(rng.integers(0, TEXT_TOKENS, s.prompt_len))
        for kind, (t, h, w), *second in s.vision:
            if second:
                seconds.append(second[0])
            pad = config.image_token_id if kind == "image" else config.video_token_id
            pixels = rng.standard_normal((t * h * w, patch_dim)).astype("float32")
            (images if kind == "image" else videos).append(pixels)
            (image_grids if kind == "image" else video_grids).append([t, h, w])
            ids += [config.vision_start_token_id] + [pad] * (t * h * w // v.spatial_merge_size**2)
            ids += [config.vision_end_token_id] + list(rng.integers(0, TEXT_TOKENS, 2))
        labels = [-100] * len(ids)
        answer = list(rng.integers(0, TEXT_TOKENS, s.answer_len))
        rows.append(ids + answer)
        label_rows.append(labels + answer)
    seq = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = np.full((batch, seq), config.pad_token_id, np.int64)
    labels = np.full((batch, seq), -100, np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        sl = slice(seq - len(r), seq) if pad_side == "left" else slice(0, len(r))
        input_ids[i, sl], labels[i, sl], mask[i, sl] = r, lab, 1
    out = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
    if images:
        out.update(pixel_values=np.concatenate(images), image_grid_thw=np.array(image_grids, np.int64))
    if videos:
        out.update(pixel_values_videos=np.concatenate(videos), video_grid_thw=np.array(video_grids, np.int64))
    if seconds:
        if len(seconds) != len(videos):
            raise ValueError("give seconds for every video of the batch or for none")
        out["second_per_grid_ts"] = np.array(seconds, np.float32)
    return out


def hf_forward(model, batch: dict) -> tuple[np.ndarray, float, np.ndarray]:
    """(logits, loss, position_ids) from the HF model."""
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**inputs)
        extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"], **extra,
        )
    return out.logits.float().numpy(), float(out.loss), positions.numpy()


LOGITS_TOL, LOSS_TOL = 1e-4, 1e-5


def assert_forward_parity(config: Qwen2VLConfig, hf, ours, batch: dict, label: str) -> None:
    """Rope indices equal, logits within LOGITS_TOL on non-padding rows, loss within LOSS_TOL; prints them."""
    import paddle

    from network.rope_index import get_rope_index_for_config

    hf_logits, hf_loss, hf_positions = hf_forward(hf, batch)
    positions, _ = get_rope_index_for_config(
        config, batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch["attention_mask"],
        batch.get("second_per_grid_ts"),
    )
    np.testing.assert_array_equal(positions, hf_positions)
    with paddle.no_grad():
        out = ours(**{k: paddle.to_tensor(v) for k, v in batch.items()})
    keep = batch["attention_mask"].astype(bool)  # padding rows are don't-care
    d_logits = float(np.abs(out.logits.numpy()[keep] - hf_logits[keep]).max())
    d_loss = abs(float(out.loss) - hf_loss)
    print(f"[parity] {label}: max|dlogits|={d_logits:.2e} |dloss|={d_loss:.2e} (loss {hf_loss:.4f})")
    assert d_logits <= LOGITS_TOL and d_loss <= LOSS_TOL


def max_relative_grad_diff(hf, ours, batch: dict) -> float:
    """Loss gradients of every parameter, ours vs HF's: the largest max|dgrad| / max|grad_hf| over parameters."""
    import paddle

    from network.weights import canonical_name, to_hf_layout

    hf.zero_grad()
    hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).loss.backward()
    hf_grads = {canonical_name(k): p.grad for k, p in hf.named_parameters()}
    ours.clear_gradients()
    ours(**{k: paddle.to_tensor(v) for k, v in batch.items()}).loss.backward()
    worst = 0.0
    for name, param in ours.named_parameters():
        expected, got = hf_grads[name].numpy(), to_hf_layout(name, param.grad.numpy())
        worst = max(worst, float(np.abs(got - expected).max() / (np.abs(expected).max() + 1e-12)))
    ours.clear_gradients()
    return worst


def random_vision_layouts(trials: int = 60, seed: int = 0):
    """Rope-index test inputs with the SMALL_VOCAB ids: yields (trial, input_ids, attention_mask or None,
    image grids or None, video grids or None, whole seconds per video grid). Rows mix images and videos in any
    order or are text only; odd trials are left-padded; every fifth trial has no mask."""
    rng = np.random.default_rng(seed)
    pad_ids = {"image": SMALL_VOCAB["image_token_id"], "video": SMALL_VOCAB["video_token_id"]}
    for trial in range(trials):
        rows, grids, seconds = [], {"image": [], "video": []}, []
        for _ in range(rng.integers(1, 4)):
            row = list(rng.integers(0, TEXT_TOKENS, rng.integers(1, 5)))
            for _ in range(rng.integers(0, 4)):
                kind = "video" if rng.random() < 0.5 else "image"
                t = int(rng.integers(1, 5)) if kind == "video" else 1
                h, w = 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))
                grids[kind].append([t, h, w])
                if kind == "video":
                    seconds.append(float(rng.integers(1, 4)))
                row += [SMALL_VOCAB["vision_start_token_id"]] + [pad_ids[kind]] * (t * h * w // 4)
                row += [SMALL_VOCAB["vision_end_token_id"]] + list(rng.integers(0, TEXT_TOKENS, rng.integers(0, 3)))
            rows.append(row)
        seq = max(map(len, rows)) + int(rng.integers(0, 3))
        input_ids, mask = np.zeros((len(rows), seq), np.int64), np.zeros((len(rows), seq), np.int64)
        for i, row in enumerate(rows):
            sl = slice(seq - len(row), seq) if trial % 2 else slice(0, len(row))
            input_ids[i, sl], mask[i, sl] = row, 1
        image = np.array(grids["image"]).reshape(-1, 3) if grids["image"] else None
        video = np.array(grids["video"]).reshape(-1, 3) if grids["video"] else None
        yield trial, input_ids, mask if trial % 5 else None, image, video, np.array(seconds, np.float32)
