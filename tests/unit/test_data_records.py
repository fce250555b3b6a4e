"""Meta/annotation parsing: both record forms, JSON/JSONL, repeat_time, root, and clear errors (no tokenizer)."""
import json
import os

import numpy as np
import pytest

from autoparallel.data.records import DataError, RecordStore, SkipLog, load_meta, parse_record, repeat_indices


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


MESSAGES = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>What is it?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And <image> this?"},
        {"role": "assistant", "content": "A dog."},
    ],
    "images": ["a.png", "/abs/b.png"],
}
CONVERSATIONS = {
    "conversations": [
        {"from": "human", "value": "<video>Describe."},
        {"from": "gpt", "value": "Rain."},
    ],
    "video": "v.mp4",
}


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_both_record_forms_round_trip(tmp_path, ext):
    records = [MESSAGES, CONVERSATIONS, {"messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Hello"}]}]
    ann = write_json(tmp_path / "a.json", records) if ext == "json" else write_jsonl(tmp_path / "a.jsonl", records)
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": ann, "repeat_time": 1, "root": str(tmp_path)}})
    store = RecordStore(meta, seed=0)
    assert len(store) == 3
    first, second, third = (store.conversation(i) for i in range(3))
    assert first.system == "Be brief." and first.turns == (("<image>What is it?", "A cat."),
                                                           ("And <image> this?", "A dog."))
    assert first.images == (os.path.join(str(tmp_path), "a.png"), "/abs/b.png")  # root joined, absolute kept
    assert second.system is None and second.turns == (("<video>Describe.", "Rain."),)
    assert second.videos == (os.path.join(str(tmp_path), "v.mp4"),) and second.images == ()
    assert third.turns == (("Hi", "Hello"),) and (first.file, first.index, third.index) == (ann, 0, 2)


def test_without_root_media_paths_are_taken_as_given(tmp_path):
    ann = write_json(tmp_path / "a.json", [MESSAGES])
    meta = write_json(tmp_path / "meta.json", {"d": {"file_name": "a.json"}})  # relative to the meta file
    assert RecordStore(meta, seed=0).conversation(0).images == ("a.png", "/abs/b.png")
    assert load_meta(meta)[0].annotation == ann


@pytest.mark.parametrize("repeat_time,expected", [(0.5, 5), (2, 20), (1.5, 15), (0, 0), (0.05, 0)])
def test_repeat_time_counts_are_deterministic(repeat_time, expected):
    a = repeat_indices(10, repeat_time, seed=3, name="d")
    assert len(a) == expected and np.array_equal(a, repeat_indices(10, repeat_time, seed=3, name="d"))
    assert np.bincount(a, minlength=10).max(initial=0) <= int(np.ceil(repeat_time))
    if repeat_time == 2:
        assert (np.bincount(a) == 2).all()
    if repeat_time == 0.5:  # a different seed picks a different subset (overwhelmingly likely for C(10,5))
        assert len(set(a) ^ set(repeat_indices(10, 0.5, seed=4, name="d"))) > 0


def test_repeat_time_in_meta(tmp_path):
    ann = write_json(tmp_path / "a.json", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                        {"role": "assistant", "content": "a"}]} for i in range(8)])
    meta = write_json(tmp_path / "meta.json", {"x": {"annotation": ann, "repeat_time": 0.5},
                                               "y": {"annotation": ann, "repeat_time": 2}})
    store = RecordStore(meta, seed=1)
    assert len(store) == 4 + 16
    users = [store.conversation(i).turns[0][0] for i in range(len(store))]
    assert users == [RecordStore(meta, seed=1).conversation(i).turns[0][0] for i in range(len(store))]


BAD_RECORDS = [
    ({"messages": []}, "empty or not a list", "malformed record"),
    ({"foo": 1}, 'neither "messages" nor "conversations"', "malformed record"),
    ("just a string", "must be an object", "malformed record"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "'role' must be one of", "malformed record"),
    ({"messages": [{"role": "user", "content": "q"}]}, "must alternate", "malformed record"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "empty answer in turn 0", "empty answer"),
    ({"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}],
      "images": ["x.png"]}, "2 <image> placeholders but 1 images", "placeholder mismatch"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "videos": ["x.mp4"]}, "0 <video> placeholders but 1 videos", "placeholder mismatch"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"}],
      "images": ["x.png"]}, "placeholder in the answer", "placeholder mismatch"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "'value' must be a string", "malformed record"),
]


@pytest.mark.parametrize("record,reason,kind", BAD_RECORDS)
def test_bad_record_errors_name_file_index_reason(tmp_path, record, reason, kind):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ann = write_json(tmp_path / "a.json", [good, record])
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": ann}})
    with pytest.raises(DataError) as info:
        RecordStore(meta, seed=0)
    assert str(info.value).startswith(f"{ann}, record 1: ") and reason in str(info.value)
    assert info.value.kind == kind
    skips = SkipLog()
    store = RecordStore(meta, seed=0, skip_bad=True, skips=skips)
    assert len(store) == 1 and skips.counts[kind] == 1 and skips.report()["total"] == 1


def test_bad_jsonl_line_is_an_error_or_a_counted_skip(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ann = write_jsonl(tmp_path / "a.jsonl", [good, "{not json", good])
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": ann}})
    with pytest.raises(DataError, match=r"a\.jsonl, record 1: invalid JSON on line 2"):
        RecordStore(meta, seed=0)
    store = RecordStore(meta, seed=0, skip_bad=True)
    assert len(store) == 2 and store.skips.counts["invalid JSON"] == 1


def test_meta_and_annotation_file_errors(tmp_path):
    with pytest.raises(DataError, match="nope.json: meta_path does not exist"):
        load_meta(str(tmp_path / "nope.json"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(DataError, match="bad.json: invalid JSON"):
        load_meta(str(bad_json))
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": "missing.json"}})
    with pytest.raises(DataError, match="entry 'd'.*missing.json does not exist"):
        load_meta(meta)
    meta = write_json(tmp_path / "meta.json", {"d": {"repeat_time": 1}})
    with pytest.raises(DataError, match='needs an "annotation"'):
        load_meta(meta)
    ann = write_json(tmp_path / "a.json", [])
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": ann, "repeat_time": -1}})
    with pytest.raises(DataError, match="repeat_time must be a number >= 0"):
        load_meta(meta)
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": str(bad_json)}})
    with pytest.raises(DataError, match="bad.json: invalid JSON"):
        RecordStore(meta, seed=0)


def test_parse_record_accepts_string_media_and_conversation_roles():
    conv = parse_record({"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "<image>q"},
                                           {"from": "assistant", "value": "a"}], "image": "p.png"}, "f", 0, "/r")
    assert conv.system == "S" and conv.images == ("/r/p.png",)
