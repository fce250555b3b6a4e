"""Issue 27 media findings through a real `qwen2vl-ap serve` on 127.0.0.1 (the module fixture of test_serve.py):
relative paths resolve against --media_dir (L10), frame-folder symlinks and playlists cannot leave it (M1), FIFOs
and NUL bytes get the one generic 400 (H5 side, L2, L3), loopback targets are refused with --allow_remote_media
(M2), and a prompt over the context is refused from the image header (M6). After every probe the server is healthy
and answers a reference request exactly as before."""
from __future__ import annotations

import base64
import os
import socket
import time

import httpx
import pytest
from PIL import Image
from test_serve import MAX_TOKENS, Server, _image_part, setup  # noqa: F401  (setup: the shared module fixture)

MAX_MODEL_LEN = 600
GENERIC = "messages[0].content[0].{}: the media could not be read"


@pytest.fixture(scope="module")
def media_server(setup):  # noqa: F811
    root, _ = setup
    media, outside = root / "media", root / "outside"
    media.mkdir(), outside.mkdir()
    Image.new("RGB", (56, 56), (200, 40, 40)).save(media / "ok.png")
    Image.new("RGB", (56, 56), (1, 2, 3)).save(outside / "secret.png")
    (media / "frames_bypass").mkdir()
    Image.new("RGB", (56, 56), (0, 90, 0)).save(media / "frames_bypass" / "000.png")
    os.symlink(outside / "secret.png", media / "frames_bypass" / "001.png")
    (media / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{outside}/x.ts\n"
                                     "#EXT-X-ENDLIST\n")
    os.mkfifo(media / "fifo.png")
    srv = Server(root / "tiny", root / "serve_media.log", "--media_dir", str(media), "--allow_remote_media",
                 "--max_tokens", str(MAX_TOKENS), "--max_model_len", str(MAX_MODEL_LEN), "--max_video_frames", "4")
    yield srv, media
    srv.close()


def _post(srv: Server, part: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/chat/completions", timeout=timeout, json={
        "model": "tiny", "temperature": 0, "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What colour is it?"}]}]})


def test_media_probes_are_refused_and_the_server_answers_as_before(media_server):
    srv, media = media_server
    png = base64.b64encode((media / "ok.png").read_bytes()).decode()
    reference_part = _image_part(f"data:image/png;base64,{png}")
    reference = _post(srv, reference_part).json()["choices"][0]["message"]["content"]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    big = media / "big_header.png"
    Image.new("RGB", (2000, 2000)).save(big)
    big.write_bytes(big.read_bytes()[:300])  # the header says 2000x2000, the pixels are cut off
    probes = [  # (part, status, message)
        (_image_part("ok.png"), 200, None),  # L10: relative to --media_dir
        (_image_part("/etc/passwd"), 403, "messages[0].content[0].image_url: local files outside the server's "
                                          "--media_dir are not readable"),
        ({"type": "video_url", "video_url": {"url": "frames_bypass"}}, 403,
         "messages[0].content[0].video_url[1]: local files outside the server's --media_dir are not readable"),
        ({"type": "video_url", "video_url": {"url": "list.m3u8"}}, 400, GENERIC.format("video_url")),
        (_image_part("fifo.png"), 400, GENERIC.format("image_url")),
        (_image_part("ok.png\u0000"), 400, GENERIC.format("image_url")),
        (_image_part("missing.png"), 400, GENERIC.format("image_url")),
        (_image_part(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"), 400, GENERIC.format("image_url")),
        (_image_part(f"http://localhost:{srv.port}/health"), 400, GENERIC.format("image_url")),
        (_image_part("big_header.png"), 400, None),  # M6: refused from the header, not "could not be read"
    ]
    try:
        for part, status, message in probes:
            start = time.monotonic()
            response = _post(srv, part, timeout=30)
            elapsed = time.monotonic() - start
            assert response.status_code == status, (part, response.text)
            if status == 200:
                assert response.json()["choices"][0]["message"]["content"] == reference
            elif message is not None:
                assert response.json()["error"]["message"] == message
            else:
                error = response.json()["error"]["message"]
                assert error.startswith("messages: the prompt is ") and error.endswith(f"context is {MAX_MODEL_LEN}")
            assert elapsed < 10, (part, elapsed)  # a FIFO or a silent listener must not hold the request
            assert srv.healthy()
            assert _post(srv, reference_part).json()["choices"][0]["message"]["content"] == reference
        with pytest.raises(BlockingIOError):  # M2: the loopback listener was never connected to
            listener.accept()
    finally:
        listener.close()
    print(f"[serve media] {len(probes)} probes refused or answered as expected; reference answer {reference!r}")
