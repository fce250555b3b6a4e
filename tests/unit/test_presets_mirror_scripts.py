"""The shipped presets that name a PaddleMIX script say what that script says, key by key (8 GPUs, batch 32)."""
import pytest

from autoparallel.config import RunConfig
from launch.config import load_run_config, parse_overrides, read_yaml, resolve_config_path
from launch.launcher import split_launch_options
from paddlemix_scripts import script_argv

MIRRORS = {
    "qwen2vl_2b_sft_auto": "auto_2b_bs32_1e8.sh",
    "qwen2vl_2b_lora_auto": "auto_2b_lora_bs32_1e8.sh",
    "qwen2vl_7b_sft_baseline": "baseline_7b_bs32_1e8.sh",
    "qwen2vl_7b_lora_baseline": "baseline_7b_lora_bs32_1e8.sh",
}
PLACES = {"output_dir", "meta_path"}  # where the files live differs by design


@pytest.mark.parametrize("preset", sorted(MIRRORS))
def test_preset_equals_its_script(preset):
    command = "lora" if "lora" in preset else "sft"
    _, _, rest = split_launch_options(script_argv(MIRRORS[preset], gpus=8, batch_size=32, meta_path="m",
                                                  output_dir="o", master="127.0.0.1:8080"))
    script = RunConfig.build(command, [("script", parse_overrides(rest))]).to_flat_dict()
    ours = load_run_config(command, preset, {}).to_flat_dict()
    keys = set(read_yaml(resolve_config_path(preset)))  # what the preset and the presets it extends set
    given = (keys & set(script)) - PLACES
    assert len(given) >= 20
    assert {k: ours[k] for k in given} == {k: script[k] for k in given}
    # and the layout: the script's degrees and global batch 32
    for key in ("tensor_parallel_degree", "sharding_parallel_degree", "sharding", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_seq_length", "recompute", "learning_rate"):
        assert ours[key] == script[key], key
