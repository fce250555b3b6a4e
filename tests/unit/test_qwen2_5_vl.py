"""Qwen2.5-VL against HF transformers 4.55 (`Qwen2_5_VLForConditionalGeneration`, fp32, eager attention) on tiny
random checkpoints: config round trip and presets, window order, rope indices with `second_per_grid_ts`,
forward/loss/gradient parity, greedy generation."""
import json
import types

import numpy as np
import paddle
import pytest
import torch
import transformers
from hf_oracle import (SMALL_VOCAB, Sample, assert_forward_parity, build_batch, hf_model, max_relative_grad_diff,
                       random_vision_layouts, tiny_config)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLModel,
)

from network.config import PRESETS, Qwen2_5_VLVisionConfig, Qwen2VLConfig
from network.generation import GenerationConfig, generate
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.modeling_vision_window import window_order
from network.rope_index import get_rope_index
from network.weights import canonical_name
from placements.qwen2_vl import parameter_shapes

PRESET = "tiny-qwen2.5-vl"
# Image grids (in patches) are cut by the 4 x 4-patch windows of the tiny preset in every direction.
CASES = {
    "text": ([Sample(6, [], 5)], "right"),
    "one_image": ([Sample(4, [("image", (1, 6, 10))], 5)], "right"),
    "two_images_different_sizes": ([Sample(3, [("image", (1, 4, 6)), ("image", (1, 10, 4))], 4)], "right"),
    "video_2s_per_grid": ([Sample(3, [("video", (3, 4, 6), 2.0)], 4)], "right"),
    "batch2_left_pad_video_image": (
        [Sample(3, [("image", (1, 4, 6)), ("video", (2, 6, 4), 1.0)], 4), Sample(9, [], 3)], "left"),
    "batch2_right_pad_two_videos": (
        [Sample(2, [("video", (2, 4, 4), 3.0)], 3), Sample(5, [("video", (4, 4, 6), 1.0)], 6)], "right"),
}


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def models(request, tmp_path_factory):
    config = tiny_config(tied=request.param, preset=PRESET)
    hf = hf_model(config, seed=1)
    path = tmp_path_factory.mktemp("hf25_tied" if request.param else "hf25_untied")
    hf.save_pretrained(str(path))
    ours = Qwen2VLForConditionalGeneration.from_pretrained(str(path))
    return config, hf, ours, path


