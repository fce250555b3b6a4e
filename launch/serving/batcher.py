"""One model thread that batches requests arriving together (static batching per decode loop).

The thread takes the oldest waiting job, waits `batch_wait` seconds for more (longer, up to
PREPARE_WAIT_SECONDS, while requests that already arrived are still decoding their media), and runs up to
`max_batch_size`
jobs with the same sampling settings as one left-padded `generate` call (greedy jobs always batch together;
their tokens equal the job run alone, see network/generation.py). Per row the streamer decodes text, applies
the job's stop strings and token budget, and stops rows whose client went away; stopped rows leave the batch.

Events go to each job's asyncio queue (thread-safe): ("delta", text), then ("done", finish_reason) or
("error", message).

Tensor parallel: rank 0 runs this thread; `RankSync` sends every batch and every step's stopped rows to the
other ranks, which run the same `generate` calls (`follow_rank0`) so the collectives inside the model match.
"""
from __future__ import annotations

import asyncio
import collections
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from network.generation import GenerationConfig, generate, left_pad_prompts
from network.log import logger
from network.processor import Qwen2VLProcessor

HEARTBEAT_SECONDS = 30.0  # idle tensor-parallel ranks get a message this often (keeps gloo from timing out)
PREPARE_WAIT_SECONDS = 0.2  # longest a batch waits for requests that arrived but are still being preprocessed


@dataclass
class Job:
    inputs: dict[str, np.ndarray]  # processor output, batch 1
    prompt_tokens: int
    max_tokens: int
    settings: GenerationConfig  # sampling settings; max_new_tokens and stop tokens are set per batch
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def batch_key(self) -> tuple:
        s = self.settings
        if not s.do_sample:
            return ("greedy", s.repetition_penalty)
        return ("sample", s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed)


class _Row:
    """Text so far of one running job, what has been sent, and its stop rules."""

    def __init__(self, job: Job, processor: Qwen2VLProcessor, stop_token_ids: tuple[int, ...]):
        self.job, self.processor, self.stop_token_ids = job, processor, stop_token_ids
        self.ids: list[int] = []
        self.sent = 0
        self.done = False
        self.cancelled = False  # the client went away before the row finished
        # Per stop string: where the longest tail of the text that starts it may begin. It only moves forward
        # (an earlier start would have been a longer tail at the previous step), so each step checks O(tail).
        self._stop_from = [0] * len(job.stop)

    def step(self, token: int) -> bool:
        """Take this step's token; True when the row is finished (events sent)."""
        job = self.job
        if job.cancelled.is_set():
            self.done = self.cancelled = True
            return True
        self.ids.append(token)
        job.completion_tokens = len(self.ids)
        if token in self.stop_token_ids:
            return self.finish(self.processor.decode(self.ids, skip_special_tokens=True), "stop")
        text = self.processor.decode(self.ids, skip_special_tokens=True)
        for s in job.stop:  # a stop string not found before can only end in the unsent text
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                return self.finish(text[:at], "stop")
        if len(self.ids) >= job.max_tokens:
            return self.finish(text, "length")
        if text.endswith("\ufffd"):  # a character split over byte-level tokens: wait for the rest
            return False
        hold = self._held_tail(text)
        if len(text) - hold > self.sent:
            job.send("delta", text[self.sent: len(text) - hold])
            self.sent = len(text) - hold
        return False

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of a stop string (held back, not sent)."""
        hold = 0
        for i, s in enumerate(self.job.stop):
            at = max(self._stop_from[i], len(text) - len(s) + 1)
            while at < len(text) and not s.startswith(text[at:]):
                at = text.find(s[0], at + 1)
                at = len(text) if at < 0 else at
            self._stop_from[i] = at
            hold = max(hold, len(text) - at)
        return hold

    def finish(self, text: str, reason: str) -> bool:
        if len(text) > self.sent:
            self.job.send("delta", text[self.sent:])
        self.job.send("done", reason)
        self.done = True
        return True


class RankSync:
    """Rank 0's side of tensor-parallel serving: every other rank receives what rank 0 decides."""

    def __init__(self) -> None:
        import paddle.distributed as dist

        self._broadcast = dist.broadcast_object_list

    def share(self, message: Any) -> Any:
        box = [message]
        self._broadcast(box, src=0)
        return box[0]


