"""Model directories: atomic creation, config/tokenizer/processor files, expected tensor shapes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Optional

from network.log import logger

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
# Everything besides weights that HF / PaddleMIX loaders read from a model directory.
MODEL_FILES = (
    CONFIG, GENERATION_CONFIG, "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
)


@contextlib.contextmanager
def atomic_output_dir(out: str) -> Iterator[str]:
    """Yield a temp dir next to `out`, renamed to `out` on success and removed on any error.

    `out` must not exist or be an empty directory, so a finished output is never mixed with or replaced
    by a new one, and an interrupted run leaves only a hidden `.{name}.tmp-*` directory (removed here when
    the failure is an exception)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"output {out} already exists and is not an empty directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_model_files(src: str, dst: str) -> list[str]:
    """Copy config, generation config, tokenizer and processor files; write a generation config from
    config.json when the source has none. Returns the names written."""
    copied = [n for n in MODEL_FILES if os.path.isfile(os.path.join(src, n))]
    for name in copied:
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    if CONFIG in copied and GENERATION_CONFIG not in copied:
        with open(os.path.join(src, CONFIG), encoding="utf-8") as f:
            config = json.load(f)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        with open(os.path.join(dst, GENERATION_CONFIG), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)
        copied.append(GENERATION_CONFIG)
    if CONFIG not in copied:
        logger.warning("no %s in %s: the output directory has weights only", CONFIG, src)
    return copied


def expected_shapes(model_dir: str) -> Optional[dict[str, tuple[int, ...]]]:
    """Parameter name -> shape (Paddle layout) of the model described by `model_dir/config.json`, or None
    without a config. The model is built under `paddle.LazyGuard`, so no parameter memory is allocated."""
    if not os.path.isfile(os.path.join(model_dir, CONFIG)):
        return None
    from network.config import Qwen2VLConfig
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.lazy(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str,
                 where: dict[str, str]) -> list[str]:
    """Problems between the tensors `found` (name -> Paddle-layout shape) and the config's model."""
    problems = [f"tensor '{n}' in {where.get(n, source)} has shape {list(s)}, {CONFIG} in {source} implies "
                f"{list(expected[n])}" for n, s in found.items() if n in expected and tuple(expected[n]) != s]
    problems += [f"tensor '{n}' (shape {list(s)}) required by {CONFIG} in {source} is not in the checkpoint"
                 for n, s in expected.items() if n not in found]
    return problems
