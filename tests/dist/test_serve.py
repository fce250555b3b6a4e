"""`qwen2vl-ap serve` through the official `openai` client against a server this module starts on 127.0.0.1:
images (path, file://, data:), videos (frame list, frame directory), streaming, greedy answers equal to
`qwen2vl-ap infer`, 8 concurrent requests batched with unchanged answers, one bad request per limit, a client
that disconnects mid-stream, SIGTERM draining, and tensor parallel (2 ranks) answering like one process."""
from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from cli_runs import REPO, STARTED_TAGS, TAG_ENV, kill_tagged
from dist_utils import console_kernels
from PIL import Image
from tiny_model import save_tiny_model

from autoparallel.data.synthetic import eval_questions, make_synthetic_dataset
from launch.infer import infer_main
from launch.launcher import SIMULATE_GPU_ENV
from network.processor import Qwen2VLProcessor

MAX_TOKENS = 8
MAX_IMAGE_PIXELS = 200 * 200
MAX_MODEL_LEN = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qwen2vl-ap serve` in a subprocess; its output goes to `log`."""

    def __init__(self, model: Path, log: Path, *extra: str, env: dict[str, str] | None = None):
        self.port, self.log, self.tag = _free_port(), log, uuid.uuid4().hex
        STARTED_TAGS.append(self.tag)
        argv = [sys.executable, "-m", "launch.cli", "serve", "--model", str(model), "--port", str(self.port), *extra]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {}), TAG_ENV: self.tag},
                                         stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while not self.healthy():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.logs()
            time.sleep(0.3)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def logs(self) -> str:
        logs = self.log.read_text(errors="replace")[-4000:]
        for path in sorted(self.log.parent.glob("tp_logs/workerlog.*")):
            logs += f"\n--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
        return logs

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        kill_tagged(self.tag)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny_model(root / "tiny")
    make_synthetic_dataset(str(root / "data"), n_train=1, n_eval=8)
    questions = eval_questions(str(root / "data"))
    frames = root / "frames"
    frames.mkdir()
    for i, c in enumerate([(220, 40, 40), (40, 170, 60), (40, 70, 220), (235, 205, 30)]):
        Image.new("RGB", (56, 56), c).save(frames / f"{i:03d}.png")
    Image.new("RGB", (300, 300), (10, 20, 30)).save(root / "big.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return root, questions


@pytest.fixture(scope="module")
def server(setup):
    root, _ = setup
    srv = Server(root / "tiny", root / "serve.log", "--max_tokens", str(MAX_TOKENS), "--max_images", "2",
                 "--max_image_pixels", str(MAX_IMAGE_PIXELS), "--max_body_mb", "0.25",
                 "--max_model_len", str(MAX_MODEL_LEN), "--batch_wait_ms", "50", "--media_dir", str(root))
    yield srv
    srv.close()


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _ask(srv: Server, content: list[dict], **kwargs):
    return srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              temperature=0, max_tokens=MAX_TOKENS, **kwargs)


def _infer(capsys, model: Path, prompt: str, *media: str) -> str:
    code = infer_main(["--model", str(model), "--prompt", prompt, "--max_new_tokens", str(MAX_TOKENS), "--no-stream",
                       *media])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.removesuffix("\n")


def test_one_image_equals_infer_with_usage(setup, server, capsys):
    root, questions = setup
    q = questions[1]  # one image (questions[0] has two)
    prompt = q["question"].replace("<image>", "")
    out = _ask(server, [_image_part(q["images"][0]), {"type": "text", "text": prompt}])
    expected = _infer(capsys, root / "tiny", prompt, "--image", q["images"][0])
    answer = out.choices[0].message.content
    assert answer == expected and answer.strip()
    processor = Qwen2VLProcessor.from_pretrained(str(root / "tiny"))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True)
    prompt_tokens = processor(text, images=q["images"])["input_ids"].shape[1]
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == MAX_TOKENS and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == prompt_tokens + MAX_TOKENS
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    print(f"[serve] one image == infer: {answer!r}, usage {out.usage.prompt_tokens}+{out.usage.completion_tokens}")


def test_two_images_data_url_and_file_url_equal_infer(setup, server, capsys):
    root, questions = setup
    q = questions[0]
    (a, b), prompt = q["images"], q["question"].replace("<image>", "")
    out = _ask(server, [_image_part(_data_url(a)), _image_part(f"file://{b}"), {"type": "text", "text": prompt}])
    expected = _infer(capsys, root / "tiny", prompt, "--image", a, "--image", b)
    assert out.choices[0].message.content == expected
    print(f"[serve] two images (data: + file://) == infer: {expected!r}")


def test_video_as_frame_list_and_directory_equals_infer(setup, server, capsys):
    root, _ = setup
    frames = sorted(str(p) for p in (root / "frames").iterdir())
    as_list = _ask(server, [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}])
    as_dir = _ask(server, [{"type": "video_url", "video_url": {"url": str(root / "frames")}},
                           {"type": "text", "text": "What happens?"}])
    expected = _infer(capsys, root / "tiny", "What happens?", "--video", str(root / "frames"))
    assert as_list.choices[0].message.content == as_dir.choices[0].message.content == expected
    print(f"[serve] video (frame list, frame directory) == infer: {expected!r}")


def test_streaming_equals_the_whole_answer(setup, server):
    _, questions = setup
    q = questions[3]
    content = [_image_part(q["images"][0]), {"type": "text", "text": "Describe it."}]
    whole = _ask(server, content).choices[0].message.content
    chunks = list(_ask(server, content, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole and len([d for d in deltas if d]) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    print(f"[serve] stream: {len(deltas)} chunks, joined == non-streamed answer")


def test_stop_strings_cut_the_answer(setup, server):
    _, questions = setup
    content = [_image_part(questions[4]["images"][0]), {"type": "text", "text": "What colour is it?"}]
    whole = _ask(server, content).choices[0].message.content
    stop = whole.strip()[len(whole.strip()) // 2:][:3]
    cut = _ask(server, content, stop=[stop])
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(server, content, stop=stop, stream=True)
                       if c.choices)
    assert cut.choices[0].message.content == whole[: whole.index(stop)] == streamed
    assert cut.choices[0].finish_reason == "stop"


def test_eight_concurrent_requests_are_batched_and_answered_as_alone(setup, server):
    _, questions = setup
    contents = [[_image_part(p) for p in q["images"]] + [{"type": "text", "text": q["question"].replace("<image>", "")}]
                for q in questions[:8]]
    alone = [_ask(server, c).choices[0].message.content for c in contents]
    batches = server.health()["batches"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda c: _ask(server, c).choices[0].message.content, contents))
    ran = server.health()["batches"] - batches
    assert together == alone
    assert ran < 8, f"8 concurrent requests ran in {ran} batches: not batched"
    print(f"[serve] 8 concurrent requests in {ran} batch(es), every answer == the request alone")


@pytest.mark.parametrize("case, status, param", [
    ("body_too_large", 413, "body"),
    ("too_many_images", 400, "messages[0].content[2]"),
    ("image_too_many_pixels", 400, "messages[0].content[0].image_url"),
    ("malformed_image", 400, "messages[0].content[0].image_url"),
    ("bad_base64", 400, "messages[0].content[0].image_url"),
    ("missing_file", 400, "messages[0].content[0].image_url"),
    ("remote_url_refused", 400, "messages[0].content[0].image_url"),
    ("prompt_longer_than_context", 400, "messages"),
    ("max_tokens_over_context", 400, "max_tokens"),
    ("n_above_one", 400, "n"),
    ("bad_temperature", 400, "temperature"),
    ("bad_role", 400, "messages[0].role"),
    ("unknown_model", 404, "model"),
])
def test_bad_requests_get_an_error_naming_the_field(setup, server, case, status, param):
    root, questions = setup
    img = questions[1]["images"][0]
    text = {"type": "text", "text": "hi"}
    request = {
        "body_too_large": dict(messages=[{"role": "user", "content": "x" * 300_000}]),
        "too_many_images": dict(messages=[{"role": "user", "content": [_image_part(img)] * 3 + [text]}]),
        "image_too_many_pixels": dict(messages=[{"role": "user", "content": [_image_part(str(root / "big.png"))]}]),
        "malformed_image": dict(messages=[{"role": "user", "content": [_image_part(str(root / "broken.png"))]}]),
        "bad_base64": dict(messages=[{"role": "user", "content": [_image_part("data:image/png;base64,@@@")]}]),
        "missing_file": dict(messages=[{"role": "user", "content": [_image_part(str(root / "nope.png"))]}]),
        "remote_url_refused": dict(messages=[{"role": "user", "content": [_image_part("https://example.com/a.png")]}]),
        "prompt_longer_than_context": dict(messages=[{"role": "user", "content": "word " * MAX_MODEL_LEN}]),
        "max_tokens_over_context": dict(messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_MODEL_LEN),
        "n_above_one": dict(messages=[{"role": "user", "content": "hi"}], n=2),
        "bad_temperature": dict(messages=[{"role": "user", "content": "hi"}], temperature=-1),
        "bad_role": dict(messages=[{"role": "robot", "content": "hi"}]),
        "unknown_model": dict(messages=[{"role": "user", "content": "hi"}], model="gpt-4o"),
    }[case]
    request.setdefault("model", "tiny")
    with pytest.raises(openai.APIStatusError) as info:
        server.client.chat.completions.create(**request)
    error = info.value.body
    assert info.value.status_code == status, error
    assert error["param"] == param and error["message"], error
    assert server.healthy()


def test_client_disconnect_mid_stream_frees_its_slot(setup, server):
    before = server.health()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": MAX_MODEL_LEN - 40, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
    assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 30
    while (server.health()["running"] or server.health()["cancelled"] == before["cancelled"]) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    after = server.health()
    assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1, after
    assert _ask(server, [{"type": "text", "text": "Still there?"}]).choices[0].message.content


def test_tensor_parallel_server_answers_like_one_process(setup, server):
    root, questions = setup
    q = questions[5]
    content = [_image_part(q["images"][0]), {"type": "text", "text": "What colour is it?"}]
    tp = Server(root / "tiny", root / "serve_tp.log", "--tensor_parallel_degree", "2", "--log_dir",
                str(root / "tp_logs"), "--max_tokens", str(MAX_TOKENS), "--media_dir", str(root))
    try:
        answers = [tp.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}], temperature=0).choices[0].message.content
            for _ in range(2)]
        streamed = "".join(c.choices[0].delta.content or "" for c in tp.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}], temperature=0, stream=True) if c.choices)
        single = _ask(server, content).choices[0].message.content
        assert answers == [single, single] and streamed == single, tp.logs()
        tp.proc.send_signal(signal.SIGTERM)
        assert tp.proc.wait(60) == 0, tp.logs()
    finally:
        tp.close()
    print(f"[serve] mp2 server == single-process server: {single!r}")


def test_simulated_gpu_tensor_parallel_server_answers_like_the_plain_server(setup, server):
    """`serve --dtype bfloat16` over two ranks on the simulated GPU (network/simulated_gpu.py): a request alone
    (unpadded decode, N1's flash branch) and concurrent requests of different lengths (left-padded SDPA) answer
    as the plain single-process server; the closing console line counts the kernels."""
    _, questions = setup
    contents = [[_image_part(q["images"][0]), {"type": "text", "text": text}]
                for q, text in ((questions[5], "What colour is it?"), (questions[1], "Describe the picture in detail."))]
    contents.append([{"type": "text", "text": "Say hello."}])
    plain = [_ask(server, c).choices[0].message.content for c in contents]
    root = setup[0]
    tp = Server(root / "tiny", root / "serve_sim.log", "--tensor_parallel_degree", "2", "--log_dir",
                str(root / "tp_logs_sim"), "--max_tokens", str(MAX_TOKENS), "--dtype", "bfloat16",
                "--batch_wait_ms", "200", "--media_dir", str(root), env={SIMULATE_GPU_ENV: "1"})
    try:
        alone = _ask(tp, contents[0]).choices[0].message.content
        batches = tp.health()["batches"]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda c: _ask(tp, c).choices[0].message.content, contents))
        assert tp.health()["batches"] - batches < 3, "not batched"
        assert [alone] + together == plain[:1] + plain, tp.logs()
        tp.proc.send_signal(signal.SIGTERM)
        assert tp.proc.wait(60) == 0, tp.logs()
    finally:
        tp.close()
    kernels = console_kernels(tp.log.read_text())
    assert min(kernels[k] for k in ("flash_attention", "scaled_dot_product_attention", "flash_attn_unpadded")) > 0


def test_sigterm_drains_in_flight_requests_then_exits(server):
    """Last in the module: it stops the module's server."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 300,
            "temperature": 0, "stream": True}) as response:
        lines = response.iter_lines()
        first = next(lines)
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
    assert any('"finish_reason": "length"' in line for line in rest)
    assert server.proc.wait(60) == 0, server.logs()
    assert not server.healthy()
    assert "server stopped (SIGTERM)" in server.log.read_text()
