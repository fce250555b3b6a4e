"""Checkpoint I/O: HF safetensors <-> ours <-> .pdparams, sharding, bf16, renamed keys, clear errors."""
import json
import os

import ml_dtypes
import numpy as np
import paddle
import pytest
import torch
import transformers
from hf_oracle import Sample, build_batch, hf_forward, hf_model, tiny_config

from network import weights
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

BATCH_SAMPLES = [Sample(3, [("image", (1, 4, 6))], 4), Sample(5, [("video", (2, 4, 4))], 3)]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_checkpoint(request, tmp_path_factory):
    config = tiny_config(tied=request.param)
    hf = hf_model(config, seed=3)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(str(path))
    return config, hf, str(path)


def _logits(model, batch) -> np.ndarray:
    with paddle.no_grad():
        return model(**{k: paddle.to_tensor(v) for k, v in batch.items()}).logits.numpy()


def test_hf_to_pdparams_to_safetensors_round_trip(hf_checkpoint, tmp_path):
    config, hf, path = hf_checkpoint
    batch = build_batch(config, BATCH_SAMPLES, seed=5)
    first = Qwen2VLForConditionalGeneration.from_pretrained(path)
    reference = _logits(first, batch)

    first.save_pretrained(str(tmp_path / "pd"), format="paddle")
    assert sorted(os.listdir(tmp_path / "pd")) == ["config.json", "model_state.pdparams"]
    second = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "pd"))
    np.testing.assert_array_equal(_logits(second, batch), reference)

    # Small shards force the index.json path; transformers must load it back to identical weights.
    weights.save_weights(second, str(tmp_path / "st"), max_shard_bytes=1 << 20)
    second.config.save_pretrained(str(tmp_path / "st"))
    assert os.path.exists(tmp_path / "st" / weights.SAFE_INDEX)
    third = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "st"))
    np.testing.assert_array_equal(_logits(third, batch), reference)

    reloaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        str(tmp_path / "st"), attn_implementation="eager", torch_dtype=torch.float32).eval()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    hf_logits, _, _ = hf_forward(reloaded, batch)
    keep = batch["attention_mask"].astype(bool)
    assert np.abs(hf_logits[keep] - reference[keep]).max() <= 1e-4


def test_linear_table_matches_model_layers():
    model = Qwen2VLForConditionalGeneration(tiny_config(tied=False))
    linear = {f"{n}.weight" for n, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    assert {n for n in model.state_dict() if weights.is_linear_weight(n)} == linear


def test_bf16_checkpoint_and_new_hf_names(hf_checkpoint, tmp_path):
    config, hf, _ = hf_checkpoint
    hf_bf16 = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    # HF 4.55's in-memory names (model.language_model.*, model.visual.*), HF layout, stored as bf16.
    in_memory = (
        (k, v.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
        for k, v in hf_bf16.items() if not (config.tie_word_embeddings and k == "lm_head.weight")
    )
    weights.write_safetensors(in_memory, str(tmp_path))
    config.save_pretrained(str(tmp_path))
    names = {name for name, _ in weights.read_safetensors(str(tmp_path / weights.SAFE_WEIGHTS))}
    assert any(n.startswith("model.language_model.") for n in names)
    assert any(n.startswith("model.visual.") for n in names)

    ours = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), dtype="bfloat16")
    state = ours.state_dict()
    assert {str(t.dtype) for t in state.values()} == {"paddle.bfloat16"}
    for name, tensor in hf_bf16.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        ours_name = weights.canonical_name(name)
        expected = weights.to_paddle_layout(ours_name, tensor.view(torch.int16).numpy().view(np.uint16))
        np.testing.assert_array_equal(state[ours_name].numpy(), expected, err_msg=name)


def _rewrite(src: str, dst: str, edit) -> None:
    tensors = dict(weights.read_safetensors(os.path.join(src, weights.SAFE_WEIGHTS)))
    weights.write_safetensors(edit(tensors).items(), dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


def test_errors_name_key_file_and_shapes(hf_checkpoint, tmp_path):
    config, _, path = hf_checkpoint
    stored = {name for name, _ in weights.read_safetensors(os.path.join(path, weights.SAFE_WEIGHTS))}
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in stored  # tied checkpoints may lack it (they load in the tests above)
    else:
        _rewrite(path, str(tmp_path / "no_head"), lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
        with pytest.raises(ValueError, match=r"missing key 'lm_head.weight' \(not found in .*model.safetensors\)"):
            Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "no_head"))

    def bad_shape(t):
        t = dict(t)
        t["model.norm.weight"] = np.zeros(7, np.float32)
        t["model.extra.weight"] = np.zeros(2, np.float32)
        return t
    _rewrite(path, str(tmp_path / "bad"), bad_shape)
    with pytest.raises(ValueError) as err:
        Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "bad"))
    message = str(err.value)
    assert "shape mismatch for 'model.norm.weight'" in message and "expects [128]" in message and "has [7]" in message
    assert "unexpected key 'model.extra.weight'" in message and "model.safetensors" in message
