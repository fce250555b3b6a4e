"""Shared by the parallel tests and their launched workers: synthetic data, layouts, training loops.

Every layout trains on the same GLOBAL micro-batches (4 samples each, 2 micro-steps per step, 5 AdamW steps
with ClipGradByGlobalNorm), so one single-process reference run serves all layouts. A dp rank takes a
contiguous slice of each global micro-batch. Samples carry 0, 1 or 2 images of different sizes, so dp ranks
hold different image and patch counts, and under dp 2 one rank of some micro-batches holds no image at all. The
MEDIA layouts train on other samples (3 and 4 images, videos, an image with a video) against their own
reference.

Modes: what trains. "vit" trains the ViT, the merger and the LLM, with their own peak LRs (VIT_LR, MERGER_LR)
on a warmup + cosine schedule, so one run checks the trainable ViT and the per-module LRs through
`dist.parallelize`; "vit_only" (freeze_llm, frozen merger) trains the ViT alone through the frozen rest.
"""
from __future__ import annotations

import numpy as np
import paddle

from autoparallel.config import TrainingArgs
from autoparallel.engine.optim import apply_module_learning_rates, lr_multiplier
from network.config import Qwen2VLConfig
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.rope_index import get_rope_index_for_config
from placements.qwen2_vl import Trainable

STEPS, ACCUMULATION, GLOBAL_MICRO_BATCH, SEQ = 5, 2, 4, 40
LR, CLIP = 1e-3, 1.0
VIT_LR, MERGER_LR = 2e-3, 5e-4
SEED = 1234
MODES = {"frozen": Trainable(), "train_merger": Trainable(merger=True), "vit": Trainable(vit=True, merger=True),
         "vit_only": Trainable(vit=True, llm=False)}
SCHEDULED = ("vit", "vit_only")  # modes with module LRs on a warmup + cosine schedule
# (name, degrees kwargs, mode); nproc = product of degrees.
LAYOUTS_2 = [
    ("dp2", dict(data_parallel_degree=2), "frozen"),
    ("mp2", dict(tensor_parallel_degree=2), "frozen"),
    ("sharding1", dict(sharding_parallel_degree=2, sharding_stage=1), "frozen"),
    ("sharding2", dict(sharding_parallel_degree=2, sharding_stage=2), "frozen"),
    ("sharding3", dict(sharding_parallel_degree=2, sharding_stage=3), "frozen"),
    ("dp2_train_merger", dict(data_parallel_degree=2), "train_merger"),
    ("dp2_vit", dict(data_parallel_degree=2), "vit"),
    ("mp2_vit", dict(tensor_parallel_degree=2), "vit"),
    ("sharding2_vit", dict(sharding_parallel_degree=2, sharding_stage=2), "vit"),
    ("sharding2_vit_only", dict(sharding_parallel_degree=2, sharding_stage=2), "vit_only"),
    ("dp2_packed", dict(data_parallel_degree=2), "frozen"),
    ("mp2_packed", dict(tensor_parallel_degree=2), "frozen"),
]
# Layouts trained on packed rows (autoparallel.data.packing) of the same samples: they must match the
# single-process reference trained on the samples one per row.
PACKED = {"dp2_packed", "mp2_packed", "cp2_packed", "cp2sharding2_packed"}
PACKED_ROW = 2 * SEQ
# Layouts trained on the _MEDIA samples (3 and 4 images, videos), against a reference on the same samples.
MEDIA = {"cp2", "cp2mp2", "cp2_packed"}
LAYOUTS_4 = [
    ("dp2mp2", dict(data_parallel_degree=2, tensor_parallel_degree=2), "frozen"),
    ("mp4_kv_replicated", dict(tensor_parallel_degree=4), "frozen"),
    ("dp2mp2_vit", dict(data_parallel_degree=2, tensor_parallel_degree=2), "vit"),
]
# Context parallel (autoparallel/context_parallel.py), launched by tests/dist/test_context_parallel.py.
LAYOUTS_CP_2 = [
    ("cp2", dict(context_parallel_degree=2), "frozen"),
    ("cp2_packed", dict(context_parallel_degree=2), "frozen"),
]
LAYOUTS_CP_4 = [
    ("cp2dp2", dict(data_parallel_degree=2, context_parallel_degree=2), "frozen"),
    ("cp2sharding2_packed", dict(sharding_parallel_degree=2, sharding_stage=1, context_parallel_degree=2), "frozen"),
    ("cp2mp2", dict(context_parallel_degree=2, tensor_parallel_degree=2), "frozen"),
    ("cp4", dict(context_parallel_degree=4), "frozen"),
]
# image grids (t, h, w) in patches, per sample of the 4 * ACCUMULATION * STEPS samples (cycled)
_IMAGES = [[(1, 4, 4)], [], [(1, 4, 4), (1, 4, 8)], [(1, 8, 4)], [(1, 4, 4)], [(1, 4, 8), (1, 4, 4)], [], []]
# (image grids, video grids) per sample of the MEDIA layouts: 3 and 4 images, videos of 2 temporal patches, an
# image with a video.
_MEDIA = [([(1, 4, 4), (1, 4, 8), (1, 8, 4)], []), ([], [(2, 4, 4)]), ([], []), ([(1, 4, 4)] * 4, []),
          ([(1, 4, 8)], [(2, 4, 4)]), ([(1, 4, 4)], []), ([], [(2, 8, 4)]), ([(1, 4, 4), (1, 4, 4)], [])]


