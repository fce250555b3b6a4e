"""Shared by the Qwen2.5-VL CLI tests: a small image + video dataset, the run arguments, and the check that a
merged model directory loads in HF transformers' Qwen2_5_VLForConditionalGeneration and gives our logits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import torch
import transformers
from hf_oracle import LOGITS_TOL, Sample, build_batch, tiny_config
from hostile_data import noise

from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

PRESET = "tiny-qwen2.5-vl"
# Frames are kept small (<= 8 merged tokens each); --video_fps 1 gives second_per_grid_ts = 2 s, so video
# M-RoPE time steps by 2 s x tokens_per_second per temporal patch in the positions the data pipeline computes.
RUN_ARGS = ["--model_name_or_path", PRESET, "--max_seq_length", "128", "--evaluation_strategy", "no",
            "--warmup_steps", "0", "--logging_steps", "1", "--save_total_limit", "0", "--dataloader_num_workers", "0",
            "--max_steps", "2", "--save_steps", "2", "--video_fps", "1", "--video_min_pixels", "3136",
            "--video_max_pixels", "6272"]
# Global batch 4 on every layout.
LAYOUTS = {"single": ["--data_parallel_degree", "1", "--nproc_per_node", "1", "--per_device_train_batch_size", "4"],
           "dp2": ["--data_parallel_degree", "2", "--per_device_train_batch_size", "2"],
           "mp2": ["--data_parallel_degree", "1", "--tensor_parallel_degree", "2", "--per_device_train_batch_size", "4"]}


def write_image_video_dataset(root: Path, n: int = 12) -> str:
    """Records with one video (a frame directory of 4 or 6 frames), every other one with an image first;
    returns the PaddleMIX meta path."""
    records = []
    for i in range(n):
        clip = root / f"clip{i}"
        clip.mkdir(parents=True)
        for k in range(4 + 2 * (i % 2)):
            noise(84, 56, seed=100 * i + k).save(clip / f"{k:03d}.png")
        record = {"messages": [{"role": "user", "content": "<video>What happens?"},
                               {"role": "assistant", "content": f"event {i}"}], "videos": [clip.name]}
        if i % 2 == 0:
            noise(84, 56 + 28 * (i % 3), seed=i).save(root / f"img{i}.png")
            record["messages"][0]["content"] = "<image>Then <video>what happens?"
            record["images"] = [f"img{i}.png"]
        records.append(record)
    (root / "train.json").write_text(json.dumps(records))
    (root / "meta.json").write_text(json.dumps({"mixed": {"annotation": "train.json", "root": ".", "repeat_time": 1}}))
    return str(root / "meta.json")


def assert_losses_equal(runs: dict[str, dict[int, float]], rel: float = 1e-5) -> None:
    reference = runs["single"]
    assert sorted(reference) == [1, 2], reference
    for name, record in runs.items():
        assert sorted(record) == sorted(reference), name
        for step, value in record.items():
            assert abs(value - reference[step]) <= rel * abs(reference[step]), (name, step, value, reference[step])


def assert_loads_in_hf(model_dir: Path) -> None:
    """No missing/unexpected keys in HF, and HF's logits equal ours on an image + video batch."""
    hf, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(model_dir), output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info
    ours = Qwen2VLForConditionalGeneration.from_pretrained(str(model_dir))
    assert ours.config.model_type == "qwen2_5_vl"
    batch = build_batch(tiny_config(small_vocab=False, preset=PRESET),
                        [Sample(3, [("image", (1, 4, 6)), ("video", (2, 4, 6), 2.0)], 4)])
    with torch.no_grad():
        expected = hf.eval()(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    with paddle.no_grad():
        got = ours(**{k: paddle.to_tensor(v) for k, v in batch.items()}).logits.numpy()
    delta = float(np.abs(got - expected).max())
    print(f"[qwen2.5-vl] {model_dir.name} in HF: max|dlogits|={delta:.2e}")
    assert delta <= LOGITS_TOL


def assert_generation_from_files_matches_hf(model_dir: Path, image: Path, clip: Path, new_tokens: int = 8) -> None:
    """Processor output for an image + a video sampled at 1 fps (second_per_grid_ts 2 s) through our generate
    equals HF generate on the same inputs; `qwen2vl-ap infer` answers the same prompt."""
    from launch.infer import infer_main, render_prompt
    from network.generation import GenerationConfig, generate
    from network.processor import Qwen2VLProcessor

    processor = Qwen2VLProcessor.from_pretrained(str(model_dir))
    text = render_prompt(processor, "<image>Then <video>what happens?", 1, 1)
    inputs = processor(text, images=[str(image)], videos=[str(clip)], fps=1.0)
    np.testing.assert_array_equal(inputs["second_per_grid_ts"], [2.0])
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), attn_implementation="eager")
    with torch.no_grad():
        expected = hf.eval().generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    ours = Qwen2VLForConditionalGeneration.from_pretrained(str(model_dir))
    out = generate(ours, **inputs, generation_config=GenerationConfig(max_new_tokens=new_tokens,
                                                                      min_new_tokens=new_tokens))
    np.testing.assert_array_equal(out.sequences, expected[:, inputs["input_ids"].shape[1]:].numpy())
    assert infer_main(["--model", str(model_dir), "--image", str(image), "--video", str(clip), "--prompt",
                       "<image>Then <video>what happens?", "--max_new_tokens", "4", "--no-stream"]) == 0
