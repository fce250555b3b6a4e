"""`qwen2vl-ap serve` under abuse (issue #27, security review 2): one server on 127.0.0.1 with an API key, a small
media pool and short deadlines, driven through raw HTTP. After every abuse the server must still answer `/health`
and a fixed greedy reference request with the same text as before."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import pytest
from PIL import Image
from test_serve import Server
from tiny_model import save_tiny_model

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS_LIMIT = 1500
MEDIA_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 24
REFERENCE = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
             "temperature": 0}


class AbuseServer(Server):
    def chat(self, body, headers=None, timeout: float = 60) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})},
                          timeout=timeout)

    def still_serving(self, reference: str) -> None:
        """After an abuse: /health answers and the reference request gets the same greedy text."""
        assert self.health()["status"] == "ok"
        response = self.chat(REFERENCE)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == reference


@pytest.fixture(scope="module")
def abuse(tmp_path_factory):
    """No --max_model_len: the CPU default applies. One media thread and one queue place."""
    root = tmp_path_factory.mktemp("serve_abuse")
    save_tiny_model(root / "tiny")
    (root / "media").mkdir()
    srv = AbuseServer(root / "tiny", root / "serve.log", "--api_key", KEY, "--media_dir", str(root / "media"),
                      "--media_workers", "1", "--media_queue", "1", "--media_timeout", str(MEDIA_TIMEOUT),
                      "--max_tokens_limit", str(MAX_TOKENS_LIMIT), "--body_timeout", str(BODY_TIMEOUT),
                      "--max_connections", str(MAX_CONNECTIONS), "--batch_wait_ms", "20")
    reference = srv.chat(REFERENCE).json()["choices"][0]["message"]["content"]
    assert reference
    yield srv, reference, root
    srv.close()


def _raw(srv: Server, head: str, body: bytes = b"") -> socket.socket:
    """A connection that sent `head` (request line + headers, no blank line) and the start of a body."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode() + body)
    return sock


