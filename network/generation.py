"""Autoregressive generation for `Qwen2VLForConditionalGeneration`: KV cache, M-RoPE continuation, decoding.

Prefill runs the whole (left-padded) prompt once — the vision tower included — and fills a `KVCache`; each
decode step then feeds one token per row. Token selection runs on the host in numpy (seeded temperature /
top-k / top-p sampling, HF repetition penalty, min_new_tokens), so every tensor-parallel rank picks the same
tokens from the same logits; plain greedy takes the argmax on the device and copies only the ids.

Positions. `get_rope_index` gives the prompt's 3-D positions and per row rope_deltas = (largest prompt
position + 1) - S, S being the padded prompt length. The token at cache index i (positions already cached,
padding included) gets position i + rope_deltas on all three axes. For a left-padded row that equals the
unpadded row's position, so a prompt produces the same tokens alone or inside a padded batch.
HF 4.55 `prepare_inputs_for_generation` instead adds rope_deltas to the count of non-padding tokens, which
shifts a row with P padding tokens by -P: its batched output differs from its own single-prompt output
(measured in tests/dist/test_generation.py; identical once that formula is swapped in).

Attention masks. The key mask grows by a 1 per step; left padding stays masked for every later query.

KV cache. Keys/values live in buffers allocated once at prefill for the prompt plus `max_new_tokens`, written in
place each step (no per-step reallocation of the whole cache). When rows finish (stop token, or the streamer
stops them, e.g. a client went away) they leave the batch: the cache keeps only the running rows, so a finished
row costs nothing in later steps. Rows never interact, so this changes no row's tokens.

Continuous batching (`RunningBatch`). New rows join a running batch between decode steps: they are prefilled as
their own left-padded batch, then their cache is merged into the running one. Whichever side's cache is shorter
is left-padded with masked columns so both end at the same cache index, and each padded row's rope delta drops
by its padding, so every row keeps the positions (and tokens) it has alone. When rows leave, the cache columns
that no remaining row attends to (the longest common left padding) are dropped the same way.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import paddle

from network.rope_index import get_rope_index_for_config

Array = paddle.Tensor | np.ndarray


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # stop tokens are suppressed before this many new tokens (HF semantics)
    temperature: float = 0.0  # 0: greedy; > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # sampling only: keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # sampling only: keep the smallest set whose probability reaches top_p
    repetition_penalty: float = 1.0  # HF: logits of seen tokens divided (> 0) or multiplied (< 0) by it
    stop_token_ids: tuple[int, ...] = ()  # empty: the model config's eos_token_id
    seed: int | None = None  # sampling RNG seed (numpy); None draws fresh entropy

    def __post_init__(self) -> None:
        problems = [name for name, ok in (
            ("max_new_tokens >= 1", self.max_new_tokens >= 1),
            ("0 <= min_new_tokens", self.min_new_tokens >= 0),
            ("temperature >= 0", self.temperature >= 0),
            ("top_k >= 0", self.top_k >= 0),
            ("0 < top_p <= 1", 0 < self.top_p <= 1),
            ("repetition_penalty > 0", self.repetition_penalty > 0),
        ) if not ok]
        if problems:
            raise ValueError(f"invalid generation settings, need: {', '.join(problems)} (got {self})")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


GENERATION_CONFIG = "generation_config.json"
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")


@dataclass
class CheckpointGenerationDefaults:
    """What a checkpoint's `generation_config.json` says: its stop ids (the Hub's Qwen2-VL files list
    151645 `<|im_end|>` and 151643 `<|endoftext|>`) and sampling settings (do_sample false means greedy)."""

    eos_token_ids: tuple[int, ...] = ()
    sampling: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir: str | None) -> "CheckpointGenerationDefaults":
        path = os.path.join(model_dir, GENERATION_CONFIG) if model_dir else None
        if not path or not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        eos = data.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos or []
        sampling = {k: data[k] for k in SAMPLING_KEYS if isinstance(data.get(k), (int, float))}
        if data.get("do_sample") is False:
            sampling["temperature"] = 0.0
        return cls(tuple(int(i) for i in eos), sampling)


@dataclass
class GenerationOutput:
    sequences: np.ndarray  # int64 [B, T] new tokens; after a row's stop token: pad_token_id
    num_tokens: np.ndarray  # int64 [B] tokens generated per row, its stop token included
    prefill_seconds: float
    decode_seconds: float  # all decode steps (the first new token comes from the prefill)


class KVCache:
    """Per decoder layer: rotated keys and values [B, capacity, kv_heads, head_dim], written in place.

    `capacity` is the most positions a row will hold (prompt + new tokens); buffers are allocated by the first
    `update` (the prefill), when the batch size, head count and dtype are known. Positions are cache indices,
    left padding included (it stays masked through `attention_mask`). The model calls `advance` once per
    forward, after every layer has written its keys at `seq_len`."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.capacity = capacity
        self.keys: list[paddle.Tensor | None] = [None] * num_layers
        self.values: list[paddle.Tensor | None] = [None] * num_layers
        self.seq_len = 0

    def update(self, layer_idx: int, key: paddle.Tensor, value: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Write this step's keys/values of layer `layer_idx` at `seq_len`; return all cached ones so far."""
        start, end = self.seq_len, self.seq_len + key.shape[1]
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = (
                _buffer(x, max(self.capacity, end)) for x in (key, value))
        if end > self.keys[layer_idx].shape[1]:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.keys[layer_idx].shape[1]}")
        self.keys[layer_idx][:, start:end] = key
        self.values[layer_idx][:, start:end] = value
        return self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end]

    def advance(self, num_positions: int) -> None:
        self.seq_len += num_positions

    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only these batch rows (indices into the current batch), in this order."""
        index = paddle.to_tensor(rows.astype(np.int64))
        self.keys = [None if k is None else paddle.index_select(k, index) for k in self.keys]
        self.values = [None if v is None else paddle.index_select(v, index) for v in self.values]

    def realign(self, offset: int, capacity: int) -> None:
        """Move every cached position `offset` columns right (zeros, i.e. masked padding, come in on the left) or,
        for a negative offset, drop the first -offset columns; into new buffers of `capacity` positions."""
        src = max(0, -offset)
        dst, count = max(0, offset), self.seq_len - src

        def move(x: paddle.Tensor) -> paddle.Tensor:
            buf = paddle.zeros([x.shape[0], capacity, *x.shape[2:]], x.dtype)
            buf[:, dst: dst + count] = x[:, src: src + count]
            return buf

        self.keys = [None if k is None else _on_local(move, k) for k in self.keys]
        self.values = [None if v is None else _on_local(move, v) for v in self.values]
        self.seq_len += offset
        self.capacity = capacity

    def append_rows(self, other: "KVCache") -> None:
        """Add `other`'s rows after this cache's rows; both hold the same positions in buffers of one capacity."""
        if other.seq_len != self.seq_len:
            raise ValueError(f"cannot merge caches at {self.seq_len} and {other.seq_len} positions")
        concat = lambda a, b: paddle.concat([a, b])  # noqa: E731
        self.keys = [_on_local(concat, a, b) for a, b in zip(self.keys, other.keys)]
        self.values = [_on_local(concat, a, b) for a, b in zip(self.values, other.values)]


def _on_local(fn: Callable[..., paddle.Tensor], *xs: paddle.Tensor) -> paddle.Tensor:
    """`fn` of the tensors; for tensor-parallel ones, of each rank's local parts, sharded like the first."""
    if not xs[0].is_dist():
        return fn(*xs)
    import paddle.distributed as dist

    out = fn(*(x._local_value() for x in xs))
    return dist.auto_parallel.api.dtensor_from_local(out, xs[0].process_mesh, xs[0].placements)


