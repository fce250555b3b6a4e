"""`qwen2vl-ap infer` end to end on a tiny saved model (real tokenizer, real vocabulary): single request with
streaming, batch JSONL with left padding, model directory formats, tensor parallel, clear input errors."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from cli_runs import REPO
from dist_utils import console_kernels
from tiny_model import save_tiny_model

from autoparallel.engine.lora_trainer import gather_adapter
from ckpt_tools.lora_merge import merge_lora
from launch.infer import Answer, infer_main
from launch.launcher import SIMULATE_GPU_ENV
from network.lora import LORA_CONFIG_NAME, LoraArgs, apply_lora, save_adapter
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.weights import weights_fingerprint

MAX_NEW = "8"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A safetensors model dir with processor files, a pdparams dir without (embedded tokenizer), media files."""
    root = tmp_path_factory.mktemp("infer")
    model = save_tiny_model(root / "st")
    save_tiny_model(root / "pd", format="paddle", processor_files=False, model=model)
    media = root / "media"
    (media / "frames").mkdir(parents=True)
    colours = [(220, 40, 40), (40, 170, 60), (40, 70, 220), (235, 205, 30)]
    for i, c in enumerate(colours):
        Image.new("RGB", (56, 84), c).save(media / f"img{i}.png")
        Image.new("RGB", (56, 56), c).save(media / "frames" / f"{i:03d}.png")
    return root


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = infer_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_single_request_streams_the_answer(setup, capsys):
    args = ["--model", setup / "st", "--image", setup / "media/img0.png", "--prompt", "What colour is it?",
            "--max_new_tokens", MAX_NEW]
    code, streamed, _ = _run(capsys, *args)
    assert code == 0 and streamed.strip()
    code, plain, _ = _run(capsys, *args, "--no-stream")
    assert code == 0 and plain == streamed
    # pdparams dir without tokenizer files (embedded tokenizer) holding the same weights: the same answer.
    code, other, _ = _run(capsys, *args[2:], "--model", setup / "pd", "--no-stream")
    assert code == 0 and other == plain
    print(f"[infer] single request: {streamed.strip()!r}")


def test_batch_jsonl_with_left_padding(setup, capsys, tmp_path):
    requests = [
        {"id": "a", "prompt": "What colour is it?", "images": ["media/img0.png"]},
        {"prompt": "<image>Compare with <image>: which is green?", "images": ["media/img1.png", "media/img2.png"]},
        {"id": 7, "prompt": "What happens in the video?", "videos": ["media/frames"]},
        {"id": "text", "prompt": "Say hello."},
    ]
    (setup / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    output = tmp_path / "answers.jsonl"
    code, _, _ = _run(capsys, "--model", setup / "st", "--input", setup / "requests.jsonl", "--output", output,
                      "--max_new_tokens", MAX_NEW, "--batch_size", 3)
    assert code == 0
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a", 1, 7, "text"]
    assert all(isinstance(a["answer"], str) and 1 <= a["num_tokens"] <= int(MAX_NEW) for a in answers)
    # Left padding changes nothing: each request alone gives the same answer.
    for request, answer in zip(requests, answers):
        media = [x for kind in ("images", "videos") for p in request.get(kind, [])
                 for x in (f"--{kind[:-1]}", setup / p)]
        code, alone, _ = _run(capsys, "--model", setup / "st", "--prompt", request["prompt"], *media,
                              "--max_new_tokens", MAX_NEW, "--no-stream")
        assert code == 0 and alone == answer["answer"] + "\n", request
    print(f"[infer] batch: {[(a['id'], a['num_tokens']) for a in answers]}, each equal to its single request")


def test_tensor_parallel_streams_the_single_process_answer(setup, capsys, tmp_path):
    args = ["--model", setup / "st", "--image", setup / "media/img3.png", "--prompt", "Describe it.",
            "--max_new_tokens", MAX_NEW]
    code, single, _ = _run(capsys, *args)
    assert code == 0
    code, parallel, err = _run(capsys, *args, "--tensor_parallel_degree", 2, "--log_dir", tmp_path / "log")
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "log").glob("workerlog.*")))
    assert code == 0, err + logs
    assert parallel == single, logs
    print(f"[infer] mp2 single request == single process: {parallel.strip()!r}")


