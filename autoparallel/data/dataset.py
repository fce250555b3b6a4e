"""Supervised fine-tuning samples: qwen2_vl template, label masks, truncation, media, M-RoPE positions.

Template (the Qwen2-VL-Instruct chat template, token for token):
    <|im_start|>system\\n{system}<|im_end|>\\n                       (omitted when the system prompt is "")
    <|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n   (per turn)
with each `<image>` / `<video>` placeholder → `<|vision_start|>` + `<|image_pad|>`/`<|video_pad|>` × (t·h·w/4) +
`<|vision_end|>`. Prompt text is tokenized as one string per chunk between special tokens (identical ids to
tokenizing the rendered template); each answer is tokenized on its own, exactly as the model sees it when it
generates after `<|im_start|>assistant\\n`.

Labels: the answer tokens and their `<|im_end|>` are supervised; everything else is -100 — system, user, template
and vision tokens, and the "\\n" after each `<|im_end|>`: generation stops at `<|im_end|>`, so the model is never
asked to produce that newline (it stays in input_ids so multi-turn context matches the chat template).
Users choose otherwise with DataConfig (LLaMA-Factory / ms-swift names): `train_on_prompt` / `loss_scale all` also
supervise the system, user and template tokens (never the vision spans: pixels are not predicted);
`mask_history` / `loss_scale last_round` supervise only the last turn's answer.

Truncation to `max_seq_length` (S = untruncated length, L = max_seq_length), when S > L:
  1. keep the longest prefix ending at a complete turn (after an answer's `<|im_end|>\\n`) that is <= L, else
  2. cut hard at L (the last answer loses its tail),
  and accept the cut only if every image/video span lies wholly before it (no span is cut or dropped) and at
  least one supervised token remains. Otherwise the sample raises DataError(kind="too long"), which the loader
  always treats as a drop: replaced like a bad sample, counted, logged and reported, even without
  `skip_bad_samples` (a length limit is not broken data).

`measure(i)` gives a sample's untruncated and final length, supervised-token count and media counts without
decoding pixels (image headers via PIL, video container metadata); it runs the same rendering and truncation code
as `sample(i)`. `index_lengths(build=True)` (the parent) measures every record once into a table beside the
annotation index (record_index.save_lengths), keyed by the annotation's content and `length_setting()`, in
chunks of records whose distinct texts are tokenized in one call and whose media headers are each read once; every
dataset reads an existing table at construction, so the ranks plan from it and measure only what it lacks.
Media files edited in place after the table was built are not seen by it: a sample that then decodes to more
tokens than its table row is treated as a bad sample by the loader.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional, Union

import numpy as np

from autoparallel.data.config import DataConfig
from autoparallel.data.records import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    Conversation,
    DataError,
    RecordStore,
    SkipLog,
    missing_media_error,
)
from autoparallel.data.media_refs import VideoRef
from autoparallel.data.record_index import load_lengths, save_lengths
from network.image_processing import image_hw
from network.processor import Qwen2VLProcessor
from network.rope_index import get_rope_index
from network.tokenizer import encode_texts
from network.video import IMAGE_EXTENSIONS, load_video, sample_frame_indices

IGNORE_INDEX = -100
PAD_TOKEN_ID = 151643
VIDEO_MIN_FRAMES = 4  # qwen_vl_utils FPS_MIN_FRAMES
# A record's row in the length table: untruncated tokens, tokens after truncation (-1: too long to truncate),
# supervised tokens after truncation, images, videos, and the original height and width of its largest image
# (0 without images; `qwen2vl-ap plan` sizes the ViT's activations from them). NOT_MEASURED: an invalid record, or one whose probe failed
# (measured again when used, which names the problem).
LENGTH_COLUMNS = ("full", "tokens", "labels", "images", "videos", "image_height", "image_width")
FULL, TOKENS, LABELS, IMAGES, VIDEOS, IMAGE_HEIGHT, IMAGE_WIDTH = range(len(LENGTH_COLUMNS))
NOT_MEASURED = -2
LENGTH_INDEX_VERSION = 1
# Text whose token ids stand for the tokenizer in the length table's key (hashing the whole vocabulary would
# slow down every process that opens a dataset).
_TOKENIZER_PROBE = ("Hello, world! 你好，世界。 Привет мир. こんにちは 안녕하세요 مرحبا\n\tdef f(x):\n    return x**2  "
                    "# 12345 67.89 😀 🚀 <image> <video> https://example.com/a_b-c?d=e&f=g")
# Records per task when the parent measures a length table in forked processes (one process per core).
MEASURE_CHUNK = 4096
_MEASURING: Optional["SFTDataset"] = None  # the dataset a forked measuring process works for


def _measure_in_worker(records: np.ndarray) -> np.ndarray:
    return _MEASURING._measure_records(records)


# Segments of a rendered conversation (SFTDataset._layout), by how they are labelled: prompt text and template
# tokens (supervised only with train_on_prompt), vision spans (never), an answer and its <|im_end|>, an answer
# masked by mask_history, and the "\\n" that ends a turn (never: generation stops at <|im_end|>).
_PROMPT, _VISION, _ANSWER, _HISTORY_ANSWER, _TURN_END = range(5)
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def build_processor(config: DataConfig, path: Optional[str] = None,
                    processor: Optional[Qwen2VLProcessor] = None) -> Qwen2VLProcessor:
    """The processor with the pixel limits the data config sets (they override a checkpoint's preprocessor config;
    unset ones keep it)."""
    overrides = config.pixel_overrides
    if processor is None:
        return Qwen2VLProcessor.from_pretrained(path, **overrides)
    return Qwen2VLProcessor(processor.tokenizer, dataclasses.replace(processor.image_processor, **overrides))


def _video_frames_and_size(path: VideoRef, fps: float, max_frames: int) -> tuple[int, int, int]:
    """(sampled frame count, height, width) of a video file, frame directory or frame list, as `load_video` will
    return, from container metadata / image headers only."""
    if isinstance(path, tuple) or os.path.isdir(path):
        frames = list(path) if isinstance(path, tuple) else [os.path.join(path, n) for n in sorted(
            n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))]
        if not frames:
            raise ValueError(f"frame directory {path!r} contains no image files")
        n = min(len(frames), max(2, max_frames // 2 * 2))
        return n + n % 2, *image_hw(frames[0])
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path!r} has no video stream")
            stream = container.streams.video[0]
            total, rate = stream.frames, stream.average_rate or stream.guessed_rate
            height, width = stream.codec_context.height, stream.codec_context.width
            if total <= 0:  # no frame count in the header: count packets (no decoding)
                total = sum(1 for p in container.demux(video=0) if p.size > 0)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read video file {path!r}: {e}") from e
    if not rate:
        raise ValueError(f"{path!r}: the video stream declares no frame rate")
    return len(sample_frame_indices(total, float(rate), fps, VIDEO_MIN_FRAMES, max_frames)), height, width


def _read_header(headers: Optional[dict[tuple, Any]], path: VideoRef, read: Any) -> Any:
    """`read(path)`, memoised in `headers` by the file's (path, size, mtime) when given (frame lists are not)."""
    if headers is None or isinstance(path, tuple):
        return read(path)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in headers:
        headers[key] = read(path)
    return headers[key]