def _buffer(x: paddle.Tensor, capacity: int) -> paddle.Tensor:
    """Zeros [B, capacity, heads, head_dim] like `x`; for a tensor-parallel `x`, sharded the same way."""
    if not x.is_dist():
        return paddle.zeros([x.shape[0], capacity, *x.shape[2:]], x.dtype)
    import paddle.distributed as dist

    local = x._local_value()
    buf = paddle.zeros([local.shape[0], capacity, *local.shape[2:]], x.dtype)
    return dist.auto_parallel.api.dtensor_from_local(buf, x.process_mesh, x.placements)


def decode_position_ids(attention_mask: np.ndarray, rope_deltas: np.ndarray) -> np.ndarray:
    """M-RoPE positions [3, B, 1] of the newest token: its cache index + rope_deltas, on all three axes.

    attention_mask: [B, cache_len + 1] (the newest token's column last); rope_deltas: [B, 1]."""
    position = attention_mask.shape[1] - 1 + rope_deltas
    return np.broadcast_to(position.astype(np.int64), (3,) + position.shape).copy()


def _as_numpy(x: Array | None) -> np.ndarray | None:
    return x.numpy() if isinstance(x, paddle.Tensor) else x


def _key_mask(mask: np.ndarray) -> np.ndarray | None:
    """None when no key is padding: the model then skips masking (elementwise ops over scores are slow on CPU)."""
    return None if mask.all() else mask


