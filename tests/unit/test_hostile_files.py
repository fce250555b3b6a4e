"""Crafted safetensors headers (L6) and config.json values (L7) of security review 2, section 6: each is refused
with one FormatError naming the file and the tensor or key, instead of wrong data, a traceback or a hang."""
from __future__ import annotations

import copy
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from network.config import PRESETS, Qwen2VLConfig
from network.formats import FormatError, index_safetensors, read_ref
from test_config import HUB_CONFIGS
from test_qwen2_5_vl import HUB_3B


def write_safetensors(path: Path, header, data: bytes = b"\0" * 16) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(offsets, shape=(2,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_L6_a_genuine_file_still_indexes(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int64),
              "empty": np.zeros((0, 3), np.float32)}
    save_file(arrays, str(tmp_path / "m.safetensors"))
    refs = index_safetensors(str(tmp_path / "m.safetensors"))
    assert all(np.array_equal(read_ref(refs[k]), v) for k, v in arrays.items())


DEEP = b"[" * 100_000 + b"]" * 100_000
# case -> (header, what the one line says)
CRAFTED_HEADERS = {
    "negative_offsets": ({"w": entry([-8, 0])}, "tensor 'w': data_offsets [-8, 0] are not [begin, end]"),
    "int64_overflowing_shape": ({"w": entry([0, 0], shape=(2**32, 2**32))},
                                "tensor 'w' has 0 bytes, its shape [4294967296, 4294967296] F32 needs "
                                "73786976294838206464"),
    "negative_shape": ({"w": entry([0, 16], shape=(-1, -4))}, "tensor 'w': shape [-1, -4] is not a list of "
                                                              "non-negative integers"),
    "list_header": ([], "the header is a JSON list, not an object"),
    "entry_is_a_number": ({"w": 5}, "tensor 'w': header entry is a int, not an object"),
    "no_dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "tensor 'w': missing or unsupported dtype None"),
    "list_dtype": ({"w": entry([0, 8], dtype=["F32"])}, "tensor 'w': missing or unsupported dtype ['F32']"),
    "deep_nesting": (DEEP, "truncated or not a safetensors file (RecursionError"),
    "overlap": ({"a": entry([0, 8]), "b": entry([4, 12])}, "tensors 'a' and 'b' overlap"),
    "beyond_the_file": ({"w": entry([8, 24], shape=(4,))}, "tensor 'w' ends at byte"),
    "float_shape": ({"w": entry([0, 8], shape=(2.0,))}, "tensor 'w': shape [2.0] is not a list"),
    "begin_after_end": ({"w": entry([8, 0])}, "tensor 'w': data_offsets [8, 0] are not [begin, end]"),
}


@pytest.mark.parametrize("case", list(CRAFTED_HEADERS))
def test_L6_crafted_safetensors_header_is_one_format_error(tmp_path, case):
    header, says = CRAFTED_HEADERS[case]
    file = write_safetensors(tmp_path / "m.safetensors", header)
    with pytest.raises(FormatError) as info:
        index_safetensors(str(file))
    message = str(info.value)
    assert message.startswith(f"{file}: ") and says in message and "\n" not in message, message


def hub_config(**changes) -> dict:
    config = copy.deepcopy(HUB_CONFIGS["qwen2-vl-2b"])
    for key, value in changes.items():
        where = config["vision_config"] if key.startswith("vision_config.") else config
        where[key.removeprefix("vision_config.")] = value
    return config


# The review's table, plus the neighbours each check guards.
ABSURD = {
    "hidden_size": (10**9, "'hidden_size' = 1000000000 must be an integer between 1 and 65536"),
    "vocab_size": (10**12, "'vocab_size' = 1000000000000 must be an integer between 1 and 4194304"),
    "num_attention_heads": (0, "'num_attention_heads' = 0 must be an integer between 1"),
    "intermediate_size": (-5, "'intermediate_size' = -5 must be an integer between 1"),
    "num_hidden_layers": (10**7, "'num_hidden_layers' = 10000000 must be an integer between 1 and 1024"),
    "vision_config.depth": (10**6, "'vision_config.depth' = 1000000 must be an integer between 1 and 1024"),
    "max_position_embeddings": (10**12, "'max_position_embeddings' = 1000000000000 must be an integer"),
    "num_key_value_heads": (5, "num_attention_heads 12 is not divisible by num_key_value_heads 5"),
    "vision_config.num_heads": (7, "must split into num_heads 7 heads"),
    "rms_norm_eps": (-1.0, "'rms_norm_eps' = -1.0 must be a number in (0, 1]"),
    "vision_config.mlp_ratio": (1e9, "'vision_config.mlp_ratio' = 1000000000.0 must be a number in (0, 64]"),
}


@pytest.mark.parametrize("key", list(ABSURD) + ["hidden_size_text", "hidden_size_indivisible", "mrope_section"])
def test_L7_absurd_config_value_is_one_line_naming_file_and_key(tmp_path, key):
    if key == "hidden_size_text":
        config, says = hub_config(hidden_size="big"), "'hidden_size' = 'big' must be an integer"
    elif key == "hidden_size_indivisible":
        config, says = hub_config(hidden_size=1537), "hidden_size 1537 is not divisible by num_attention_heads 12"
    elif key == "mrope_section":
        config = hub_config()
        config["rope_scaling"]["mrope_section"] = [16, 24, 25]
        says = "mrope_section [16, 24, 25] must sum to head_dim/2 = 64"
    else:
        value, says = ABSURD[key]
        config = hub_config(**{key: value})
    file = tmp_path / "config.json"
    file.write_text(json.dumps(config))
    start = time.monotonic()
    with pytest.raises(FormatError) as info:
        Qwen2VLConfig.from_pretrained(str(tmp_path))
    assert time.monotonic() - start < 5  # refused from the numbers, before anything is built
    message = str(info.value)
    assert message.startswith(f"{file}: ") and says in message and "\n" not in message, message


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS) + ["qwen2.5-vl-3b"])
def test_L7_published_configs_pass(tmp_path, name):
    """config.json of Qwen/Qwen2-VL-{2B,7B,72B}-Instruct and Qwen/Qwen2.5-VL-3B-Instruct as shipped."""
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS.get(name, HUB_3B)))
    assert Qwen2VLConfig.from_pretrained(str(tmp_path)) == Qwen2VLConfig.preset(name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_L7_every_preset_round_trips_through_config_json(tmp_path, name):
    """Presets mirror the published Qwen2-VL and Qwen2.5-VL configs (2B..72B): the bounds admit all of them."""
    Qwen2VLConfig.preset(name).save_pretrained(str(tmp_path))
    assert Qwen2VLConfig.from_pretrained(str(tmp_path)) == Qwen2VLConfig.preset(name)
