"""`Qwen2VLProcessor`: qwen2_vl chat template, vision-token expansion, tokenization and pixel preprocessing.

Outputs are numpy. Media keys (`pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`,
`second_per_grid_ts`) are absent when no images / videos are given, as in HF. `second_per_grid_ts` (seconds per
temporal patch of each video, as HF's Qwen2_5_VLProcessor computes it) drives Qwen2.5-VL's video M-RoPE time;
Qwen2-VL ignores it. The template and everything else are the same for both families. Token counts from image sizes (`image_token_count`) let the data
pipeline probe lengths without decoding pixels. `apply_chat_template` returns a `ChatText`: tokenised by the
processor, control tokens come only from the template, never from `<|im_end|>`-like text inside message content.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from network.image_processing import ImageLike, Qwen2VLImageProcessor
from network.log import logger
from network.tokenizer import has_tokenizer_files, load_tokenizer, plain_text_encoder
from network.video import DEFAULT_VIDEO_FPS, VideoLike, load_video

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# The Qwen2-VL-*-Instruct Hub template; written to chat_template.json so HF's processor renders what we render.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CONTROL_TOKEN = re.compile(r"(<\|[a-z_]+\|>)")


class ChatText(str):
    """Chat-template text that remembers which control tokens the template wrote (`pieces`: (text, is_control)).

    The processor tokenises a ChatText so that only those become control-token ids; `<|im_end|>` and the like typed
    inside message content stay plain text, so a user cannot forge a turn (M4). Operations on it give plain str,
    which is tokenised as before (every special-token string is a control token)."""

    pieces: tuple[tuple[str, bool], ...]

    def __new__(cls, pieces: Sequence[tuple[str, bool]]) -> "ChatText":
        text = super().__new__(cls, "".join(p for p, _ in pieces))
        text.pieces = tuple(pieces)
        return text


def _template_pieces(text: str) -> list[tuple[str, bool]]:
    """Template-written text split into plain text and control tokens."""
    return [(p, i % 2 == 1) for i, p in enumerate(_CONTROL_TOKEN.split(text)) if p]


# The HF processor class each model family's checkpoints name (AutoProcessor picks it from the saved files).
PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
PREPROCESSOR_CONFIG = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Qwen2VLProcessor:
    """Tokenizer + image processor with the qwen2_vl chat template (numpy in, numpy out)."""

    def __init__(self, tokenizer: Any, image_processor: Qwen2VLImageProcessor | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor or Qwen2VLImageProcessor()
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(VISION_START)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(VISION_END)
        self.pad_token_id = tokenizer.pad_token_id
        self._plain_text = plain_text_encoder(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id

    # ---- loading / saving -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | None = None, **image_processor_overrides: Any) -> "Qwen2VLProcessor":
        """Tokenizer from `path` when it has tokenizer files, else the embedded one; pixel limits from
        `preprocessor_config.json` / `video_preprocessor_config.json` when present; keyword overrides win."""
        own_tokenizer = bool(path) and has_tokenizer_files(path)
        if path and not own_tokenizer:
            logger.info("%s has no tokenizer.json; using the embedded Qwen2 tokenizer", path)
        tokenizer = load_tokenizer(path if own_tokenizer else None)
        image_cfg = _read_json(os.path.join(path, PREPROCESSOR_CONFIG)) if path else None
        video_cfg = _read_json(os.path.join(path, VIDEO_PREPROCESSOR_CONFIG)) if path else None
        image_processor = Qwen2VLImageProcessor.from_dict(image_cfg or {}, video_cfg)
        return cls(tokenizer, dataclasses.replace(image_processor, **image_processor_overrides))

    def save_pretrained(self, save_dir: str, model_type: str = "qwen2_vl") -> None:
        """Tokenizer files, preprocessor_config.json, video_preprocessor_config.json, chat_template.jinja; the
        configs name the HF processor of `model_type` (Qwen2.5-VL's passes second_per_grid_ts to the model)."""
        os.makedirs(save_dir, exist_ok=True)
        self.tokenizer.save_pretrained(save_dir)
        # The tokenizer keeps its source's template (the embedded files carry a Qwen3 one); HF's
        # tokenizer.apply_chat_template should render the same text as the processor.
        config_path = os.path.join(save_dir, "tokenizer_config.json")
        tokenizer_config = _read_json(config_path) or {}
        tokenizer_config["chat_template"] = QWEN2_VL_CHAT_TEMPLATE
        tokenizer_config.pop("name_or_path", None)
        ip = self.image_processor
        image_cfg = {**ip.to_dict(), "processor_class": PROCESSOR_CLASSES[model_type]}
        video_cfg = {
            **image_cfg,
            "video_processor_type": "Qwen2VLVideoProcessor",
            "min_pixels": ip.video_min_pixels,
            "max_pixels": ip.video_max_pixels,
            "size": {"shortest_edge": ip.video_min_pixels, "longest_edge": ip.video_max_pixels},
        }
        del video_cfg["image_processor_type"]
        files = {
            "tokenizer_config.json": tokenizer_config,
            PREPROCESSOR_CONFIG: image_cfg,
            VIDEO_PREPROCESSOR_CONFIG: video_cfg,
        }
        for name, content in files.items():
            with open(os.path.join(save_dir, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        # HF >= 4.52 processors read chat_template.jinja; paddlenlp would misparse an HF-style chat_template.json.
        with open(os.path.join(save_dir, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(QWEN2_VL_CHAT_TEMPLATE)
        logger.info("saved processor to %s", save_dir)

    # ---- chat template ----------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, add_vision_id: bool = False
    ) -> ChatText:
        """The qwen2_vl template (QWEN2_VL_CHAT_TEMPLATE) in plain Python; content is a string or a list of
        {"type": "image"|"video"|"text", ...} items; one `<|vision_start|><|image_pad|><|vision_end|>` per image.
        Special-token strings inside content stay text when the result is tokenised by this processor."""
        parts: list[tuple[str, bool]] = []  # (text, is_control); content is appended unsplit
        n_images = n_videos = 0
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if i == 0 and role != "system":
                parts += _template_pieces(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
            parts += _template_pieces("<|im_start|>") + [(f"{role}\n", False)]
            if isinstance(content, str):
                parts.append((content, False))
            else:
                for item in content:
                    kind = item.get("type")
                    if kind == "image" or "image" in item or "image_url" in item:
                        n_images += 1
                        parts.append((f"Picture {n_images}: " if add_vision_id else "", False))
                        parts += _template_pieces(VISION_START + IMAGE_TOKEN + VISION_END)
                    elif kind == "video" or "video" in item:
                        n_videos += 1
                        parts.append((f"Video {n_videos}: " if add_vision_id else "", False))
                        parts += _template_pieces(VISION_START + VIDEO_TOKEN + VISION_END)
                    elif "text" in item:
                        parts.append((item["text"], False))
            parts += _template_pieces("<|im_end|>\n")
        if add_generation_prompt:
            parts += _template_pieces("<|im_start|>assistant\n")
        return ChatText(parts)

    # ---- token counting / expansion ---------------------------------------------------------------------------
    def num_vision_tokens(self, grid_thw: Sequence[int] | np.ndarray) -> int:
        """LLM tokens of one image/video with this (t, h, w) patch grid: t*h*w // merge_size**2."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.image_processor.merge_size**2

    def image_token_count(self, height: int, width: int) -> int:
        """`<|image_pad|>` count for an image of this original size (no pixels decoded)."""
        return self.image_processor.num_image_tokens(height, width)

    def video_token_count(self, num_frames: int, height: int, width: int) -> int:
        """`<|video_pad|>` count for `num_frames` sampled frames of this original size."""
        return self.image_processor.num_video_tokens(num_frames, height, width)

    def expand_vision_tokens(
        self,
        text: str | list[str],
        image_grid_thw: np.ndarray | None = None,
        video_grid_thw: np.ndarray | None = None,
    ) -> str | list[str]:
        """Replace each `<|image_pad|>` / `<|video_pad|>` by its token run, consuming grids in order across texts.

        Stricter than HF: the number of placeholders must equal the number of grids (HF ignores extra grids)."""
        texts = [text] if isinstance(text, str) else list(text)
        for token, grids in ((IMAGE_TOKEN, image_grid_thw), (VIDEO_TOKEN, video_grid_thw)):
            counts = [self.num_vision_tokens(g) for g in (grids if grids is not None else [])]
            total = sum(t.count(token) for t in texts)
            if total != len(counts):
                raise ValueError(f"{total} {token} placeholders in the text but {len(counts)} grids given")
            it = iter(counts)
            for i, t in enumerate(texts):
                pieces = t.split(token)
                texts[i] = pieces[0] + "".join(token * next(it) + p for p in pieces[1:])
        return texts[0] if isinstance(text, str) else texts

    # ---- main entry -------------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str],
        images: Sequence[ImageLike] | ImageLike | None = None,
        videos: Sequence[VideoLike] | None = None,
        padding: bool | str = False,
        padding_side: str = "right",
        return_tensors: str = "np",
        fps: float | Sequence[float] = DEFAULT_VIDEO_FPS,
    ) -> dict[str, np.ndarray]:
        """Tokenize templated text with vision placeholders expanded; preprocess images then videos (in order).

        `videos` items are frame lists, frame directories or video files (files sampled at `fps`); `fps` (one
        value or one per video) is the rate the frames were sampled at, which gives `second_per_grid_ts`.
        Returns input_ids int64 [B, S], attention_mask int64 [B, S] and the media keys for the media given."""
        if return_tensors != "np":
            raise ValueError(f"only return_tensors='np' is supported, got {return_tensors!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        out: dict[str, np.ndarray] = {}
        if images is not None:
            out.update(self.image_processor.preprocess(images))
        if videos is not None:
            rates = [float(fps)] * len(videos) if np.isscalar(fps) else [float(f) for f in fps]
            if len(rates) != len(videos):
                raise ValueError(f"fps has {len(rates)} values for {len(videos)} videos")
            frames = [load_video(v, r) if isinstance(v, (str, os.PathLike)) else v for v, r in zip(videos, rates)]
            out.update(self.image_processor.preprocess_videos(frames))
            out["second_per_grid_ts"] = self.second_per_grid_ts(rates)
        texts = [text] if isinstance(text, str) else list(text)
        if all(isinstance(t, ChatText) for t in texts):
            runs = {IMAGE_TOKEN: [self.num_vision_tokens(g) for g in out.get("image_grid_thw", [])],
                    VIDEO_TOKEN: [self.num_vision_tokens(g) for g in out.get("video_grid_thw", [])]}
            ids = self._encode_chat(texts, runs)
        else:
            texts = self.expand_vision_tokens(texts, out.get("image_grid_thw"), out.get("video_grid_thw"))
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out.update(self._pad(ids, padding, padding_side))
        return out

    def prompt_token_count(self, text: ChatText, image_tokens: Sequence[int], video_tokens: Sequence[int]) -> int:
        """Tokens of `text` once its placeholders are expanded to these per-image / per-video token counts
        (from `image_token_count` / `video_token_count`, so no pixel needs decoding)."""
        return len(self._encode_chat([text], {IMAGE_TOKEN: [1] * len(image_tokens),
                                              VIDEO_TOKEN: [1] * len(video_tokens)})[0]) \
            - len(image_tokens) - len(video_tokens) + sum(image_tokens) + sum(video_tokens)

    def _encode_chat(self, texts: Sequence[ChatText], runs: dict[str, list[int]]) -> list[list[int]]:
        """Ids of chat texts: control tokens only where the template wrote them, each placeholder expanded to its
        run length (consumed in order across texts), everything between tokenised as plain text. The tokenizer
        splits its input at special-token strings the same way, so text without such strings in its content
        gets exactly the ids of a whole-string tokenisation."""
        for token, counts in runs.items():
            found = sum(piece == token for t in texts for piece, control in t.pieces if control)
            if found != len(counts):
                raise ValueError(f"{found} {token} placeholders in the text but {len(counts)} grids given")
        it = {token: iter(counts) for token, counts in runs.items()}
        out = []
        for t in texts:
            ids: list[int] = []
            pending = ""
            for piece, control in t.pieces:
                if not control:
                    pending += piece
                    continue
                if pending:
                    ids += self._plain_text.encode(pending, add_special_tokens=False).ids
                    pending = ""
                ids += [self.tokenizer.convert_tokens_to_ids(piece)] * (next(it[piece]) if piece in it else 1)
            if pending:
                ids += self._plain_text.encode(pending, add_special_tokens=False).ids
            out.append(ids)
        return out

    def second_per_grid_ts(self, fps: Sequence[float]) -> np.ndarray:
        """float32 [n_videos]: seconds one temporal patch spans in a video sampled at each `fps`."""
        return np.asarray([self.image_processor.temporal_patch_size / f for f in fps], np.float32)

    def _pad(self, ids: list[list[int]], padding: bool | str, side: str) -> dict[str, np.ndarray]:
        lengths = [len(x) for x in ids]
        if padding not in (False, True, "longest"):
            raise ValueError(f"padding must be False, True or 'longest', got {padding!r}")
        if not padding and len(set(lengths)) > 1:
            raise ValueError("texts have different lengths; pass padding='longest' to batch them")
        width = max(lengths)
        input_ids = np.full((len(ids), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
            input_ids[row, cols] = seq
            mask[row, cols] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Token ids → text."""
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)
