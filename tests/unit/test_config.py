"""Qwen2VLConfig: Hub flat layout, transformers-5 nested layout, presets, transformers round trip."""
import copy
import json

import pytest
import transformers

from network.config import PRESETS, Qwen2VLConfig

_VISION_HUB = {  # vision_config as shipped (original Qwen key names: in_chans, spatial_patch_size)
    "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "patch_size": 14,
    "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
}
_COMMON_HUB = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 32768, "model_type": "qwen2_vl", "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "use_cache": True, "use_sliding_window": False, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
# Published config.json fields of Qwen/Qwen2-VL-{2B,7B,72B}-Instruct.
HUB_CONFIGS = {
    "qwen2-vl-2b": {**_COMMON_HUB, "hidden_size": 1536, "intermediate_size": 8960, "max_window_layers": 28,
                    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
                    "tie_word_embeddings": True, "vocab_size": 151936,
                    "vision_config": {**_VISION_HUB, "hidden_size": 1536}},
    "qwen2-vl-7b": {**_COMMON_HUB, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
                    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
                    "tie_word_embeddings": False, "vocab_size": 152064,
                    "vision_config": {**_VISION_HUB, "hidden_size": 3584}},
    "qwen2-vl-72b": {**_COMMON_HUB, "hidden_size": 8192, "intermediate_size": 29568, "max_window_layers": 80,
                     "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
                     "tie_word_embeddings": False, "vocab_size": 152064,
                     "vision_config": {**_VISION_HUB, "hidden_size": 8192}},
}


def _nested(flat: dict, tie: bool) -> dict:
    """The same model as transformers 5 writes it: LLM fields in text_config, rope_parameters,
    tie_word_embeddings only at the top level."""
    text_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                 "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act", "attention_dropout",
                 "max_window_layers", "use_sliding_window", "sliding_window", "bos_token_id", "eos_token_id")
    text = {k: flat[k] for k in text_keys}
    text.update(model_type="qwen2_vl_text", dtype="bfloat16",
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
    vision = {k: v for k, v in flat["vision_config"].items() if k not in ("in_chans", "spatial_patch_size")}
    vision.update(in_channels=3, hidden_act="quick_gelu", model_type="qwen2_vl", initializer_range=0.02)
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "dtype": "bfloat16",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": tie, "transformers_version": "5.0.0",
        "text_config": text, "vision_config": vision,
    }


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_presets_equal_published_configs(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[name]))
    assert Qwen2VLConfig.from_pretrained(str(tmp_path)) == Qwen2VLConfig.preset(name)


@pytest.mark.parametrize("name", ["qwen2-vl-2b", "qwen2-vl-7b"])
def test_nested_layout_equals_flat(name, tmp_path):
    flat = HUB_CONFIGS[name]
    nested = _nested(flat, tie=flat["tie_word_embeddings"])
    assert "tie_word_embeddings" not in nested["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(nested))
    assert Qwen2VLConfig.from_pretrained(str(tmp_path)) == Qwen2VLConfig.from_dict(flat)


def test_top_level_tie_wins_over_text_config():
    nested = _nested(HUB_CONFIGS["qwen2-vl-7b"], tie=False)
    nested["text_config"]["tie_word_embeddings"] = True
    assert Qwen2VLConfig.from_dict(nested).tie_word_embeddings is False


def test_qvq_differs_from_72b_only_in_context_length():
    qvq, base = Qwen2VLConfig.preset("qvq-72b-preview"), Qwen2VLConfig.preset("qwen2-vl-72b")
    assert qvq.max_position_embeddings == 128000
    base.max_position_embeddings = 128000
    assert qvq == base


def test_tiny_preset_shapes():
    c = Qwen2VLConfig.preset("tiny")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (151936, 128, 256, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.mrope_section) == (4, 2, 32, [4, 6, 6])
    v = c.vision_config
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_ratio, v.hidden_size) == (2, 64, 4, 2, 128)
    assert c.tie_word_embeddings


def test_missing_field_names_field_and_file(tmp_path):
    broken = copy.deepcopy(HUB_CONFIGS["qwen2-vl-2b"])
    del broken["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(KeyError, match=r"config\.json.*intermediate_size"):
        Qwen2VLConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_round_trips_and_loads_in_transformers(name, tmp_path):
    ours = Qwen2VLConfig.preset(name)
    ours.save_pretrained(str(tmp_path))
    assert Qwen2VLConfig.from_pretrained(str(tmp_path)) == ours
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    text = hf.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (
        ours.hidden_size, ours.num_hidden_layers, ours.num_key_value_heads, ours.vocab_size)
    assert text.rope_scaling["mrope_section"] == ours.mrope_section and text.rope_theta == ours.rope_theta
    assert text.tie_word_embeddings == hf.tie_word_embeddings == ours.tie_word_embeddings
    assert hf.model_type == ours.model_type
    v = hf.vision_config  # Qwen2.5-VL names the ViT width hidden_size and the merger output out_hidden_size
    widths = (v.embed_dim, v.hidden_size) if ours.model_type == "qwen2_vl" else (v.hidden_size, v.out_hidden_size)
    assert widths == (ours.vision_config.embed_dim, ours.vision_config.hidden_size)
    assert hf.vision_start_token_id == ours.vision_start_token_id and hf.image_token_id == ours.image_token_id


def test_compact_vision_config_takes_hf_vision_defaults(tmp_path):
    """transformers >= 4.45 re-saves only non-default vision keys (LLaMA-Factory/TRL outputs, QVQ copies)."""
    compact = copy.deepcopy(HUB_CONFIGS["qwen2-vl-2b"])
    compact["vision_config"] = {"hidden_size": 1536, "in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}
    (tmp_path / "config.json").write_text(json.dumps(compact))
    ours = Qwen2VLConfig.from_pretrained(str(tmp_path))
    assert ours == Qwen2VLConfig.preset("qwen2-vl-2b")
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path)).vision_config  # the oracle: HF's own defaults
    v = ours.vision_config
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_ratio, v.patch_size, v.spatial_merge_size,
            v.temporal_patch_size) == (hf.depth, hf.embed_dim, hf.num_heads, hf.mlp_ratio, hf.patch_size,
                                       hf.spatial_merge_size, hf.temporal_patch_size)
