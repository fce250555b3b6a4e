"""Issue #30 loss masks users choose (LLaMA-Factory train_on_prompt / mask_history, ms-swift loss_scale) and
token budgets, on a 3-turn sample with a system prompt and an image, token by token."""
import json

import numpy as np
import pytest
from PIL import Image

from autoparallel.config import ConfigError, RunConfig
from autoparallel.data import IGNORE_INDEX, DataConfig, SFTDataset
from network.processor import Qwen2VLProcessor

VS, VE, IMG = 151652, 151653, 151655


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLProcessor.from_pretrained(None)


def sample(tmp_path, processor, size=56, **config):
    Image.new("RGB", (size, size), (200, 30, 30)).save(tmp_path / "a.png")
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"},
                           {"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "square"},
                           {"role": "user", "content": "Size?"}, {"role": "assistant", "content": "small"}],
              "images": ["a.png"]}
    (tmp_path / "ann.json").write_text(json.dumps([record]))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "ann.json", "root": str(tmp_path)}}))
    out = SFTDataset(DataConfig(meta_path=str(tmp_path / "meta.json"), **config), processor).sample(0)
    return out["input_ids"], out["labels"]


def supervised_text(processor, ids, labels):
    return processor.tokenizer.decode([int(i) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_default_supervises_every_answer(tmp_path, processor):
    ids, labels = sample(tmp_path, processor)
    assert supervised_text(processor, ids, labels) == "red<|im_end|>square<|im_end|>small<|im_end|>"


@pytest.mark.parametrize("config", [{"mask_history": True}, {"loss_scale": "last_round"}])
def test_mask_history_supervises_the_last_answer_only(tmp_path, processor, config):
    ids, labels = sample(tmp_path, processor, **config)
    assert supervised_text(processor, ids, labels) == "small<|im_end|>"


@pytest.mark.parametrize("config", [{"train_on_prompt": True}, {"loss_scale": "all"}])
def test_train_on_prompt_supervises_all_but_vision_and_the_newline_after_answers(tmp_path, processor, config):
    ids, labels = sample(tmp_path, processor, **config)
    vision = np.isin(ids, [VS, VE, IMG])
    assert (labels[vision] == IGNORE_INDEX).all()
    supervised = labels != IGNORE_INDEX
    assert supervised.sum() == len(ids) - vision.sum() - 3  # the "\n" after each of the 3 answers
    assert np.array_equal(labels[supervised], ids[supervised])
    assert supervised_text(processor, ids, labels).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_image_token_budget_caps_the_image_tokens(tmp_path, processor):
    """ms-swift IMAGE_MAX_TOKEN_NUM: a 280x280 image is 100 tokens; a budget of 16 caps it before tokenisation."""
    ids, _ = sample(tmp_path, processor, size=280)
    assert (ids == IMG).sum() == 100
    ids, _ = sample(tmp_path, processor, size=280, image_max_token_num=16)
    assert 0 < (ids == IMG).sum() <= 16


def test_token_budgets_map_to_pixels_and_refuse_contradictions():
    cfg = RunConfig.build("sft", [("t", {"image_max_token_num": 256, "video_max_token_num": 64,
                                         "video_max_frames": 16})])
    assert (cfg.data.max_pixels, cfg.data.video_max_pixels, cfg.data.video_maxlen) == (256 * 784, 64 * 784, 16)
    with pytest.raises(ConfigError, match="image_max_token_num=4 must be > 0 and agree with max_pixels=1000"):
        RunConfig.build("sft", [("t", {"image_max_token_num": 4, "max_pixels": 1000})])
