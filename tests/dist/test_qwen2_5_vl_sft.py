"""`qwen2vl-ap sft` on a tiny Qwen2.5-VL with images and videos: dp2 and mp2 losses equal one process; the
merged checkpoint loads in HF transformers with our logits, and generation from image/video files (processor,
second_per_grid_ts, generate, `qwen2vl-ap infer`) matches HF's."""
from __future__ import annotations

import json

import pytest
from cli_runs import losses, no_leftover_processes, sft  # noqa: F401 (fixture)
from qwen2_5_vl_runs import (LAYOUTS, RUN_ARGS, assert_generation_from_files_matches_hf, assert_loads_in_hf,
                             assert_losses_equal, write_image_video_dataset)

from ckpt_tools.merge import merge_dist_checkpoint

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def test_sft_layouts_match_one_process_and_merged_model_loads_in_hf(tmp_path):
    meta = write_image_video_dataset(tmp_path / "data")
    for name, layout in LAYOUTS.items():
        sft(tmp_path / name, ["--meta_path", meta, "--learning_rate", "1e-3", *RUN_ARGS, *layout]).assert_ok()
    assert_losses_equal({name: losses(tmp_path / name) for name in LAYOUTS})
    merge_dist_checkpoint(str(tmp_path / "mp2" / "checkpoint-2"), str(tmp_path / "mp2_merged"),
                          format="safetensors", progress=False)
    assert_loads_in_hf(tmp_path / "mp2_merged")
    processor_class = json.loads((tmp_path / "mp2_merged" / "preprocessor_config.json").read_text())["processor_class"]
    assert processor_class == "Qwen2_5_VLProcessor"  # AutoProcessor then passes second_per_grid_ts
    data = tmp_path / "data"
    assert_generation_from_files_matches_hf(tmp_path / "mp2_merged", data / "img0.png", data / "clip0")
