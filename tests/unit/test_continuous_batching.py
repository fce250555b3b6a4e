"""H4 (security review 2): the serve batcher lets new requests join a running batch between decode steps, so a
short request does not wait for a long one (the review measured 82.7 s behind a 3000-token request); and one
prefill holds at most `max_batch_tokens` padded prompt tokens. Tiny model in-process, greedy."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from tiny_model import tiny_model  # noqa: E402

import network.generation as generation  # noqa: E402
from launch.serving.batcher import Batcher, Job  # noqa: E402
from network.generation import GenerationConfig  # noqa: E402
from network.processor import Qwen2VLProcessor  # noqa: E402

NO_STOP = (-1,)  # no token stops a row: lengths are the budgets


@pytest.fixture(scope="module")
def parts():
    processor = Qwen2VLProcessor.from_pretrained(None)
    return tiny_model(), processor


def _inputs(processor, text: str) -> dict:
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                           add_generation_prompt=True)
    return processor(prompt)


async def _answer(job: Job, log: list, name: str, started: asyncio.Event) -> str:
    text = ""
    while True:
        kind, value = await job.events.get()
        started.set()
        log.append((name, kind))
        if kind == "delta":
            text += value
        else:
            assert kind == "done", value
            return text


def _job(processor, text: str, max_tokens: int, temperature: float = 0.0) -> Job:
    inputs = _inputs(processor, text)
    return Job(inputs, int(inputs["input_ids"].shape[1]), max_tokens, GenerationConfig(temperature=temperature),
               [], asyncio.get_running_loop())


def _serve(batcher: Batcher, requests: list[tuple], processor) -> tuple[list[str], list]:
    """Submit (text, max_tokens, whether to wait until the previous request streams[, temperature]) and collect
    the answers and the order of events."""
    async def main():
        batcher.start()
        log, tasks, started = [], [], asyncio.Event()
        for i, (text, max_tokens, after_previous, *temperature) in enumerate(requests):
            if after_previous:
                await started.wait()
            job = _job(processor, text, max_tokens, *temperature)
            batcher.submit(job)
            started = asyncio.Event()
            tasks.append(asyncio.create_task(_answer(job, log, str(i), started)))
        answers = await asyncio.gather(*tasks)
        await asyncio.to_thread(batcher.stop)
        return answers, log

    return asyncio.run(main())


LONG = ("Describe a long walk through the city at night.", 120)
SHORT = ("Hi!", 4)


def test_h4_a_short_request_joins_a_running_long_one_and_both_answer_as_alone(parts):
    model, processor = parts
    alone = [_serve(Batcher(model, processor, NO_STOP), [(*r, False)], processor)[0][0] for r in (LONG, SHORT)]
    batcher = Batcher(model, processor, NO_STOP)
    # The short request arrives once the long one is decoding (its first text is out).
    (long, short), log = _serve(batcher, [(*LONG, False), (*SHORT, True)], processor)
    assert [long, short] == alone
    assert batcher.joined == 1 and batcher.batches == 1, (batcher.joined, batcher.batches)
    done = [name for name, kind in log if kind == "done"]
    assert done == ["1", "0"], log  # the short one finished while the long one still ran
    assert any(name == "0" for name, _ in log[: log.index(("1", "done"))])


def test_h4_static_batching_makes_the_short_request_wait(parts):
    """The switch the bench compares against: with continuous=False the short request waits for the long one."""
    model, processor = parts
    batcher = Batcher(model, processor, NO_STOP, continuous=False)
    _, log = _serve(batcher, [(*LONG, False), (*SHORT, True)], processor)
    assert [name for name, kind in log if kind == "done"] == ["0", "1"] and batcher.joined == 0


def test_h4_requests_with_other_settings_are_not_starved_by_joiners(parts):
    """A sampled request waiting behind a greedy batch: greedy requests that arrive after it do not join (the
    batch drains, the sampled one runs next), so a stream of same-settings requests cannot starve it."""
    model, processor = parts
    batcher = Batcher(model, processor, NO_STOP)
    _, log = _serve(batcher, [(*LONG, False), ("Tell me a story.", 4, True, 0.7), (*SHORT, False)], processor)
    assert batcher.joined == 0 and batcher.batches == 3, (batcher.joined, batcher.batches)
    assert [name for name, kind in log if kind == "done"] == ["0", "1", "2"], log


def test_h1_batch_work_cap_splits_a_prefill_of_many_long_prompts(parts, monkeypatch):
    """Four prompts that arrive together: with max_batch_tokens below 4 x their padded length, the first
    prefill takes only as many rows as fit; the others join later prefills. Answers stay those of one batch."""
    model, processor = parts
    prefills = []
    join = generation.RunningBatch.join

    def counting_join(self, input_ids, *args, **kwargs):
        prefills.append(np.asarray(input_ids).shape)
        return join(self, input_ids, *args, **kwargs)

    requests = [(f"Question number {i}: what is {i} plus {i}?", 6, False) for i in range(4)]
    together, _ = _serve(Batcher(model, processor, NO_STOP, batch_wait=0.3), requests, processor)
    monkeypatch.setattr(generation.RunningBatch, "join", counting_join)
    width = _job_width(processor, requests)
    capped, _ = _serve(Batcher(model, processor, NO_STOP, batch_wait=0.3, max_batch_tokens=2 * width),
                       requests, processor)
    assert capped == together
    assert all(rows * cols <= 2 * width for rows, cols in prefills) and sum(r for r, _ in prefills) == 4, prefills
    assert len(prefills) >= 2, prefills


def _job_width(processor, requests) -> int:
    return max(_inputs(processor, text)["input_ids"].shape[1] for text, _, _ in requests)