def test_hf_checkpoint_is_read_as_qwen2_5_vl(models):
    config, hf, ours, path = models
    saved = json.loads((path / "config.json").read_text())
    assert saved["model_type"] == "qwen2_5_vl"
    assert ours.config == config
    hf_names = {canonical_name(k) for k in hf.state_dict()}  # HF 4.55 in-memory names (model.language_model.*)
    assert hf_names == set(ours.state_dict()) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert parameter_shapes(config) == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_paddle_and_safetensors_round_trips(models, tmp_path):
    """save_pretrained in both formats (PaddleMIX pdparams keeps Paddle layout, safetensors HF layout) reloads
    the same weights; the SwiGLU ViT weights are transposed like every Linear."""
    _, _, ours, _ = models
    for fmt in ("paddle", "safetensors"):
        ours.save_pretrained(str(tmp_path / fmt), format=fmt)
        again = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / fmt))
        for name, value in ours.state_dict().items():
            np.testing.assert_array_equal(again.state_dict()[name].numpy(), value.numpy(), err_msg=f"{fmt} {name}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity(models, case):
    config, hf, ours, _ = models
    samples, side = CASES[case]
    label = f"qwen2.5-vl {case}/{'tied' if config.tie_word_embeddings else 'untied'}"
    assert_forward_parity(config, hf, ours, build_batch(config, samples, side, seed=sorted(CASES).index(case)), label)


def test_gradients_match(models):
    config, hf, ours, _ = models
    worst = max_relative_grad_diff(hf, ours, build_batch(config, *CASES["batch2_right_pad_two_videos"]))
    print(f"[parity] qwen2.5-vl gradients (ViT included): max relative |dgrad|={worst:.2e}")
    assert worst <= 1e-4


def test_window_order_matches_hf():
    """Patch order and window boundaries equal HF's `get_window_index` (merged-token order, then expanded)."""
    rng = np.random.default_rng(0)
    for window_size in (56, 112):
        vision = Qwen2_5_VLVisionConfig(depth=1, embed_dim=8, hidden_size=8, num_heads=1, intermediate_size=8,
                                        window_size=window_size)
        hf_self = types.SimpleNamespace(window_size=window_size, spatial_merge_size=2, patch_size=14,
                                        spatial_merge_unit=4)
        for _ in range(10):
            grid = np.array([[int(rng.integers(1, 4)), 2 * int(rng.integers(1, 10)), 2 * int(rng.integers(1, 10))]
                             for _ in range(rng.integers(1, 4))])
            index, cu = Qwen2_5_VisionTransformerPretrainedModel.get_window_index(hf_self, torch.from_numpy(grid))
            order, bounds = window_order(grid, 2, window_size // 28)
            expected = (index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
            np.testing.assert_array_equal(order, expected)
            np.testing.assert_array_equal(bounds, torch.unique_consecutive(torch.tensor(cu)).numpy())
            assert vision.window_size == window_size


def _hf_rope(input_ids, image, video, seconds, mask):
    ids = dict(image_token_id=505, video_token_id=506, vision_start_token_id=502)
    hf_self = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2), **ids))
    as_t = (lambda a: None if a is None else torch.from_numpy(a))
    positions, deltas = Qwen2_5_VLModel.get_rope_index(hf_self, as_t(input_ids), as_t(image), as_t(video),
                                                       as_t(seconds), as_t(mask))
    return positions.numpy(), deltas.numpy().reshape(-1, 1)


def _rope(input_ids, image, video, seconds, mask):
    return get_rope_index(input_ids, image, video, mask, seconds, spatial_merge_size=2, image_token_id=505,
                          video_token_id=506, vision_start_token_id=502, tokens_per_second=2)


def test_rope_index_matches_hf_on_random_layouts():
    """Mixed images/videos (integer seconds per grid, or none), left/right padding, text-only rows, no mask."""
    for trial, input_ids, mask_arg, image, video, seconds in random_vision_layouts():
        secs = seconds if video is not None and trial % 3 else None  # None: 1 s per grid
        expected = _hf_rope(input_ids, image, video, secs, mask_arg)
        got = _rope(input_ids, image, video, secs, mask_arg)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=f"trial {trial}")
        np.testing.assert_array_equal(got[1], expected[1], err_msg=f"trial {trial}")


def test_fractional_seconds_keep_time_unlike_hf_4_55():
    """0.5 s per grid (4 fps): time advances 1 per temporal patch (0.5 s x 2 tokens/s) here; HF 4.55 truncates
    0.5 to 0 first and puts every frame at time 0 (fixed in later transformers)."""
    ids = np.array([[1, 502] + [506] * 16 + [503, 2]])  # one video of 4 temporal patches x 2 x 2 merged tokens
    video, seconds = np.array([[4, 4, 4]]), np.array([0.5], np.float32)
    got, _ = _rope(ids, None, video, seconds, None)
    hf, _ = _hf_rope(ids, None, video, seconds, None)
    start = 2  # first video token
    np.testing.assert_array_equal(got[0, 0, start:start + 16:4] - start, [0, 1, 2, 3])
    np.testing.assert_array_equal(hf[0, 0, start:start + 16:4] - start, [0, 0, 0, 0])
    # Height/width of the video agree; the text after it starts after the largest time, so later here.
    np.testing.assert_array_equal(got[1:, :, :start + 16], hf[1:, :, :start + 16])
    assert got[0, 0, -1] == hf[0, 0, -1] + 2  # largest coordinate 3 (time) here, 1 (height/width) in HF


