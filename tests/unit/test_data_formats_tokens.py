"""Issue #30: the same OpenAI content list gives the same tokens in training (records → SFTDataset) and in
`serve` (launch/serving/messages.py build_prompt), including the system prompt and image spans."""
import json

import numpy as np
from PIL import Image

from autoparallel.data import DataConfig, SFTDataset
from autoparallel.data.records import parse_record
from launch.serving.messages import ChatRequest, MediaLimits, build_prompt
from network.processor import Qwen2VLProcessor


def test_content_list_tokens_equal_in_training_and_serve(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (56, 84), (200, 30, 30)).save(a)
    Image.new("RGB", (112, 56), (30, 200, 30)).save(b)
    content = [{"type": "text", "text": "Compare "}, {"type": "image", "image": str(a)},
               {"type": "text", "text": " with"}, {"type": "image_url", "image_url": {"url": f"file://{b}"}},
               {"type": "text", "text": "."}]
    record = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Red, green."}]}
    (tmp_path / "ann.json").write_text(json.dumps([record]))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "ann.json"}}))
    processor = Qwen2VLProcessor.from_pretrained(None)
    dataset = SFTDataset(DataConfig(meta_path=str(tmp_path / "meta.json")), processor)
    conv = parse_record(record, "f", 0, None)
    training = dataset.generation_inputs(conv.turns[0][0], conv.images)["input_ids"]
    request = ChatRequest.model_validate({"messages": [{"role": "user", "content": content}]})
    served = build_prompt(request, processor, MediaLimits(media_dir=str(tmp_path))).inputs["input_ids"][0]
    assert len(training) > 20 and np.array_equal(np.asarray(training), np.asarray(served))
    # and the training sample itself starts with exactly those prompt tokens
    sample = dataset.sample(0)["input_ids"]
    assert np.array_equal(sample[:len(served)], served)
