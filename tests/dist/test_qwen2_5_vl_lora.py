"""`qwen2vl-ap lora` on a tiny Qwen2.5-VL with images and videos (adapters on decoder layers and the merger):
dp2 and mp2 losses equal one process, and merge-lora's output loads in HF transformers with our logits."""
from __future__ import annotations

import pytest
from cli_runs import losses, no_leftover_processes, sft  # noqa: F401 (fixture)
from qwen2_5_vl_runs import LAYOUTS, RUN_ARGS, assert_loads_in_hf, assert_losses_equal, write_image_video_dataset

from network.lora import read_adapter
from ckpt_tools.lora_merge import merge_lora

pytestmark = pytest.mark.usefixtures("no_leftover_processes")
LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--lora_target_modules", "model.layers.*q_proj.*,model.layers.*down_proj.*,visual.merger.mlp.2"]


def test_lora_layouts_match_one_process_and_merged_model_loads_in_hf(tmp_path):
    meta = write_image_video_dataset(tmp_path / "data")
    for name, layout in LAYOUTS.items():
        sft(tmp_path / name, ["--meta_path", meta, *LORA, *RUN_ARGS, *layout], command="lora").assert_ok()
    assert_losses_equal({name: losses(tmp_path / name) for name in LAYOUTS})
    _, adapters = read_adapter(tmp_path / "mp2")
    assert len(adapters) == 2 * 2 + 1  # tiny: 2 decoder layers x (q_proj, down_proj) + the merger
    merge_lora(None, str(tmp_path / "mp2" / "checkpoint-2"), str(tmp_path / "mp2_merged"), progress=False)
    assert_loads_in_hf(tmp_path / "mp2_merged")
