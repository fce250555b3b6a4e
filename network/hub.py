"""Where a model name points: a local directory, or a Hugging Face Hub id (`Qwen/Qwen2-VL-2B-Instruct`) resolved
through the Hub cache with huggingface_hub — downloaded where the network allows, taken from the local cache
offline (`HF_HUB_OFFLINE=1`) or when the Hub cannot be reached. The one resolver of model names: the run config's
`model_config`, the engine's `build_model` and `infer --model` use it."""
from __future__ import annotations

import os
import re
from typing import Sequence

# Everything a Qwen2-VL model directory holds (weights in either format, configs, tokenizer, chat template).
MODEL_FILES = ("*.json", "*.safetensors", "*.pdparams", "*.txt", "*.jinja", "*.model")
CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
                "video_preprocessor_config.json")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFoundError(FileNotFoundError):
    """The name is neither a local directory nor a Hub id that could be downloaded or found in the cache."""


def is_hub_id(name: str) -> bool:
    return bool(_REPO_ID.fullmatch(name)) and not os.path.exists(name)


def hub_cache_dir() -> str:
    """The Hub cache as huggingface_hub resolves it, read now (HF_HUB_CACHE may change after import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_dir(name: str, files: Sequence[str] = MODEL_FILES) -> str:
    """A local directory as given, else the cached (or freshly downloaded) snapshot of Hub id `name` holding at
    least the `files` patterns; raises ModelNotFoundError naming the id and the cache."""
    if os.path.isdir(name):
        return name
    if not is_hub_id(name):
        raise ModelNotFoundError(f"model directory not found: {name} (nor is it a Hub id like "
                                 "Qwen/Qwen2-VL-2B-Instruct)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache, offline = hub_cache_dir(), hub_offline()
    try:
        return snapshot_download(name, cache_dir=cache, allow_patterns=list(files), local_files_only=offline)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        how = "offline (HF_HUB_OFFLINE=1)" if offline else f"download failed: {type(exc).__name__}"
        raise ModelNotFoundError(
            f"model {name!r} is not a local directory and not in the Hub cache {cache} ({how}); download it "
            f"where the network allows (huggingface-cli download {name}) or point model_name_or_path at a local "
            "copy") from None
