"""`qwen2vl-ap serve` under load: requests/s and p50/p95 latency for 1, 4 and 16 concurrent clients.

The tiny model (real tokenizer and vocabulary, random weights) served on 127.0.0.1; each client sends
chat-completion requests back to back (one 56x56 synthetic image + a question, greedy, 16 new tokens, no
early stop: distinct images per request). The alternative is the same server with batching off
(`--max_batch_size 1`), i.e. requests answered one at a time; both servers run side by side and the client
levels alternate between them. Latency is per request, from sending to the full JSON answer.

Short behind long (issue 27, H4): a short request (8 new tokens) sent once a long one (LONG_TOKENS new
tokens) is streaming; its latency with continuous batching (it joins the running batch) against the same
server with `--static_batching` (it waits for the long request to finish).
"""
import common  # noqa: I001  (first: pins BLAS threads before numpy/paddle load)

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "helpers"))
from tiny_model import save_tiny_model  # noqa: E402

from autoparallel.data.synthetic import eval_questions, make_synthetic_dataset  # noqa: E402

BENCH = "serve"
BENCH_TIMEOUT = 600
CLIENTS = (1, 4, 16)
REQUESTS_PER_CLIENT = 3
NEW_TOKENS = 16
LONG_TOKENS = 400
SHORT_TOKENS = 8
ROUNDS = 3
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "serve", "--model", str(model), "--port",
                                 str(port), "--max_tokens", str(NEW_TOKENS), *extra], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def load(url: str, clients: int, questions: list[dict]) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) for `clients` clients sending REQUESTS_PER_CLIENT requests each."""
    def client(c: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=300) as http:
            for r in range(REQUESTS_PER_CLIENT):
                q = questions[(c * REQUESTS_PER_CLIENT + r) % len(questions)]
                content = [{"type": "image_url", "image_url": {"url": p}} for p in q["images"]]
                content.append({"type": "text", "text": q["question"].replace("<image>", "")})
                start = time.perf_counter()
                response = http.post(f"{url}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": content}], "temperature": 0,
                    "max_tokens": NEW_TOKENS})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [t for ts in pool.map(client, range(clients)) for t in ts]
    return time.perf_counter() - start, latencies


def _chat_seconds(url: str, text: str, max_tokens: int) -> float:
    """Seconds until the whole answer of one greedy request is in."""
    start = time.perf_counter()
    with httpx.Client(timeout=600) as http:
        http.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens,
        }).raise_for_status()
    return time.perf_counter() - start


def short_behind_long(url: str) -> tuple[float, float, int]:
    """(median short-request latency, median long-request latency, the long one's completion tokens) over
    ROUNDS; the short request is sent once the long one has streamed its first chunk."""
    short, long, tokens = [], [], 0
    with httpx.Client(timeout=600) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        for _ in range(ROUNDS):
            start = time.perf_counter()
            with http.stream("POST", f"{url}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Count from one to one thousand."}],
                    "temperature": 0, "max_tokens": LONG_TOKENS, "stream": True,
                    "stream_options": {"include_usage": True}}) as stream:
                lines = (line for line in stream.iter_lines() if line.startswith("data: {"))
                next(lines)  # the long request is decoding
                answer = pool.submit(_chat_seconds, url, "Hi!", SHORT_TOKENS)
                for line in lines:
                    usage = json.loads(line[len("data: "):]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
            long.append(time.perf_counter() - start)
            short.append(answer.result())
    return float(np.median(short)), float(np.median(long)), tokens


def main() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tiny_model(root / "tiny")
        make_synthetic_dataset(str(root / "data"), n_train=1, n_eval=48)
        questions = eval_questions(str(root / "data"))
        servers = {"batched": start_server(root / "tiny", root / "batched.log", "--max_batch_size", "16"),
                   "one_at_a_time": start_server(root / "tiny", root / "single.log", "--max_batch_size", "1")}
        static = start_server(root / "tiny", root / "static.log", "--max_batch_size", "16", "--static_batching")
        try:
            for url in (u for _, u in [*servers.values(), static]):  # warm-up
                load(url, 1, questions[:2])
            results = {}
            for clients in CLIENTS:
                order = list(servers) if clients % 2 else list(reversed(servers))
                for name in order:
                    results[(name, clients)] = load(servers[name][1], clients, questions)
            behind = {"continuous": short_behind_long(servers["batched"][1]), "static": short_behind_long(static[1])}
        finally:
            for proc, _ in [*servers.values(), static]:
                proc.terminate()
                proc.wait(60)
    load_average = os.getloadavg()[0]
    emit_short_behind_long(behind, load_average)
    for clients in CLIENTS:
        (wall, lat), (wall1, lat1) = results[("batched", clients)], results[("one_at_a_time", clients)]
        n = clients * REQUESTS_PER_CLIENT
        rps, rps1 = n / wall, n / wall1
        p50, p95 = (float(np.percentile(lat, q)) for q in (50, 95))
        p50_1, p95_1 = (float(np.percentile(lat1, q)) for q in (50, 95))
        print(f"[serve] {clients} clients: {rps:.2f} req/s p50 {p50:.3f}s p95 {p95:.3f}s | batching off "
              f"{rps1:.2f} req/s p50 {p50_1:.3f}s p95 {p95_1:.3f}s")
        extra = dict(requests=n, new_tokens=NEW_TOKENS, latencies=lat, latencies_unbatched=lat1)
        alt = "same server, --max_batch_size 1 (no batching)"
        common.emit(common.Record(BENCH, f"requests/s, {clients} concurrent clients (tiny model, 1 image, "
                                         f"{NEW_TOKENS} new tokens)", "requests/s", rps, rps1, alt, extra=extra,
                                  note=f"{clients} clients: batching gives {rps / rps1:.2f}x the requests/s of "
                                       f"one-at-a-time; machine load average {load_average:.1f} on "
                                       f"{os.cpu_count()} cores at the end (shared with other jobs)"))
        common.emit(common.Record(BENCH, f"p50 latency, {clients} concurrent clients", "s", p50, p50_1, alt,
                                  better="lower"))
        common.emit(common.Record(BENCH, f"p95 latency, {clients} concurrent clients", "s", p95, p95_1, alt,
                                  better="lower"))


def emit_short_behind_long(behind: dict[str, tuple[float, float, int]], load_average: float) -> None:
    (short, long, tokens), (short_static, long_static, _) = behind["continuous"], behind["static"]
    print(f"[serve] short request behind a long one: {short:.2f}s (long {long:.2f}s) | static batching "
          f"{short_static:.2f}s (long {long_static:.2f}s)")
    common.emit(common.Record(
        BENCH, f"short request latency ({SHORT_TOKENS} new tokens) sent while a {tokens}-token request decodes, "
               "continuous vs static batching", "s", short, short_static, "same server, --static_batching",
        better="lower", extra=dict(long_seconds=long, long_seconds_static=long_static, rounds=ROUNDS),
        note=f"short behind long: {short:.2f}s joining the running batch vs {short_static:.2f}s waiting for the "
             f"long request (which took {long:.1f}s vs {long_static:.1f}s); median of {ROUNDS}; machine load "
             f"average {load_average:.1f} on {os.cpu_count()} cores"))


if __name__ == "__main__":
    main()
