"""Single-image end-to-end generation latency: ours (`network.generation.generate`) vs HF transformers `generate`.

The same small random Qwen2-VL weights on both sides (bench_train_step's config; HF model saved, ours loaded
from the folder), fp32, eager,
the same processor output: a 290-token chat prompt with one 448x448 image (1024 patches, 256 LLM tokens),
greedy, exactly 32 new tokens (min_new_tokens = max_new_tokens, so neither side stops early). Model load is
excluded; one call = vision tower + prefill + 31 decode steps. Calls alternate ours/HF after a warm-up; the
medians are compared, together with prefill-only (max_new_tokens=1) medians measured the same way.
The tokens both sides generate are compared too (they must agree: same weights, greedy).
"""
import common  # noqa: I001  (first: pins BLAS threads before numpy/paddle/torch load)

import os
import sys
import tempfile

import numpy as np
import paddle
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "helpers"))
from bench_train_step import small_config  # noqa: E402  (the same small model)
from hf_oracle import hf_model  # noqa: E402

from network.mkl import prefer_mkl_avx2  # noqa: E402
from network.generation import GenerationConfig, generate  # noqa: E402
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration  # noqa: E402
from network.processor import Qwen2VLProcessor  # noqa: E402

BENCH = "generate"
BENCH_TIMEOUT = 420
WARMUP, REPEATS = 1, 5
NEW_TOKENS = 32
IMAGE_SIDE = 448
PROMPT_TOKENS = 290


def prompt_inputs(processor: Qwen2VLProcessor) -> dict[str, np.ndarray]:
    """Processor output for one 448x448 picture and a question padded with words to PROMPT_TOKENS tokens."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))
    words = "Describe the picture in detail"
    for _ in range(100):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words + "."}]}]
        inputs = processor(processor.apply_chat_template(messages, add_generation_prompt=True), images=[image])
        if inputs["input_ids"].shape[1] >= PROMPT_TOKENS:
            return inputs
        words += " please"
    raise RuntimeError("could not reach the prompt length")


def main() -> None:
    prefer_mkl_avx2()  # the process environment for both sides (torch's MKL ignores it)
    config = small_config()
    hf = hf_model(config, seed=0)
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = Qwen2VLForConditionalGeneration.from_pretrained(path)
    common.pin_threads()
    inputs = prompt_inputs(Qwen2VLProcessor.from_pretrained(None))
    prompt_len = int(inputs["input_ids"].shape[1])
    hf_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    tokens: dict[str, np.ndarray] = {}

    def run_ours(n: int) -> None:
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
        tokens["ours"] = generate(ours, **inputs, generation_config=cfg).sequences[0]

    def run_hf(n: int) -> None:
        with torch.no_grad():
            out = hf.generate(**hf_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        tokens["theirs"] = out[0, prompt_len:].numpy()

    e2e = common.interleave({"ours": lambda: run_ours(NEW_TOKENS), "theirs": lambda: run_hf(NEW_TOKENS)},
                            REPEATS, WARMUP)
    same_tokens = bool(np.array_equal(tokens["ours"], tokens["theirs"]))
    prefill = common.interleave({"ours": lambda: run_ours(1), "theirs": lambda: run_hf(1)}, REPEATS, WARMUP)
    med = {k: {side: common.median(v) for side, v in t.items()} for k, t in (("e2e", e2e), ("prefill", prefill))}
    decode = {side: (med["e2e"][side] - med["prefill"][side]) / (NEW_TOKENS - 1) for side in ("ours", "theirs")}
    print(f"[generate] prompt {prompt_len} tokens; e2e s ours {e2e['ours']} HF {e2e['theirs']}")
    print(f"[generate] prefill s ours {prefill['ours']} HF {prefill['theirs']}; same tokens: {same_tokens}")
    hf_name = (f"HF transformers {__import__('transformers').__version__} generate "
               f"(torch {torch.__version__} CPU, eager)")
    extra = dict(prompt_tokens=prompt_len, new_tokens=NEW_TOKENS, e2e_s=e2e, prefill_s=prefill,
                 same_tokens=same_tokens, paddle=paddle.__version__)
    common.emit(common.Record(
        BENCH, f"single-image latency, {prompt_len}-token prompt (one {IMAGE_SIDE}x{IMAGE_SIDE} image), "
               f"{NEW_TOKENS} new tokens, greedy, fp32", "s", med["e2e"]["ours"], med["e2e"]["theirs"], hf_name,
        better="lower", extra=extra,
        note=f"greedy tokens identical to HF: {same_tokens}; HF/ours = "
             f"{med['e2e']['theirs'] / med['e2e']['ours']:.2f}x "
             f"end to end, {med['prefill']['theirs'] / med['prefill']['ours']:.2f}x prefill, "
             f"{decode['theirs'] / decode['ours']:.2f}x per decode step; machine load average "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end (shared with other jobs)"))
    common.emit(common.Record(
        BENCH, "prefill latency (vision tower + prompt, first token)", "s", med["prefill"]["ours"],
        med["prefill"]["theirs"], hf_name, better="lower", extra=extra))
    common.emit(common.Record(
        BENCH, "decode latency per new token (e2e - prefill) / 31", "s", decode["ours"], decode["theirs"], hf_name,
        better="lower", extra=extra))


if __name__ == "__main__":
    main()