def test_second_per_grid_ts_count_is_checked():
    ids = np.array([[502] + [506] * 4 + [503]])
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 entries for 1 videos"):
        _rope(ids, None, np.array([[1, 4, 4]]), np.array([1.0, 2.0]), None)


def test_config_round_trips_through_transformers(tmp_path):
    for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b", PRESET):
        ours = Qwen2VLConfig.preset(name)
        hf = transformers.Qwen2_5_VLConfig(**ours.to_dict())
        hf.save_pretrained(str(tmp_path / name))
        back = Qwen2VLConfig.from_pretrained(str(tmp_path / name))
        assert back == ours, name
        assert (hf.vision_config.hidden_size, hf.vision_config.out_hidden_size) == (
            ours.vision_config.embed_dim, ours.vision_config.hidden_size)


# Qwen/Qwen2.5-VL-3B-Instruct config.json as published (vision_config with the original key names).
HUB_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


def test_3b_preset_equals_published_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_3B))
    assert Qwen2VLConfig.from_pretrained(str(tmp_path)) == PRESETS["qwen2.5-vl-3b"]()


def test_unknown_model_type_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HUB_3B, "model_type": "qwen3_vl"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'qwen3_vl' is not supported; known: "):
        Qwen2VLConfig.from_pretrained(str(tmp_path))


def test_missing_window_field_names_the_file(tmp_path):
    broken = json.loads(json.dumps(HUB_3B))
    del broken["vision_config"]["window_size"]
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(KeyError, match=r"config.json: required config field 'vision_config.window_size'"):
        Qwen2VLConfig.from_pretrained(str(tmp_path))


NEW_TOKENS = 16
PROMPTS = {"image": Sample(4, [("image", (1, 6, 10))], 0), "video": Sample(3, [("video", (3, 4, 6), 2.0)], 0)}


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_greedy_generation_matches_hf(models, case):
    config, hf, ours, _ = models
    batch = build_batch(config, [PROMPTS[case]], seed=7)
    batch.pop("labels")
    with torch.no_grad():
        expected = hf.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=SMALL_VOCAB["pad_token_id"])
    expected = expected[:, batch["input_ids"].shape[1]:].numpy()
    out = generate(ours, **batch, generation_config=GenerationConfig(max_new_tokens=NEW_TOKENS,
                                                                     min_new_tokens=NEW_TOKENS))
    print(f"[generate] qwen2.5-vl {case}: {len(np.unique(out.sequences))} distinct of {NEW_TOKENS} tokens")
    np.testing.assert_array_equal(out.sequences, expected)


def test_dataset_positions_follow_video_time(tmp_path):
    """SFTDataset's position_ids for image + video records (sampled at 1 fps: 2 s per temporal patch) equal HF's
    Qwen2.5-VL rope index; without the model's time scale they are Qwen2-VL's (frame counts) instead."""
    from qwen2_5_vl_runs import write_image_video_dataset

    from autoparallel.data import DataConfig, SFTDataset

    meta = write_image_video_dataset(tmp_path, n=2)
    data = DataConfig(meta_path=meta, max_seq_length=256, video_fps=1.0, video_min_pixels=3136,
                      video_max_pixels=6272)
    config = Qwen2VLConfig.preset(PRESET)
    hf_self = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2),
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id))
    timed = SFTDataset(data, video_tokens_per_second=2)
    plain = SFTDataset(data, processor=timed.processor)
    for i in range(2):
        sample = timed[i]
        np.testing.assert_array_equal(sample["second_per_grid_ts"], [2.0])
        as_t = (lambda key: torch.from_numpy(sample[key]) if key in sample else None)
        expected, _ = Qwen2_5_VLModel.get_rope_index(
            hf_self, torch.from_numpy(sample["input_ids"][None]), as_t("image_grid_thw"), as_t("video_grid_thw"),
            as_t("second_per_grid_ts"))
        np.testing.assert_array_equal(sample["position_ids"], expected[:, 0].numpy())
        assert (plain[i]["position_ids"][0] != sample["position_ids"][0]).any()