def tiny_config() -> Qwen2VLConfig:
    return Qwen2VLConfig.preset("tiny")


def build_model(config: Qwen2VLConfig) -> Qwen2VLForConditionalGeneration:
    paddle.seed(SEED)
    return Qwen2VLForConditionalGeneration(config)


def mode_training_args(mode: str) -> TrainingArgs:
    return TrainingArgs(learning_rate=LR, **(dict(vit_lr=VIT_LR, merger_lr=MERGER_LR) if mode in SCHEDULED else {}))


def build_optimizer(model, paddle_clip: bool = False, mode: str = "frozen") -> paddle.optimizer.AdamW:
    """AdamW (warmup + cosine in the SCHEDULED modes, constant LR otherwise). Layouts clip through the engine's step
    (`autoparallel.step.train_step(clip_norm=CLIP)`); the single-process reference clips with Paddle's own
    ClipGradByGlobalNorm (`paddle_clip`), an independent oracle. Call `apply_module_learning_rates` on the
    model that trains (after `parallelize` for layouts) for the per-module LRs."""
    clip = paddle.nn.ClipGradByGlobalNorm(CLIP) if paddle_clip else None
    lr = (paddle.optimizer.lr.LambdaDecay(LR, lambda step: lr_multiplier(step, 2, STEPS, "cosine", 0.1))
          if mode in SCHEDULED else LR)
    return paddle.optimizer.AdamW(lr, parameters=model.parameters(), weight_decay=0.01, grad_clip=clip)


def step_schedule(optimizer) -> None:
    schedule = getattr(optimizer, "_inner_opt", optimizer)._learning_rate
    if isinstance(schedule, paddle.optimizer.lr.LRScheduler):
        schedule.step()