def _response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """Status and body of the one response on `sock` (Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def _post_head(length: int) -> str:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}")


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("stream", [False, True])
def test_h4_disconnected_client_is_cancelled_on_a_clock(abuse, stream):
    """H4: a client that hangs up while its tokens flow has its row cancelled within a second or two (on main a
    non-streaming row ran to its end: `cancelled` did not rise)."""
    srv, reference, _ = abuse
    before = srv.health()["cancelled"]
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Tell a long story."}],
                       "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, "stream": stream}).encode()
    sock = _raw(srv, _post_head(len(body)), body)
    assert _wait(lambda: srv.health()["running"] == 1, 30), srv.logs()
    time.sleep(0.5)  # tokens are flowing
    sock.close()
    closed = time.monotonic()
    assert _wait(lambda: srv.health()["cancelled"] == before + 1 and srv.health()["running"] == 0, 5), \
        (srv.health(), srv.logs())
    print(f"[serve-abuse] stream={stream}: row cancelled {time.monotonic() - closed:.2f}s after the client left")
    srv.still_serving(reference)


def test_h4_max_tokens_limit_and_l1_l4_h2_strict_schema(abuse):
    """H4 server-side max_tokens cap; L1 seed range; L4 strict types, `content: null`, unsupported parameters and
    the dotted name of `stream_options.include_usage`; H2 stop-string length: each a 400 naming the field."""
    srv, reference, _ = abuse
    say = [{"role": "user", "content": "hi"}]
    cases = [
        ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
        ({"max_completion_tokens": MAX_TOKENS_LIMIT + 1}, "max_completion_tokens"),
        ({"seed": -5}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream": True, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"best_of": 3}, "best_of"),
    ]
    for change, param in cases:
        response = srv.chat({"model": "tiny", "messages": say, "max_tokens": 2, **change})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and param in error["message"], \
            (change, response.text)
    # the edges that must still work: no-op values of unsupported parameters, the largest seed
    response = srv.chat({**REFERENCE, "seed": 2**64 - 1, "frequency_penalty": 0, "presence_penalty": 0.0,
                         "stop": ["x" * 256], "user": "u1"})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == reference
    srv.still_serving(reference)


def test_cpu_default_max_model_len_refuses_long_prompts_before_generation(abuse):
    """H1 (serving half): without --max_model_len a CPU server's context is 8192, not the checkpoint's 32768, and a
    longer prompt gets a 400 at once instead of an O(S^2)-memory prefill."""
    srv, reference, _ = abuse
    models = httpx.get(f"{srv.url}/v1/models", headers=AUTH, timeout=10).json()
    assert models["data"][0]["max_model_len"] == 8192
    batches = srv.health()["batches"]
    start = time.monotonic()
    response = srv.chat({"model": "tiny", "messages": [{"role": "user", "content": "word " * 9000}],
                         "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text
    assert "8192" in response.json()["error"]["message"]
    assert srv.health()["batches"] == batches and time.monotonic() - start < 20
    srv.still_serving(reference)


def test_h5_blocked_media_reads_do_not_delay_text_requests(abuse):
    """H5: six requests whose media take long to prepare (six 4096x4096 images each, seconds of decoding and
    resizing) take the one media thread and the one queue place (the other four get 503 at once), time out with
    504 after --media_timeout, and a text-only request meanwhile is answered identically while the media thread is
    still busy; /health reports them as preparing. On main the media work ran in the default pool and the text
    request waited behind it. (A FIFO no longer blocks: non-regular files are refused at open.)"""
    srv, reference, root = abuse
    Image.new("RGB", (4096, 4096)).save(root / "media" / "large.png")
    slow = {**REFERENCE, "messages": [{"role": "user", "content": [
        *[{"type": "image_url", "image_url": {"url": "large.png"}}] * 6, {"type": "text", "text": "What is it?"}]}]}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        try:
            futures = [pool.submit(srv.chat, slow, None, 60) for _ in range(6)]
            assert _wait(lambda: sum(f.done() for f in futures) >= 4, 10), srv.health()
            health = srv.health()
            assert health["preparing"] == 2 and health["media_busy"] == 2, health
            text = srv.chat(REFERENCE, timeout=30)
            busy_after_text = srv.health()["media_busy"]
            assert text.status_code == 200 and text.json()["choices"][0]["message"]["content"] == reference
            responses = [f.result() for f in futures]
        finally:
            # the media thread finishes its decoding after the deadline; wait for it (bounded)
            _wait(lambda: not srv.health()["media_busy"], 120)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [503, 503, 503, 503, 504, 504], [r.text for r in responses]
    for r in responses:
        error = r.json()["error"]
        assert error["message"] and error["type"] in ("server_busy", "timeout_error"), error
    assert busy_after_text >= 1, "the text-only request was answered only after the media work ended"
    assert srv.health()["media_busy"] == 0 and srv.health()["preparing"] == 0
    srv.still_serving(reference)


def test_m3_key_host_content_type_and_docs(abuse):
    """M3: API key (none / wrong -> 401), Host validation (a rebinding name -> 400), JSON content type (415),
    /docs /redoc /openapi.json off; L10: 404 and 405 have OpenAI error bodies."""
    srv, reference, _ = abuse
    url = f"{srv.url}/v1/chat/completions"
    cases = [
        (dict(json=REFERENCE), 401, "authentication_error"),
        (dict(json=REFERENCE, headers={"Authorization": "Bearer wrong"}), 401, "authentication_error"),
        (dict(json=REFERENCE, headers={**AUTH, "Host": "rebind.evil.example"}), 400, "invalid_host"),
        (dict(content=json.dumps(REFERENCE), headers={**AUTH, "Content-Type": "text/plain"}), 415,
         "invalid_request_error"),
        (dict(content=json.dumps(REFERENCE), headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}),
         415, "invalid_request_error"),
    ]
    for kwargs, status, kind in cases:
        response = httpx.post(url, timeout=10, **kwargs)
        assert response.status_code == status and response.json()["error"]["type"] == kind, (kwargs, response.text)
    for path, method, status in [("/docs", "GET", 404), ("/redoc", "GET", 404), ("/openapi.json", "GET", 404),
                                 ("/nothing", "GET", 404), ("/v1/chat/completions", "GET", 405)]:
        response = httpx.request(method, f"{srv.url}{path}", headers=AUTH, timeout=10)
        error = response.json()["error"]
        assert response.status_code == status and set(error) == {"message", "type", "param", "code"}, response.text
    assert httpx.get(f"{srv.url}/health", headers={"Host": "localhost"}, timeout=10).status_code == 200
    srv.still_serving(reference)


def test_m5_stalled_upload_is_dropped_and_l5_disconnect_logs_one_line(abuse):
    """M5: an upload that stalls gets 408 after --body_timeout and its connection is closed (on main it was held
    for as long as the client wanted). L5: a client leaving mid-upload logs one quiet line, no traceback."""
    srv, reference, _ = abuse
    sock = _raw(srv, _post_head(1 << 20), b'{"messages": "' + b"x" * (200 << 10))
    start = time.monotonic()
    status, body = _response(sock, BODY_TIMEOUT + 10)
    waited = time.monotonic() - start
    assert status == 408 and json.loads(body)["error"]["param"] == "body", body
    assert waited < BODY_TIMEOUT + 5
    sock.settimeout(5)
    assert sock.recv(1) == b"", "the server kept the stalled connection open"
    sock.close()
    for _ in range(3):
        sock = _raw(srv, _post_head(100_000), b'{"messages": "' + b"x" * 1000)
        time.sleep(0.3)
        sock.close()
    assert _wait(lambda: srv.log.read_text().count("closed the connection during its upload") == 3, 10), srv.logs()
    log = srv.log.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]
    srv.still_serving(reference)


def test_m5_connections_beyond_max_connections_are_refused(abuse):
    """M5: --max_connections reaches uvicorn: with that many idle connections open, a new request gets 503 (uvicorn
    answers it itself, in plain text, before the app runs); once they close the server answers as before."""
    srv, reference, _ = abuse
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)
        assert srv.chat(REFERENCE, timeout=10).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    assert _wait(lambda: srv.healthy(), 10)
    srv.still_serving(reference)
