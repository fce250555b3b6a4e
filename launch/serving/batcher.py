"""One model thread that batches requests (continuous batching: requests join a running batch between steps).

When idle the thread takes the oldest waiting job, waits `batch_wait` seconds for more (longer, up to
PREPARE_WAIT_SECONDS, while requests that already arrived are still decoding their media), and starts a
`RunningBatch` with up to `max_batch_size` jobs of the same sampling settings (greedy jobs always batch
together; their tokens equal the job run alone, see network/generation.py). Between decode steps, waiting jobs
with the same settings join it while rows are free, so a short request never waits for a long one to finish
(`continuous=False` keeps the old static batches: new jobs wait until the whole batch is done). One prefill
holds at most `max_batch_tokens` padded prompt tokens (rows x longest prompt; a longer single prompt runs
alone), so many long prompts are split over several prefills instead of one huge one.

Per row `_Row` decodes text, applies the job's stop strings and token budget, and stops rows whose client went
away; stopped rows leave the batch. Events go to each job's asyncio queue (thread-safe): ("delta", text), then
("done", finish_reason) or ("error", message).

Tensor parallel: rank 0 runs this thread; `RankSync` sends every call it makes on its `RunningBatch` ("start",
"join", "step", "keep" with their arguments) to the other ranks, which make the same calls (`follow_rank0`), so
the collectives inside the model match and every rank takes the same join and leave decisions.
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

from network.generation import GenerationConfig, RunningBatch, left_pad_prompts
from network.log import logger
from network.processor import Qwen2VLProcessor

HEARTBEAT_SECONDS = 30.0  # idle tensor-parallel ranks get a message this often (keeps gloo from timing out)
PREPARE_WAIT_SECONDS = 0.2  # longest a batch waits for requests that arrived but are still being preprocessed
# Padded prompt tokens (rows x longest prompt) one prefill may hold: activations grow with it, so a burst of long
# prompts is prefilled in parts. A single longer prompt still runs (alone); --max_model_len bounds it.
DEFAULT_MAX_BATCH_TOKENS = 16384


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
    """Ranks > 0: make every `RunningBatch` call rank 0 makes, with its arguments, until it says stop."""
    sync = RankSync()
    running = None
    while True:
        message = sync.share(None)
        if message is None:
            return
        op, kwargs = message
        try:
            if op == "start":
                running = RunningBatch(model, **kwargs)
            elif op != "heartbeat":
                getattr(running, op)(**kwargs)
        except Exception:  # rank 0 fails the same call and drops its batch; so does this rank
            logger.exception("tensor-parallel rank: %s failed", op)
            running = None


class Batcher:
    def __init__(self, model, processor: Qwen2VLProcessor, stop_token_ids: tuple[int, ...], max_batch_size: int = 8,
                 batch_wait: float = 0.01, sync: RankSync | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, continuous: bool = True):
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch_size and max_batch_tokens must be >= 1 (got {max_batch_size}, "
                             f"{max_batch_tokens})")
        self.model, self.processor, self.stop_token_ids = model, processor, stop_token_ids
        self.max_batch_size, self.batch_wait, self.sync = max_batch_size, batch_wait, sync
        self.max_batch_tokens, self.continuous = max_batch_tokens, continuous
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()  # taken from the queue, not yet run
        self._thread = threading.Thread(target=self._loop, name="qwen2vl-ap-batcher", daemon=True)
        self._batch: RunningBatch | None = None
        self.running = 0
        self.preparing = 0  # requests received whose media are being decoded (set by the HTTP side)
        self.batches = 0
        self.joined = 0  # jobs that joined a batch already running
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
                self.sync.share(("heartbeat", {}))
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
        return self._take(self._waiting[0].batch_key(), self.max_batch_size)

    def _take(self, key: tuple, rows: int) -> list[Job]:
        """Waiting jobs with this batch key, oldest first, up to `rows` and max_batch_tokens padded prompt
        tokens (the first one always); cancelled ones are dropped."""
        batch: list[Job] = []
        for job in [j for j in self._waiting if j.batch_key() == key]:
            width = max([job.prompt_tokens] + [j.prompt_tokens for j in batch])
            if len(batch) == rows or (batch and width * (len(batch) + 1) > self.max_batch_tokens):
                break
            self._waiting.remove(job)
            if job.cancelled.is_set():
                self.cancelled += 1
            else:
                batch.append(job)
        return batch

    def _joiners(self, key: tuple, rows: int) -> list[Job]:
        """Jobs that may join the running batch now: what arrived with the same settings, without waiting."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stopping: the running batch and the waiting jobs finish first
                self._queue.put(None)
                break
            self._waiting.append(job)
        if rows < 1 or (self._waiting and self._waiting[0].batch_key() != key):
            return []  # an older request with other settings waits: let this batch drain so it can start
        return self._take(key, rows)

    def _call(self, op: str, **kwargs: Any) -> Any:
        """One call on the running batch, made by every tensor-parallel rank."""
        if self.sync is not None:
            self.sync.share((op, kwargs))
        if op == "start":
            self._batch = RunningBatch(self.model, **kwargs)
            return self._batch
        return getattr(self._batch, op)(**kwargs)

    def _admit(self, jobs: list[Job], rows: list[_Row]) -> None:
        """Prefill `jobs` into the running batch and take their first tokens."""
        inputs = left_pad_prompts([j.inputs for j in jobs], self.processor.pad_token_id)
        tokens = self._call("join", **inputs, max_new_tokens=np.array([j.max_tokens for j in jobs], np.int64))
        new = [_Row(j, self.processor, self.stop_token_ids) for j in jobs]
        rows.extend(new)
        self._settle(rows, new, tokens)

    def _settle(self, rows: list[_Row], stepped: list[_Row], tokens: np.ndarray) -> None:
        """Give the `stepped` rows their tokens; finished rows leave the batch (and `rows`)."""
        for row, token in zip(stepped, tokens):
            row.step(int(token))
        self.cancelled += sum(r.cancelled for r in stepped)
        keep = np.array([not r.done for r in rows])
        if not keep.all():
            self._call("keep", rows=keep)
            rows[:] = [r for r in rows if not r.done]
        self.running = len(rows)

    def _run(self, jobs: list[Job]) -> None:
        settings = jobs[0].settings
        seed = settings.seed if settings.seed is not None else random.randrange(2**32)  # the same on every rank
        config = GenerationConfig(
            max_new_tokens=max(j.max_tokens for j in jobs), temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, repetition_penalty=settings.repetition_penalty, seed=seed,
            stop_token_ids=self.stop_token_ids)
        key, rows = jobs[0].batch_key(), []
        start, tokens = time.perf_counter(), len(jobs)
        try:
            self._call("start", cfg=config)
            self._admit(jobs, rows)
            while rows:
                self._settle(rows, list(rows), self._call("step"))
                tokens += len(rows)
                joiners = self._joiners(key, self.max_batch_size - len(rows)) if self.continuous else []
                if joiners:
                    self.joined += len(joiners)
                    jobs += joiners
                    self._admit(joiners, rows)
        except Exception as e:  # a failed batch fails its requests, not the server
            logger.exception("batch of %d failed", len(rows))
            for row in rows:
                if not row.done:
                    row.job.send("error", f"generation failed: {e}")
            return
        finally:
            self._batch = None
            self.running = 0
            self.batches += 1
        logger.debug("batch of %d requests: about %d tokens in %.2fs", len(jobs), tokens,
                     time.perf_counter() - start)