class SFTDataset:
    """Samples of a PaddleMIX meta file. `sample(i)` (also `dataset[i]`) returns numpy arrays:

    input_ids int64 [S], labels int64 [S], attention_mask int64 [S] (ones), position_ids int64 [3, S],
    pixel_values float32 [n_patches, 1176] + image_grid_thw int64 [n_images, 3] (only with images),
    pixel_values_videos float32 [n_video_patches, 1176] + video_grid_thw int64 [n_videos, 3]
    + second_per_grid_ts float32 [n_videos] (only with videos),
    num_tokens int (= S), num_labels int (supervised tokens), index int.
    Bad samples raise DataError naming the annotation file, record index and reason.
    `records`: an already read RecordStore of the same data (the parent's checks reuse theirs).
    `video_tokens_per_second`: the model's video M-RoPE time scale (Qwen2.5-VL; None for Qwen2-VL, see
    network.rope_index.video_tokens_per_second), used for `position_ids`.
    """

    def __init__(self, config: DataConfig, processor: Optional[Qwen2VLProcessor] = None,
                 meta_path: Optional[str] = None, skips: Optional[SkipLog] = None,
                 video_tokens_per_second: Optional[float] = None, records: Optional[RecordStore] = None):
        self.config = config
        self.video_tokens_per_second = video_tokens_per_second
        self.meta_path = meta_path or config.meta_path
        if not self.meta_path and not config.dataset:
            raise ValueError("no data given (DataConfig.meta_path / dataset or the meta_path argument)")
        self.processor = build_processor(config, processor=processor)
        self.skips = skips if skips is not None else SkipLog()
        own = meta_path is None  # the config's training data (meta_path and/or dataset); else e.g. eval_meta_path
        self.records = records if records is not None else RecordStore(
            self.meta_path, config.data_seed, config.skip_bad_samples, self.skips,
            dataset=config.dataset if own else None, dataset_dir=config.dataset_dir,
            val_size=config.val_size if own else 0.0)
        tok = self.processor.tokenizer
        self.ids = {name: tok.convert_tokens_to_ids(name) for name in (
            "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
        self._measured: Optional[np.ndarray] = None  # [n, LENGTH_COLUMNS] of samples measured here (no table)
        self._probe_errors: dict[int, DataError] = {}
        self._tokenizer_lock = threading.Lock()  # the loader's decoding threads share one Rust tokenizer
        self._tables: list[Optional[np.ndarray]] = self.index_lengths(build=False)

    def __len__(self) -> int:
        return len(self.records)

    # ---- the length table ------------------------------------------------------------------------------------
    def length_setting(self) -> str:
        """Everything besides the annotation's content that changes a record's measured row."""
        tok = self.processor.tokenizer
        probe = np.asarray(self._encode_texts([_TOKENIZER_PROBE])[0], np.int64).tobytes()
        c = self.config
        return repr((LENGTH_INDEX_VERSION, len(tok), hashlib.blake2b(probe, digest_size=8).hexdigest(), self.ids,
                     self.processor.image_processor, c.max_seq_length, c.system_prompt, c.supervises_prompt,
                     c.masks_history, c.video_fps, c.video_maxlen, self.records.cache_dir))

    def index_lengths(self, build: bool = True) -> list[Optional[np.ndarray]]:
        """Each source's length table (None where there is none), measuring and saving missing ones with `build`
        (the parent, before workers start); the dataset reads its rows from then on."""
        setting = self.length_setting()
        tables: list[Optional[np.ndarray]] = []
        records = self.records
        for s, (source, index) in enumerate(zip(records.sources, records.indexes)):
            key = setting + repr((source.format, source.root))
            table = load_lengths(index, key)
            if table is None and build:
                table = np.full((len(index), len(LENGTH_COLUMNS)), NOT_MEASURED, np.int32)
                mine = np.flatnonzero(records.record_sources == s)
                table[records.record_lines[mine]] = self._measure_in_parallel(mine)
                save_lengths(index, key, table)
            tables.append(table)
        self._tables = tables
        return tables

    def _measure_records(self, records: np.ndarray) -> np.ndarray:
        """Rows of valid records (RecordStore numbering); NOT_MEASURED where measuring fails (measured again
        when used, which raises the error). The rows `_measure` gives one by one, rendered in one batch."""
        rows = np.full((len(records), len(LENGTH_COLUMNS)), NOT_MEASURED, np.int32)
        headers: dict[tuple, Any] = {}
        probed = []
        for k, r in enumerate(records):
            try:
                conv = self.records.record_conversation(int(r))
                probed.append((k, conv, self._probe_media(conv, headers)))
            except DataError:
                pass
        rendered = self._render_many([(conv, image_tokens, video_tokens)
                                      for _, conv, (_, image_tokens, video_tokens) in probed])
        for (k, conv, (sizes, _, _)), one in zip(probed, rendered):
            rows[k] = self._row(conv, sizes, one)
        return rows

    def _measure_in_parallel(self, records: np.ndarray) -> np.ndarray:
        """`_measure_records` over forked processes, one per core, MEASURE_CHUNK records per task, each task's rows
        placed as they come (a list of them all would hold the table twice)."""
        global _MEASURING
        chunks = np.array_split(records, max(1, -(-len(records) // MEASURE_CHUNK)))
        processes = min(len(chunks), os.cpu_count() or 1)
        rows = np.empty((len(records), len(LENGTH_COLUMNS)), np.int32)
        starts = np.cumsum([0] + [len(chunk) for chunk in chunks])
        if processes == 1:  # chunk by chunk all the same: a chunk's rendered samples are held at once
            for start, chunk in zip(starts, chunks):
                rows[start:start + len(chunk)] = self._measure_records(chunk)
            return rows
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust tokenizer in forked processes
        _MEASURING = self
        try:
            with ProcessPoolExecutor(processes, multiprocessing.get_context("fork")) as pool:
                for start, part in zip(starts, pool.map(_measure_in_worker, chunks)):
                    rows[start:start + len(part)] = part
        finally:
            _MEASURING = None
        return rows

    def _table_rows(self, samples: np.ndarray) -> np.ndarray:
        """Rows of the length table for sample indices (NOT_MEASURED where a source has no table)."""
        rows = np.full((len(samples), len(LENGTH_COLUMNS)), NOT_MEASURED, np.int32)
        records = self.records.sample_to_record[samples]
        sources = self.records.record_sources[records]
        for s, table in enumerate(self._tables):
            if table is not None:
                mine = sources == s
                rows[mine] = table[self.records.record_lines[records[mine]]]
        return rows

    def held_out(self) -> "SFTDataset":
        """The samples of the records `val_size` held out of this (training) dataset, read the same way."""
        return SFTDataset(self.config, self.processor, video_tokens_per_second=self.video_tokens_per_second,
                          records=self.records.held_out())

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.sample(i)

    # ---- tokens ------------------------------------------------------------------------------------------------
    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        with self._tokenizer_lock:
            return encode_texts(self.processor.tokenizer, texts)

    def render(self, conv: Conversation, image_tokens: list[int], video_tokens: list[int]
               ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of a conversation whose i-th image/video expands to the given token counts,
        truncated by the module's rule (raises DataError kind="too long"). A last answer of None renders the
        generation prompt instead (no truncation)."""
        ids, labels, spans_end, turn_ends = self._render_many([(conv, image_tokens, video_tokens)])[0]
        return (ids, labels) if turn_ends is None else self._truncate(conv, ids, labels, spans_end, turn_ends)

    def _render_many(self, items: list[tuple[Conversation, list[int], list[int]]]
                     ) -> list[tuple[np.ndarray, np.ndarray, int, Optional[list[int]]]]:
        """Untruncated (input_ids, labels, end of the last vision span, turn ends; None for a generation prompt)
        of each (conversation, image tokens, video tokens), their distinct texts tokenized in one call (chat
        templates repeat most of their text from record to record)."""
        layouts = [self._layout(*item) for item in items]
        texts = list({part: None for segments, _ in layouts for _, part in segments if isinstance(part, str)})
        encoded = dict(zip(texts, self._encode_texts(texts)))
        return [self._assemble(segments, generation, encoded) for segments, generation in layouts]

    def _layout(self, conv: Conversation, image_tokens: list[int], video_tokens: list[int]
                ) -> tuple[list[tuple[int, Union[str, list[int]]]], bool]:
        """A conversation as (segment kind, text or token ids) in order, and whether it ends in a generation
        prompt. Prompt text between two control tokens is one text (tokenized as the rendered template is)."""
        ids_ = self.ids
        segments: list[tuple[int, Union[str, list[int]]]] = []
        text: list[str] = []  # prompt text waiting for the next control token
        images, videos = iter(image_tokens), iter(video_tokens)

        def prompt(*parts: Union[str, list[int]]) -> None:
            for part in parts:
                if isinstance(part, str):
                    text.append(part)
                    continue
                if any(text):
                    segments.append((_PROMPT, "".join(text)))
                text.clear()
                segments.append((_VISION if part[0] == ids_["<|vision_start|>"] else _PROMPT, part))

        def content(value: str) -> None:
            for piece in _PLACEHOLDER_RE.split(value):
                if piece == IMAGE_PLACEHOLDER:
                    prompt([ids_["<|vision_start|>"]] + [ids_["<|image_pad|>"]] * next(images)
                           + [ids_["<|vision_end|>"]])
                elif piece == VIDEO_PLACEHOLDER:
                    prompt([ids_["<|vision_start|>"]] + [ids_["<|video_pad|>"]] * next(videos)
                           + [ids_["<|vision_end|>"]])
                else:
                    prompt(piece)

        system = conv.system if conv.system is not None else self.config.system_prompt
        if system:
            prompt([ids_["<|im_start|>"]], "system\n")
            content(system)
            prompt([ids_["<|im_end|>"]], "\n")
        last_turn = len(conv.turns) - 1
        for turn, (user, answer) in enumerate(conv.turns):
            prompt([ids_["<|im_start|>"]], "user\n")
            content(user)
            prompt([ids_["<|im_end|>"]], "\n", [ids_["<|im_start|>"]], "assistant\n")
            if any(text):
                segments.append((_PROMPT, "".join(text)))
            text.clear()
            if answer is None:  # generation prompt: ends with "<|im_start|>assistant\n"
                return segments, True
            kind = _HISTORY_ANSWER if self.config.masks_history and turn < last_turn else _ANSWER
            segments += [(kind, answer), (kind, [ids_["<|im_end|>"]]), (_TURN_END, "\n")]
        return segments, False

    def _assemble(self, segments: list[tuple[int, Union[str, list[int]]]], generation: bool,
                  encoded: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray, int, Optional[list[int]]]:
        """`_render_many`'s tuple of one layout, its texts' ids taken from `encoded`."""
        ids: list[int] = []
        labels: list[int] = []
        spans_end = 0
        turn_ends: list[int] = []
        supervise_prompt = self.config.supervises_prompt
        for kind, part in segments:
            part = encoded[part] if isinstance(part, str) else part
            if kind == _VISION:
                spans_end = len(ids) + len(part)
            supervised = kind == _ANSWER or (kind == _PROMPT and supervise_prompt)
            ids.extend(part)
            labels.extend(part if supervised else [IGNORE_INDEX] * len(part))
            if kind == _TURN_END:
                turn_ends.append(len(ids))
        return (np.asarray(ids, np.int64), np.asarray(labels, np.int64), spans_end,
                None if generation else turn_ends)

    def _truncate(self, conv: Conversation, ids: np.ndarray, labels: np.ndarray, spans_end: int,
                  turn_ends: list[int]) -> tuple[np.ndarray, np.ndarray]:
        limit = self.config.max_seq_length
        if len(ids) <= limit:
            return ids, labels
        cut = max((e for e in turn_ends if e <= limit), default=limit)
        if cut < spans_end:  # a later turn holds media: only the hard cut can keep it
            cut = limit
        if cut < spans_end or not (labels[:cut] != IGNORE_INDEX).any():
            raise DataError(conv.file, conv.index,
                            f"{len(ids)} tokens > max_seq_length {limit}, and truncating would cut an image/video "
                            f"span (last one ends at token {spans_end}) or leave no answer token", kind="too long")
        return ids[:cut], labels[:cut]

    # ---- probing (no pixel decoding) ----------------------------------------------------------------------------
    def _media_error(self, conv: Conversation, path: VideoRef, e: Exception) -> DataError:
        if isinstance(path, tuple):  # a frame list: name its first missing frame, else its first
            path = next((p for p in path if not os.path.exists(p)), path[0])
        if not os.path.exists(path):
            return missing_media_error(conv, path)
        return DataError(conv.file, conv.index, f"unreadable media {path}: {e}", kind="unreadable media")

    def _probe_media(self, conv: Conversation, headers: Optional[dict[tuple, Any]] = None
                     ) -> tuple[list[tuple[int, int]], list[int], list[int]]:
        """(original (height, width) of each image, tokens of each image, tokens of each video), from headers
        only. The token counts are computed inside the guard: the processor refuses some sizes (aspect ratio).
        `headers`: what files already probed gave, keyed by (path, size, mtime), filled in here (a length-table
        build: many datasets ask several questions about one image or video)."""
        sizes, image_tokens, video_tokens = [], [], []
        ip = self.processor.image_processor
        for path in conv.images:
            try:
                sizes.append(_read_header(headers, path, image_hw))
                image_tokens.append(ip.num_image_tokens(*sizes[-1]))
            except (OSError, ValueError) as e:
                raise self._media_error(conv, path, e) from None
        for path in conv.videos:
            try:
                frames, h, w = _read_header(headers, path, lambda p: _video_frames_and_size(
                    p, self.config.video_fps, self.config.video_maxlen))
                video_tokens.append(ip.num_video_tokens(frames, h, w))
            except (OSError, ValueError) as e:
                raise self._media_error(conv, path, e) from None
        return sizes, image_tokens, video_tokens

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of sample i as training builds them, from media headers only (no pixels)."""
        conv = self.records.conversation(i)
        _, image_tokens, video_tokens = self._probe_media(conv)
        return self.render(conv, image_tokens, video_tokens)

    def _measure(self, conv: Conversation) -> np.ndarray:
        """A conversation's LENGTH_COLUMNS row; raises DataError for unreadable or missing media."""
        sizes, image_tokens, video_tokens = self._probe_media(conv)
        return self._row(conv, sizes, self._render_many([(conv, image_tokens, video_tokens)])[0])

    def _row(self, conv: Conversation, sizes: list[tuple[int, int]],
             rendered: tuple[np.ndarray, np.ndarray, int, Optional[list[int]]]) -> np.ndarray:
        """The LENGTH_COLUMNS row of a conversation from its image sizes and `_render_many` tuple."""
        ids, labels, spans_end, turn_ends = rendered
        full = len(ids)
        try:
            ids, labels = self._truncate(conv, ids, labels, spans_end, turn_ends)
            tokens, supervised = len(ids), int((labels != IGNORE_INDEX).sum())
        except DataError:  # too long to truncate: the row says so, probe() raises the message
            tokens, supervised = -1, 0
        largest = max(sizes, key=lambda hw: hw[0] * hw[1], default=(0, 0))
        return np.asarray([full, tokens, supervised, len(conv.images), len(conv.videos), *largest], np.int32)

    def measure(self, i: int) -> np.ndarray:
        """Sample i's LENGTH_COLUMNS row, from the length table when it has one; raises DataError for bad media.
        Cached."""
        if i in self._probe_errors:
            raise self._probe_errors[i]
        row = self._table_rows(np.asarray([i]))[0]
        if row[FULL] != NOT_MEASURED:
            return row
        if self._measured is None:
            self._measured = np.full((len(self), len(LENGTH_COLUMNS)), NOT_MEASURED, np.int32)
        if self._measured[i, FULL] == NOT_MEASURED:
            try:
                self._measured[i] = self._measure(self.records.conversation(i))
            except DataError as e:
                self._probe_errors[i] = e
                raise
        return self._measured[i]

    def measure_many(self, samples: np.ndarray) -> tuple[np.ndarray, list[DataError]]:
        """(rows of the samples that measure, errors of those that do not), table rows read at once."""
        rows = self._table_rows(samples)
        errors: list[DataError] = []
        for k in np.flatnonzero(rows[:, FULL] == NOT_MEASURED):
            try:
                rows[k] = self.measure(int(samples[k]))
            except DataError as e:
                errors.append(e)
        return rows[rows[:, FULL] != NOT_MEASURED], errors

    def probe(self, i: int) -> tuple[int, int]:
        """(num_tokens, num_labels) of sample i after truncation; raises DataError for a bad sample. Cached."""
        row = self.measure(i)
        if row[TOKENS] < 0:
            try:
                self.tokens(i)  # raises the "too long" error with its numbers
            except DataError as e:
                self._probe_errors[i] = e
                raise
        return int(row[TOKENS]), int(row[LABELS])

    # ---- full samples ----------------------------------------------------------------------------------------
    def sample(self, i: int) -> dict[str, Any]:
        out = self._build(self.records.conversation(i))
        out["index"] = int(i)
        return out

    def generation_inputs(self, question: str, images: tuple[str, ...] = (), videos: tuple[str, ...] = (),
                          system: Optional[str] = None) -> dict[str, Any]:
        """A one-turn prompt ending with `<|im_start|>assistant\\n`, rendered exactly as in training
        (input_ids, attention_mask, position_ids, media keys; no labels), for generation / accuracy scoring."""
        for placeholder, media in ((IMAGE_PLACEHOLDER, images), (VIDEO_PLACEHOLDER, videos)):
            if question.count(placeholder) != len(media):
                raise ValueError(f"{question.count(placeholder)} {placeholder} placeholders but {len(media)} files")
        return self.prompt_inputs(Conversation("<prompt>", 0, system, ((question, None),), tuple(images),
                                               tuple(videos)))

    def prompt_inputs(self, conv: Conversation) -> dict[str, Any]:
        """`generation_inputs` of a conversation whose last answer is None: earlier turns are the history."""
        out = self._build(conv)
        del out["labels"], out["num_labels"]
        return out

    def _build(self, conv: Conversation) -> dict[str, Any]:
        ip = self.processor.image_processor
        out: dict[str, Any] = {}
        for path in conv.images:  # check first: the processor's message would not name the record
            if not os.path.isfile(path):
                raise self._media_error(conv, path, FileNotFoundError(path))
        if conv.images:
            try:
                out.update(ip.preprocess(list(conv.images)))
            except (OSError, ValueError) as e:
                bad = next((p for p in conv.images if p in str(e)), conv.images[0])
                raise self._media_error(conv, bad, e) from None
        if conv.videos:
            frames = []
            for path in conv.videos:
                try:
                    frames.append(load_video(path, self.config.video_fps, VIDEO_MIN_FRAMES, self.config.video_maxlen))
                except (OSError, ValueError) as e:
                    raise self._media_error(conv, path, e) from None
            out.update(ip.preprocess_videos(frames))
            out["second_per_grid_ts"] = self.processor.second_per_grid_ts([self.config.video_fps] * len(frames))
        merge = ip.merge_size**2
        image_tokens = [int(np.prod(g)) // merge for g in out.get("image_grid_thw", [])]
        video_tokens = [int(np.prod(g)) // merge for g in out.get("video_grid_thw", [])]
        ids, labels = self.render(conv, image_tokens, video_tokens)
        position_ids, _ = get_rope_index(
            ids[None], out.get("image_grid_thw"), out.get("video_grid_thw"), None, out.get("second_per_grid_ts"),
            spatial_merge_size=ip.merge_size, image_token_id=self.ids["<|image_pad|>"],
            video_token_id=self.ids["<|video_pad|>"], vision_start_token_id=self.ids["<|vision_start|>"],
            tokens_per_second=self.video_tokens_per_second,
        )
        out.update(input_ids=ids, labels=labels, attention_mask=np.ones_like(ids), position_ids=position_ids[:, 0],
                   num_tokens=len(ids), num_labels=int((labels != IGNORE_INDEX).sum()))
        return out