@pytest.mark.parametrize("case, message", [
    ("no_model", "model directory not found"),
    ("no_config", "has no config.json"),
    ("no_image", "image file not found"),
    ("no_video", "video file not found"),
    ("batch_missing_image", "image file not found: .*missing.png \\(request 'r2'\\)"),
    ("input_without_output", "--input needs --output"),
    ("no_prompt", "give --prompt"),
    ("bad_jsonl", "line 1: expected a JSON object"),
    ("bad_top_p", "top_p"),
    ("bad_degree", "num_attention_heads=4 is not divisible by tensor_parallel_degree=3"),
    ("not_an_adapter", "--lora .*: not an adapter directory \\(no lora_config.json"),
])
def test_clear_errors(setup, capsys, tmp_path, case, message):
    st, img = setup / "st", setup / "media/img0.png"
    (tmp_path / "bad.jsonl").write_text('{"images": []}\n')
    (tmp_path / "missing.jsonl").write_text(json.dumps({"id": "r2", "prompt": "x", "images": ["missing.png"]}))
    argv = {
        "no_model": ["--model", tmp_path / "nowhere", "--prompt", "x"],
        "no_config": ["--model", tmp_path, "--prompt", "x"],
        "no_image": ["--model", st, "--prompt", "x", "--image", tmp_path / "nope.png"],
        "no_video": ["--model", st, "--prompt", "x", "--video", tmp_path / "nope.mp4"],
        "batch_missing_image": ["--model", st, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o"],
        "input_without_output": ["--model", st, "--input", tmp_path / "missing.jsonl"],
        "no_prompt": ["--model", st, "--image", img],
        "bad_jsonl": ["--model", st, "--input", tmp_path / "bad.jsonl", "--output", tmp_path / "o"],
        "bad_top_p": ["--model", st, "--prompt", "x", "--image", img, "--top_p", "0", "--max_new_tokens", "1"],
        "bad_degree": ["--model", st, "--prompt", "x", "--tensor_parallel_degree", "3"],
        "not_an_adapter": ["--model", st, "--prompt", "x", "--lora", tmp_path],
    }[case]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and not out
    assert err.startswith("qwen2vl-ap infer: error: ")
    assert re.search(message, err), err


def test_lora_adapter_folded_at_load_answers_like_the_merged_model(setup, capsys, tmp_path, caplog):
    """`--lora DIR` (unmerged paddlenlp adapter) == `merge-lora` output directory, and differs from the base; an
    adapter that records another base is still folded as asked, with a warning."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(setup / "st"))
    args = LoraArgs(lora_rank=4, lora_alpha=8)
    apply_lora(model, args)
    rng = np.random.default_rng(3)
    for name, p in model.named_parameters():
        if name.endswith(".lora_B"):  # trained adapters are non-zero
            p.set_value(rng.normal(0, 1.0, p.shape).astype("float32"))
    save_adapter(tmp_path / "adapter", gather_adapter(model), args, str(setup / "st"),
                 weights_fingerprint(str(setup / "st")))
    merge_lora(str(setup / "st"), str(tmp_path / "adapter"), str(tmp_path / "merged"), progress=False)
    common = ["--image", setup / "media/img1.png", "--prompt", "What colour is it?", "--max_new_tokens", MAX_NEW,
              "--no-stream"]
    code, folded, err = _run(capsys, "--model", setup / "st", "--lora", tmp_path / "adapter", *common)
    assert code == 0, err
    code, merged, _ = _run(capsys, "--model", tmp_path / "merged", *common)
    code, base, _ = _run(capsys, "--model", setup / "st", *common)
    assert folded == merged != base
    assert "not the base the adapter was trained on" not in caplog.text
    config = json.loads((tmp_path / "adapter" / LORA_CONFIG_NAME).read_text())
    (tmp_path / "adapter" / LORA_CONFIG_NAME).write_text(json.dumps({**config, "base_model_fingerprint": "0" * 64}))
    code, other, _ = _run(capsys, "--model", setup / "st", "--lora", tmp_path / "adapter", *common)
    assert code == 0 and other == folded
    assert f"the weights in {setup / 'st'} are not the base the adapter was trained on" in caplog.text
    print(f"[infer] --lora folded == merge-lora output: {folded.strip()!r} (base: {base.strip()!r})")


@pytest.mark.parametrize("fmt, shard_size", [("safetensors", None), ("safetensors", 20 * 10**6),
                                             ("paddle", None), ("paddle", 20 * 10**6)],
                         ids=["safetensors", "safetensors-sharded", "pdparams", "pdparams-sharded"])
def test_every_written_layout_loads_in_infer_and_inspect(setup, tmp_path, capsys, fmt, shard_size):
    """Every model-directory layout our writers produce (here through `convert`, which shares the writer with
    merge-ckpt and merge-lora) is read by the one weight reader: `infer`, `inspect` and `from_pretrained`."""
    from ckpt_tools.convert import convert
    from ckpt_tools.inspect import inspect_path

    out = tmp_path / "model"
    summary = convert(str(setup / "st"), str(out), fmt, shard_size=shard_size, progress=False)
    weight_files = [f for f in summary["files"] if f.endswith((".safetensors", ".pdparams"))]
    assert (len(weight_files) == 1) == (shard_size is None), weight_files
    report = inspect_path(str(out))
    assert report.complete, report.problems
    args = ["--image", setup / "media/img0.png", "--prompt", "What colour is it?", "--max_new_tokens", MAX_NEW,
            "--no-stream"]
    code, expected, _ = _run(capsys, "--model", setup / "st", *args)
    code_out, answer, err = _run(capsys, "--model", out, *args)
    assert code == code_out == 0, err
    assert answer == expected


def test_simulated_gpu_bf16_answers_equal_fp32(setup, capsys, tmp_path):
    """`infer --dtype bfloat16` on the simulated GPU (network/simulated_gpu.py) answers exactly as fp32 on the CPU:
    a single prompt (unpadded decode: N1's flash branch), then a left-padded batch under tensor parallelism (SDPA
    with an additive mask in q's dtype, heads split over two ranks) in one launched run."""
    from network import simulated_gpu

    single = ["--model", setup / "st", "--image", setup / "media/img0.png", "--prompt", "What colour is it?",
              "--max_new_tokens", MAX_NEW, "--no-stream"]
    code, plain, err = _run(capsys, *single)
    assert code == 0, err
    simulated_gpu.activate()
    try:
        code, simulated, err = _run(capsys, *single, "--dtype", "bfloat16")
        calls = dict(simulated_gpu.calls)
    finally:
        simulated_gpu.deactivate()
    assert code == 0 and simulated == plain, err
    # 2 decoder layers x (prefill + every decode step), 2 ViT blocks.
    assert calls == {"flash_attention": 2 * int(MAX_NEW), "flash_attn_unpadded": 2}

    requests = [{"id": "short", "prompt": "Hi."}, {"id": "long", "prompt": "What colour is it?",
                                                    "images": [str(setup / "media/img1.png")]}]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    code, _, err = _run(capsys, "--model", setup / "st", "--input", tmp_path / "requests.jsonl", "--output",
                        tmp_path / "plain.jsonl", "--max_new_tokens", MAX_NEW, "--batch_size", 2)
    assert code == 0, err
    run = subprocess.run([sys.executable, "-m", "launch.cli", "infer", "--model", str(setup / "st"), "--input",
                          str(tmp_path / "requests.jsonl"), "--output", str(tmp_path / "simulated.jsonl"),
                          "--max_new_tokens", MAX_NEW, "--batch_size", "2", "--dtype", "bfloat16",
                          "--tensor_parallel_degree", "2", "--log_dir", str(tmp_path / "log")],
                         cwd=setup, env={**os.environ, SIMULATE_GPU_ENV: "1", "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "log").glob("workerlog.*")))
    assert run.returncode == 0, run.stderr + logs
    assert (tmp_path / "simulated.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()
    kernels = console_kernels(run.stderr)
    assert kernels["scaled_dot_product_attention"] > 0 and kernels["flash_attn_unpadded"] > 0, run.stderr
