"""H2 (security review 2): a row's stop-string check costs O(new text + held tail) per step, not O(L^2) in
the stop string's length (a 512 KiB stop string cost ~5 s per decode step for every client). The semantics
stay: text is cut before the first stop string, a tail that may start one is held back until it cannot."""
from __future__ import annotations

import time

from launch.serving.batcher import Job, _Row
from network.generation import GenerationConfig


class _Chars:
    """A processor whose token i decodes to the character chr(i) (no special tokens)."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _row(stop: list[str], max_tokens: int = 10**6) -> tuple[_Row, list]:
    job = Job(inputs={}, prompt_tokens=1, max_tokens=max_tokens, settings=GenerationConfig(), stop=stop, loop=None)
    events: list = []
    job.send = lambda *event: events.append(event)
    return _Row(job, _Chars(), stop_token_ids=(0,)), events


def _feed(row: _Row, text: str) -> bool:
    return any(row.step(ord(c)) for c in text)


def _sent(events) -> str:
    return "".join(e[1] for e in events if e[0] == "delta")


def test_h2_stop_string_cuts_and_held_tail_is_released():
    row, events = _row(["<END>", "xyz"])
    assert not _feed(row, "hello <EN")
    assert _sent(events) == "hello "  # "<EN" may start "<END>": held back
    assert not _feed(row, "X")
    assert _sent(events) == "hello <ENX"  # it did not: released
    assert _feed(row, " and <END> more")
    assert _sent(events) == "hello <ENX and " and events[-1] == ("done", "stop")


def test_h2_overlapping_prefix_of_a_stop_string_is_found():
    """The held tail must follow the longest stop prefix: "aab" appears inside "aaab"."""
    row, events = _row(["aab"])
    assert not _feed(row, "xaa")
    assert _sent(events) == "x"
    assert _feed(row, "ab")
    assert _sent(events) == "xa" and events[-1] == ("done", "stop")


def test_h2_no_stop_runs_to_length_with_everything_sent():
    row, events = _row(["zz"], max_tokens=5)
    assert _feed(row, "abcde")
    assert _sent(events) == "abcde" and events[-1] == ("done", "length")


def _seconds(stop: str, text: str) -> float:
    row, _ = _row([stop])
    start = time.perf_counter()
    assert not _feed(row, text)
    return time.perf_counter() - start


def test_h2_a_64_kib_stop_string_costs_about_what_a_short_one_costs_per_step():
    """Worst case for the tail: the generated text keeps matching the stop string's start, so every step
    holds a growing tail. Old code: ~65k prefix slices per step (seconds per step); now O(tail)."""
    text = "ab" * 150
    long_stop, short_stop = "ab" * 32768, "ab" * 200  # both longer than the text: held to the end
    short = min(_seconds(short_stop, text) for _ in range(3))
    long = min(_seconds(long_stop, text) for _ in range(3))
    assert long < 5 * short + 0.01, (long, short)
