"""Request-side rules of `qwen2vl-ap serve` that need no running server (issue #27; the server-level checks are in
tests/dist/test_serve_abuse.py)."""
from __future__ import annotations

import pytest

from launch.serve import startup_warnings
from launch.serving.app import ServerSettings, _max_tokens
from launch.serving.messages import ChatRequest, MediaLimits, _dotted


def _settings(**kwargs) -> ServerSettings:
    return ServerSettings(model_name="m", max_model_len=600, limits=MediaLimits(), **kwargs)


@pytest.mark.parametrize("limit, default, prompt, expected", [
    (50, None, 100, 50),     # H4: no max_tokens -> the server's limit ...
    (1000, None, 100, 500),  # ... or the room left in the context, whichever is smaller
    (1000, 20, 100, 20),     # --max_tokens sets the default below both
    (10, 20, 100, 10),       # and never above the limit
])
def test_h4_default_max_tokens_is_bounded_by_the_limit_and_the_context(limit, default, prompt, expected):
    request = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert _max_tokens(request, prompt, _settings(max_tokens_limit=limit, default_max_tokens=default)) == expected


def test_l4_dotted_keeps_field_names_and_drops_only_union_branch_labels():
    assert _dotted(("stream_options", "include_usage")) == "stream_options.include_usage"  # was "include_usage"
    assert _dotted(("stop", "list[str]", 0)) == "stop[0]"
    assert _dotted(("messages", 0, "content", "list[ContentPart]", 1, "image_url", "MediaURL", "url")) == \
        "messages[0].content[1].image_url.url"
    assert _dotted(("messages", 0, "content", "str")) == "messages[0].content"


@pytest.mark.parametrize("host, key, allowed, expected", [
    ("0.0.0.0", None, [], ["no --api_key", "--allowed_hosts"]), ("192.168.1.5", None, [], ["no --api_key"]),
    ("myhost.example", None, [], ["no --api_key"]), ("::", "k", [], ["--allowed_hosts"]),
    ("0.0.0.0", "k", ["myhost"], []), ("127.0.0.1", None, [], []), ("127.0.0.2", None, [], []),
    ("::1", None, [], []), ("localhost", None, [], []),
])
def test_m3_warning_when_reachable_from_other_machines_without_a_key(host, key, allowed, expected):
    warnings = startup_warnings(host, key, allowed)
    assert len(warnings) == len(expected)
    for warning, word in zip(warnings, expected):
        assert f"--host {host}" in warning and word in warning