def _sample(config: Qwen2VLConfig, rng: np.random.RandomState, grids, video_grids=()) -> dict:
    merge = config.vision_config.spatial_merge_size ** 2
    v = config.vision_config
    ids = list(rng.randint(0, 1000, 4))
    for token, media in ((config.image_token_id, grids), (config.video_token_id, video_grids)):
        for t, h, w in media:
            ids += [config.vision_start_token_id] + [token] * (t * h * w // merge)
            ids += [config.vision_end_token_id] + list(rng.randint(0, 1000, 2))
    prompt = len(ids)
    ids += list(rng.randint(0, 1000, SEQ - prompt))
    ids = np.asarray(ids[:SEQ], np.int64)
    labels = ids.copy()
    labels[:prompt] = -100
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixels = [rng.randn(t * h * w, patch_dim).astype(np.float32) for t, h, w in grids]
    video_pixels = [rng.randn(t * h * w, patch_dim).astype(np.float32) for t, h, w in video_grids]
    return {"ids": ids, "labels": labels, "pixels": pixels, "grids": list(grids), "video_pixels": video_pixels,
            "video_grids": list(video_grids)}


def _batch(config: Qwen2VLConfig, samples: list[dict]) -> dict[str, np.ndarray]:
    ids = np.stack([s["ids"] for s in samples])
    batch = {"input_ids": ids, "labels": np.stack([s["labels"] for s in samples]),
             "attention_mask": np.ones_like(ids)}
    grids = {}
    for pixels, sample_grids, key, grid_key in (("pixels", "grids", "pixel_values", "image_grid_thw"),
                                                ("video_pixels", "video_grids", "pixel_values_videos",
                                                 "video_grid_thw")):
        grid = np.asarray([g for s in samples for g in s[sample_grids]], np.int64).reshape(-1, 3)
        grids[grid_key] = grid if len(grid) else None
        if len(grid):
            batch[key] = np.concatenate([p for s in samples for p in s[pixels]])
            batch[grid_key] = grid
    batch["position_ids"], _ = get_rope_index_for_config(config, ids, grids["image_grid_thw"],
                                                         grids["video_grid_thw"])
    return batch


VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _packed_batch(config: Qwen2VLConfig, samples: list[dict]) -> dict[str, np.ndarray]:
    """The samples packed first-fit-decreasing into rows of PACKED_ROW tokens, each with its own positions."""
    from autoparallel.data.packing import collate_packed, first_fit_decreasing

    items = []
    for i, s in enumerate(samples):
        one = _batch(config, [s])
        items.append({"input_ids": one["input_ids"][0], "labels": one["labels"][0],
                      "attention_mask": one["attention_mask"][0], "position_ids": one["position_ids"][:, 0],
                      "index": i, **{k: one.get(k) for k in VISION_KEYS}})
    rows = first_fit_decreasing([SEQ] * len(items), PACKED_ROW, window=len(items))
    batch = collate_packed([[items[i] for i in row] for row in rows], pad_to=PACKED_ROW,
                           pad_token_id=config.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids",
                                  *VISION_KEYS) if batch[k] is not None}


def micro_batches(config: Qwen2VLConfig, dp: int = 1, dp_rank: int = 0, packed: bool = False,
                  media: bool = False) -> list[list[dict[str, np.ndarray]]]:
    """[step][micro] -> this dp rank's numpy batch (dp=1: the whole global micro-batch); `packed`: the same
    samples in packed rows; `media`: the _MEDIA samples instead of _IMAGES'."""
    rng = np.random.RandomState(SEED)
    kinds = _MEDIA if media else [(grids, []) for grids in _IMAGES]
    per_rank = GLOBAL_MICRO_BATCH // dp
    out, k = [], 0
    for _ in range(STEPS):
        step = []
        for _ in range(ACCUMULATION):
            samples = [_sample(config, rng, *kinds[(k + i) % len(kinds)]) for i in range(GLOBAL_MICRO_BATCH)]
            k += GLOBAL_MICRO_BATCH
            mine = samples[dp_rank * per_rank:(dp_rank + 1) * per_rank]
            step.append(_packed_batch(config, mine) if packed else _batch(config, mine))
        out.append(step)
    return out


def train_reference(model, optimizer, config: Qwen2VLConfig, media: bool = False) -> list[float]:
    """Single-process steps over `micro_batches` with the plain model's `causal_lm_loss` and the global token
    count as normalizer (what every layout must reproduce); returns the loss of each step."""
    losses = []
    for step in micro_batches(config, media=media):
        normalizer = float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in step))
        total = 0.0
        for b in step:
            out = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                        pixel_values=b.get("pixel_values"), image_grid_thw=b.get("image_grid_thw"),
                        pixel_values_videos=b.get("pixel_values_videos"), video_grid_thw=b.get("video_grid_thw"),
                        labels=b["labels"], loss_normalizer=normalizer)
            out.loss.backward()
            total += float(out.loss)
        optimizer.step()
        optimizer.clear_grad()
        step_schedule(optimizer)
        losses.append(total)
    return losses


def reference_run(mode: str, media: bool = False) -> dict:
    """Single process, plain model and `causal_lm_loss` with the global token count as normalizer; `media`: on
    the MEDIA layouts' samples."""
    config = tiny_config()
    model = build_model(config)
    for name, p in model.named_parameters():
        p.stop_gradient = not MODES[mode].trains(name)
    optimizer = build_optimizer(model, paddle_clip=True, mode=mode)
    apply_module_learning_rates(model, mode_training_args(mode))
    losses = train_reference(model, optimizer, config, media)
    params = {n: p.numpy() for n, p in model.named_parameters()}
    return {"losses": losses, "params": params}