def follow_rank0(model) -> None:
    """Ranks > 0: run every batch rank 0 runs, with its stop decisions, until it says stop."""
    sync = RankSync()
    while True:
        message = sync.share(None)
        if message is None:
            return
        if message == "heartbeat":
            continue
        inputs, config = message
        generate(model, **inputs, generation_config=config, streamer=lambda tokens: sync.share(None))


class Batcher:
    def __init__(self, model, processor: Qwen2VLProcessor, stop_token_ids: tuple[int, ...], max_batch_size: int = 8,
                 batch_wait: float = 0.01, sync: RankSync | None = None):
        self.model, self.processor, self.stop_token_ids = model, processor, stop_token_ids
        self.max_batch_size, self.batch_wait, self.sync = max_batch_size, batch_wait, sync
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()  # taken from the queue, not yet run
        self._thread = threading.Thread(target=self._loop, name="qwen2vl-ap-batcher", daemon=True)
        self.running = 0
        self.preparing = 0  # requests received whose media are being decoded (set by the HTTP side)
        self.batches = 0
        self.cancelled = 0

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        """Finish the jobs already submitted, then end the thread (and the other ranks)."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                if batch:
                    self._run(batch)
        finally:
            if self.sync is not None:
                self.sync.share(None)

    def _next_batch(self) -> list[Job] | None:
        """The next batch ([] after an idle heartbeat), or None once stopped and nothing waits."""
        if not self._waiting:
            try:
                job = self._queue.get(timeout=HEARTBEAT_SECONDS if self.sync else None)
            except queue.Empty:
                self.sync.share("heartbeat")
                return []
            if job is None:
                return None
            self._waiting.append(job)
        start = time.monotonic()
        stopping = False
        while len(self._waiting) < self.max_batch_size:
            waited = time.monotonic() - start
            # Requests whose media are still being decoded join if they come within PREPARE_WAIT_SECONDS.
            if waited >= self.batch_wait and not (self.preparing and waited < PREPARE_WAIT_SECONDS):
                break
            try:
                job = self._queue.get(timeout=max(self.batch_wait - waited, 0.002))
            except queue.Empty:
                continue
            if job is None:  # run what is waiting first
                stopping = True
                break
            self._waiting.append(job)
        if stopping:
            self._queue.put(None)
        key = self._waiting[0].batch_key()
        batch = [j for j in self._waiting if j.batch_key() == key][: self.max_batch_size]
        for job in batch:
            self._waiting.remove(job)
        live = [j for j in batch if not j.cancelled.is_set()]
        self.cancelled += len(batch) - len(live)
        return live

    def _run(self, jobs: list[Job]) -> None:
        settings = jobs[0].settings
        seed = settings.seed if settings.seed is not None else random.randrange(2**32)  # the same on every rank
        config = GenerationConfig(
            max_new_tokens=max(j.max_tokens for j in jobs), temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, repetition_penalty=settings.repetition_penalty, seed=seed,
            stop_token_ids=self.stop_token_ids)
        rows = [_Row(j, self.processor, self.stop_token_ids) for j in jobs]
        self.running = len(jobs)

        def streamer(tokens: np.ndarray) -> np.ndarray:
            stopped = np.array([row.done or row.step(int(t)) for row, t in zip(rows, tokens)])
            self.running = int((~stopped).sum())
            return stopped if self.sync is None else self.sync.share(stopped)

        start = time.perf_counter()
        try:
            inputs = left_pad_prompts([j.inputs for j in jobs], self.processor.pad_token_id)
            if self.sync is not None:
                self.sync.share((inputs, config))
            out = generate(self.model, **inputs, generation_config=config, streamer=streamer)
            for row in rows:  # rows the streamer did not finish ran out of tokens
                if not row.done:
                    row.finish(self.processor.decode(row.ids, skip_special_tokens=True), "length")
        except Exception as e:  # a failed batch fails its requests, not the server
            logger.exception("batch of %d failed", len(jobs))
            for row in rows:
                if not row.done:
                    row.job.send("error", f"generation failed: {e}")
            return
        finally:
            self.running = 0
            self.batches += 1
            self.cancelled += sum(r.cancelled for r in rows)
        logger.debug("batch of %d: prefill %.2fs, %d tokens in %.2fs", len(jobs), out.prefill_seconds,
                     int(out.num_tokens.sum()), time.perf_counter() - start)
