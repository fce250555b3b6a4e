"""Parity with HF transformers 4.55 Qwen2-VL (fp32, eager attention) on tiny random checkpoints."""
import types

import numpy as np
import paddle
import pytest
import torch
from hf_oracle import (Sample, assert_forward_parity, build_batch, hf_model, max_relative_grad_diff,
                       random_vision_layouts, tiny_config)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.rope_index import get_rope_index, get_rope_index_for_config

CASES = {
    "text": ([Sample(6, [], 5)], "right"),
    "one_image": ([Sample(4, [("image", (1, 4, 6))], 5)], "right"),
    "two_images_different_sizes": ([Sample(3, [("image", (1, 4, 6)), ("image", (1, 8, 4))], 4)], "right"),
    "video": ([Sample(3, [("video", (2, 4, 4))], 4)], "right"),
    "batch2_left_pad": ([Sample(3, [("image", (1, 4, 6))], 4), Sample(9, [], 3)], "left"),
    "batch2_right_pad": ([Sample(2, [("video", (2, 4, 4))], 3), Sample(5, [("image", (1, 6, 4))], 6)], "right"),
}


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def models(request, tmp_path_factory):
    config = tiny_config(tied=request.param)
    hf = hf_model(config, seed=1)
    path = tmp_path_factory.mktemp("hf_tied" if request.param else "hf_untied")
    hf.save_pretrained(str(path))
    ours = Qwen2VLForConditionalGeneration.from_pretrained(str(path))
    assert ("lm_head.weight" in ours.state_dict()) is not request.param
    return config, hf, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity(models, case):
    config, hf, ours = models
    samples, side = CASES[case]
    label = f"{case}/{'tied' if config.tie_word_embeddings else 'untied'}"
    assert_forward_parity(config, hf, ours, build_batch(config, samples, side, seed=sorted(CASES).index(case)), label)


def test_parity_real_vocab(tmp_path):
    """The tiny preset exactly (vocab 151936, real special token ids)."""
    config = tiny_config(tied=True, small_vocab=False)
    hf = hf_model(config, seed=2)
    hf.save_pretrained(str(tmp_path))
    ours = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))
    batch = build_batch(config, [Sample(4, [("image", (1, 4, 4))], 4)], seed=3)
    assert_forward_parity(config, hf, ours, batch, "real_vocab/one_image")


def test_explicit_position_ids_match_default(models):
    config, _, ours = models
    batch = build_batch(config, *CASES["batch2_left_pad"])
    positions, _ = get_rope_index_for_config(
        config, batch["input_ids"], batch["image_grid_thw"], None, batch["attention_mask"]
    )
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
    with paddle.no_grad():
        a = ours(**inputs).logits.numpy()
        b = ours(**inputs, position_ids=paddle.to_tensor(positions)).logits.numpy()
        with pytest.raises(ValueError, match=r"\[3, batch, seq\]"):
            ours(**inputs, position_ids=paddle.to_tensor(positions[0]))
    np.testing.assert_array_equal(a, b)


def test_feature_token_count_mismatch_is_an_error(models):
    config, _, ours = models
    batch = build_batch(config, *CASES["one_image"])
    batch["image_grid_thw"] = np.array([[1, 4, 4]])
    batch["pixel_values"] = batch["pixel_values"][:16]
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        ours(**{k: paddle.to_tensor(v) for k, v in batch.items()})


def test_rope_index_matches_hf_on_random_layouts():
    """Mixed images/videos in any order, left/right padding, text-only rows, no mask; Qwen2-VL ignores
    second_per_grid_ts."""
    ids = dict(image_token_id=505, video_token_id=506, vision_start_token_id=502)
    hf_self = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=2), **ids))
    for trial, input_ids, mask_arg, image, video, seconds in random_vision_layouts():
        expected = Qwen2VLModel.get_rope_index(
            hf_self, torch.from_numpy(input_ids), *(None if g is None else torch.from_numpy(g) for g in (image, video)),
            None if mask_arg is None else torch.from_numpy(mask_arg),
        )
        got = get_rope_index(input_ids, image, video, mask_arg, seconds if video is not None else None,
                             spatial_merge_size=2, **ids)
        np.testing.assert_array_equal(got[0], expected[0].numpy(), err_msg=f"trial {trial}")
        np.testing.assert_array_equal(got[1], expected[1].numpy().reshape(-1, 1), err_msg=f"trial {trial}")


def test_gradients_match(models):
    """Training path: loss gradients (through vision scatter, M-RoPE, tied/untied head) equal HF's."""
    config, hf, ours = models
    worst = max_relative_grad_diff(hf, ours, build_batch(config, *CASES["batch2_right_pad"]))
    print(f"[parity] gradients: max relative |dgrad|={worst:.2e}")
    assert worst <= 1e-4