def _next_tokens(logits: paddle.Tensor, cfg: GenerationConfig, seen: np.ndarray, steps: np.ndarray,
                 stop_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """This step's token per row from the model's last-position logits [B, 1, vocab]; `steps` (int or [B]):
    how many tokens each row has generated before this one."""
    if not cfg.do_sample and cfg.repetition_penalty == 1.0 and np.all(np.asarray(steps) >= cfg.min_new_tokens):
        # Plain greedy: argmax on the device, only B ids cross to the host (not B x vocab logits).
        return logits[:, -1].argmax(axis=-1).numpy().astype(np.int64)
    host = logits[:, -1].astype("float32").numpy()
    return _select(_process_logits(host, cfg, seen, steps, stop_ids), cfg, rng)


def _process_logits(logits: np.ndarray, cfg: GenerationConfig, seen: np.ndarray, steps: np.ndarray,
                    stop_ids: np.ndarray) -> np.ndarray:
    """HF's processor order: repetition penalty, min-new-tokens, then (sampling) temperature, top-k, top-p."""
    if cfg.repetition_penalty != 1.0:
        penalised = np.where(logits < 0, logits * cfg.repetition_penalty, logits / cfg.repetition_penalty)
        logits = np.where(seen, penalised, logits)
    early = np.flatnonzero(np.broadcast_to(np.asarray(steps) < cfg.min_new_tokens, logits.shape[:1]))
    if len(early):
        logits = logits.copy()
        logits[np.ix_(early, stop_ids)] = -np.inf
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = np.partition(logits, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if cfg.top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = _softmax(sorted_logits)
        # Drop a token once the more likely ones already reach top_p (the most likely token always stays).
        drop_sorted = np.cumsum(probs, axis=-1) - probs >= cfg.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    return logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _select(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    if not cfg.do_sample:
        return logits.argmax(axis=-1)
    probs = _softmax(logits)
    # Inverse-CDF sampling: one uniform draw per row, reproducible for a seed.
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


class RunningBatch:
    """Rows decoding together, one token per row per `step`; rows `join` between steps and leave by `keep`.

    Every row shares `cfg`'s sampling settings and RNG; `max_new_tokens` is per row (given at `join`). The
    token selection, the cache and the masks are the same on every tensor-parallel rank when every rank makes
    the same calls with the same arguments."""

    def __init__(self, model: paddle.nn.Layer, cfg: GenerationConfig):
        self.model, self.cfg, self.config = model, cfg, model.config
        self.stop_ids = np.asarray(cfg.stop_token_ids or (self.config.eos_token_id,), np.int64)
        self.rng = np.random.default_rng(cfg.seed)
        self.cache: KVCache | None = None
        self.mask = np.zeros((0, 0), np.int64)  # [B, cache_len]: which cached positions each row attends to
        self.rope_deltas = np.zeros((0, 1), np.int64)
        self.budgets = np.zeros(0, np.int64)  # new tokens each row may generate
        self.counts = np.zeros(0, np.int64)  # new tokens each row has generated
        self.last = np.zeros(0, np.int64)  # each row's newest token: the next step's input
        self.seen = np.zeros((0, self.config.vocab_size), bool)  # tokens the repetition penalty applies to

    def __len__(self) -> int:
        return len(self.counts)

    def join(self, input_ids: Array, attention_mask: Array | None = None, pixel_values: Array | None = None,
             image_grid_thw: Array | None = None, pixel_values_videos: Array | None = None,
             video_grid_thw: Array | None = None, second_per_grid_ts: Array | None = None,
             max_new_tokens: int | np.ndarray | None = None) -> np.ndarray:
        """Prefill left-padded prompts and add them as the last rows; returns their first new tokens [B']."""
        ids = np.asarray(_as_numpy(input_ids), np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(_as_numpy(attention_mask), np.int64)
        if (mask[:, -1] == 0).any():
            raise ValueError("generation needs left padding: every row must end with a real token")
        image_grid_thw, video_grid_thw = _as_numpy(image_grid_thw), _as_numpy(video_grid_thw)
        position_ids, rope_deltas = get_rope_index_for_config(
            self.config, ids, image_grid_thw, video_grid_thw, mask, _as_numpy(second_per_grid_ts))
        budgets = np.broadcast_to(np.asarray(
            self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens, np.int64), ids.shape[:1])
        seen = np.zeros((ids.shape[0], self.config.vocab_size), bool)
        rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
        real = mask.reshape(-1).astype(bool)  # left padding is not part of the prompt
        seen[rows[real], ids.reshape(-1)[real]] = True
        cache = KVCache(self.config.num_hidden_layers, capacity=ids.shape[1] + int(budgets.max()))
        with paddle.no_grad():
            logits = self.model(
                ids, attention_mask=_key_mask(mask), position_ids=position_ids, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw, past_key_values=cache, logits_to_keep=1,
            ).logits
        picked = _next_tokens(logits, self.cfg, seen, np.zeros(len(ids), np.int64), self.stop_ids, self.rng)
        seen[np.arange(len(ids)), picked] = True
        if len(self):
            width = max(self.cache.seq_len, cache.seq_len)
            capacity = width + int(max((self.budgets - self.counts).max(), budgets.max()))
            self.mask, self.rope_deltas = _left_pad(self.mask, self.rope_deltas, width)
            mask, rope_deltas = _left_pad(mask, rope_deltas, width)
            self.cache.realign(width - self.cache.seq_len, capacity)
            cache.realign(width - cache.seq_len, capacity)
            self.cache.append_rows(cache)
            mask, rope_deltas = np.concatenate([self.mask, mask]), np.concatenate([self.rope_deltas, rope_deltas])
        self.cache, self.mask, self.rope_deltas = self.cache if len(self) else cache, mask, rope_deltas
        self.budgets, self.counts = np.concatenate([self.budgets, budgets]), np.concatenate([self.counts, [1] * len(ids)])
        self.last, self.seen = np.concatenate([self.last, picked]), np.concatenate([self.seen, seen])
        return picked

    def step(self) -> np.ndarray:
        """Feed every row its newest token; returns each row's next token [B]."""
        self.mask = np.concatenate([self.mask, np.ones([len(self), 1], np.int64)], axis=1)
        with paddle.no_grad():
            logits = self.model(
                self.last[:, None], attention_mask=_key_mask(self.mask),
                position_ids=decode_position_ids(self.mask, self.rope_deltas), past_key_values=self.cache,
            ).logits
        picked = _next_tokens(logits, self.cfg, self.seen, self.counts, self.stop_ids, self.rng)
        self.seen[np.arange(len(self)), picked] = True
        self.counts += 1
        self.last = picked
        return picked

    def finished(self) -> np.ndarray:
        """bool [B]: rows whose newest token is a stop token or that used up their budget."""
        return np.isin(self.last, self.stop_ids) | (self.counts >= self.budgets)

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the rows marked True (the others leave), then drop the cache columns no row attends to."""
        rows = np.asarray(rows, bool)
        if rows.all():
            return
        index = np.flatnonzero(rows)
        self.cache.keep_rows(index)
        self.mask, self.rope_deltas, self.budgets = self.mask[index], self.rope_deltas[index], self.budgets[index]
        self.counts, self.last, self.seen = self.counts[index], self.last[index], self.seen[index]
        if not len(self):
            return
        unused = int(self.mask.argmax(axis=1).min())  # every row ends with a real token, so argmax finds one
        if unused:
            capacity = self.cache.seq_len - unused + int((self.budgets - self.counts).max())
            self.cache.realign(-unused, capacity)
            self.mask, self.rope_deltas = self.mask[:, unused:], self.rope_deltas + unused


def _left_pad(mask: np.ndarray, rope_deltas: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows' key mask left-padded to `width` columns, and their rope deltas moved so positions stay."""
    pad = width - mask.shape[1]
    return np.pad(mask, ((0, 0), (pad, 0))), rope_deltas - pad


def generate(
    model: paddle.nn.Layer,
    input_ids: Array,
    attention_mask: Array | None = None,
    pixel_values: Array | None = None,
    image_grid_thw: Array | None = None,
    pixel_values_videos: Array | None = None,
    video_grid_thw: Array | None = None,
    second_per_grid_ts: Array | None = None,
    generation_config: GenerationConfig | None = None,
    streamer: Callable[[np.ndarray], np.ndarray | None] | None = None,
) -> GenerationOutput:
    """Generate from left-padded prompts (processor output with `padding_side="left"`, or `left_pad_prompts`).

    `streamer(tokens)` is called once per step with the new token of every row ([B] int64; pad_token_id for
    rows that had already stopped). It may return a bool [B] array: rows marked True stop after this token
    (the caller's own stop rule: a stop string, a per-request token budget, a client gone). `model` is a
    `Qwen2VLForConditionalGeneration`, also a tensor-parallel one whose logits come back as dense tensors
    (see launch/infer.py); with tensor parallelism every rank must return the same stop rows.
    """
    cfg = generation_config or GenerationConfig()
    pad = model.config.pad_token_id
    running = RunningBatch(model, cfg)
    start = time.perf_counter()
    picked = running.join(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                          video_grid_thw, second_per_grid_ts)
    batch = len(picked)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens = np.full((batch, cfg.max_new_tokens), pad, np.int64)
    num_tokens = np.zeros(batch, np.int64)
    finished = np.zeros(batch, bool)
    rows = np.arange(batch)  # rows still in the running batch, in its order
    for step in range(cfg.max_new_tokens):
        if step:
            picked = running.step()
        next_ids = np.full(batch, pad, np.int64)
        next_ids[rows] = picked
        tokens[:, step] = next_ids
        num_tokens[rows] += 1
        finished[rows] |= running.finished()
        if streamer is not None:
            stopped = streamer(next_ids)
            if stopped is not None:
                finished |= np.asarray(stopped, bool)
        if finished.all() or step == cfg.max_new_tokens - 1:
            break
        running.keep(~finished[rows])  # finished rows leave the batch
        rows = rows[~finished[rows]]
    return GenerationOutput(
        sequences=tokens[:, : step + 1], num_tokens=num_tokens,
        prefill_seconds=prefill_seconds, decode_seconds=time.perf_counter() - start,
    )


def left_pad_prompts(prompts: list[dict[str, np.ndarray]], pad_token_id: int) -> dict[str, np.ndarray]:
    """One left-padded batch from single-prompt processor outputs (batch 1 each); media concatenated in row
    order, which is the order the vision features are placed in."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        ids[i, width - n:] = p["input_ids"][0]
        mask[i, width - n:] = 1 if p.get("attention_mask") is None else p["attention_mask"][0]
    out = dict(input_ids=ids, attention_mask=mask)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [p[key] for p in prompts if key in p]
        if parts:
            out[key] = np.concatenate(parts)
    return out
