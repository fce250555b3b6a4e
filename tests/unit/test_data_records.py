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
    # neither a.png nor v.mp4 exists as given (working directory): root-joined; absolute paths kept
    assert first.images == (os.path.join(str(tmp_path), "a.png"), "/abs/b.png")
    assert second.system is None and second.turns == (("<video>Describe.", "Rain."),)
    assert second.videos == (os.path.join(str(tmp_path), "v.mp4"),) and second.images == ()
    assert third.turns == (("Hi", "Hello"),) and (first.file, first.index, third.index) == (ann, 0, 2)


def test_without_root_media_paths_are_taken_as_given(tmp_path):
    ann = write_json(tmp_path / "a.json", [MESSAGES])
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": "a.json"}})  # relative to the meta file
    assert RecordStore(meta, seed=0).conversation(0).images == ("a.png", "/abs/b.png")
    assert load_meta(meta)[0].annotation == ann


def test_media_path_that_exists_as_given_is_not_joined_to_root(tmp_path, monkeypatch):
    """PaddleMIX's baseline_6data_330k.json: root "playground/data/dvqa/" and annotation paths that already
    start with it (relative to the working directory); InternVL-style paths relative to root also resolve."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "playground" / "data" / "dvqa"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x")
    (root / "b.png").write_bytes(b"x")
    records = [{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                "images": [path]} for path in ("playground/data/dvqa/images/a.png", "b.png", "missing.png")]
    ann = write_json(tmp_path / "ann.json", records)
    meta = write_json(tmp_path / "meta.json", {"dvqa": {"annotation": "ann.json", "root": "playground/data/dvqa/"}})
    store = RecordStore(meta, seed=0)
    assert store.conversation(0).images == ("playground/data/dvqa/images/a.png",)  # as given, no doubled prefix
    assert store.conversation(1).images == (os.path.join(str(root), "b.png"),)  # under root
    missing = store.conversation(2)
    assert missing.images == (os.path.join(str(root), "missing.png"),) and missing.root == str(root)
    assert missing.file == ann


def test_media_without_placeholder_gets_one_prepended_to_the_first_user_message(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "What is it?"},
                      {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"},
                      {"role": "assistant", "content": "Yes."}], "images": ["a.png", "b.png"]},
        {"conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Rain."}],
         "video": "v.mp4"},
        {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
         "images": ["c.png"]},
    ]
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": write_json(tmp_path / "a.json", records)}})
    store = RecordStore(meta, seed=0)
    first, second, third = (store.conversation(i) for i in range(3))
    assert first.turns == (("<image>\n<image>\nWhat is it?", "A cat."), ("Sure?", "Yes.")) and first.system == "S"
    assert second.turns == (("<video>\nDescribe.", "Rain."),)
    assert third.turns == (("<image>q", "a"),)
    assert (first.added_placeholders, second.added_placeholders, third.added_placeholders) == (2, 1, 0)
    assert store.added_placeholders == 3  # the data report's count


@pytest.mark.parametrize("repeat_time,expected", [(0.5, 5), (2, 20), (1.5, 15), (0, 0), (0.05, 0)])
def test_repeat_time_counts_are_deterministic(repeat_time, expected):
    a = repeat_indices(10, repeat_time, seed=3, name="d")
    assert len(a) == expected and np.array_equal(a, repeat_indices(10, repeat_time, seed=3, name="d"))
    assert np.bincount(a, minlength=10).max(initial=0) <= int(np.ceil(repeat_time))
    if repeat_time == 2:
        assert (np.bincount(a) == 2).all()
    if repeat_time == 1.5:  # the fraction above 1 is a seeded sample: another seed picks another subset
        assert not np.array_equal(a, repeat_indices(10, 1.5, seed=4, name="d"))


@pytest.mark.parametrize("repeat_time", [0.5, 0.35, 0.99])
def test_repeat_time_below_one_keeps_the_first_records_as_paddlemix(repeat_time):
    # PaddleMIX: raw_data[:int(len(raw_data) * repeat_time)], whatever the seed
    for seed in (0, 1, 2):
        assert repeat_indices(10, repeat_time, seed=seed, name="d").tolist() == list(range(int(10 * repeat_time)))


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
    ({"foo": 1}, 'no known record shape: expected "messages", "conversations"', "malformed record"),
    ("just a string", "must be an object", "malformed record"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "'role' must be one of", "malformed record"),
    ({"messages": [{"role": "user", "content": "q"}]}, "must alternate", "malformed record"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "empty answer in turn 0", "empty answer"),
    ({"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}],
      "images": ["x.png"]}, "2 <image> placeholders but 1 images", "placeholder mismatch"),
    ({"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "a"}],
      "videos": ["x.mp4", "y.mp4"]}, "1 <video> placeholders but 2 videos", "placeholder mismatch"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"}],
      "images": ["x.png"]}, "placeholder in the answer", "placeholder mismatch"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "'value' must be a string or a content list", "malformed record"),
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


def _qa_annotation(tmp_path, n):
    return write_jsonl(tmp_path / "qa.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                             {"role": "assistant", "content": "a"}]}
                                               for i in range(n)])


@pytest.mark.parametrize("val_size, held", [(0.25, 3), (0.2, 2), (3, 3), (1, 1)])
def test_val_size_holds_out_a_seeded_disjoint_split(tmp_path, val_size, held):
    """LLaMA-Factory's val_size: a fraction (rounded up, as HF's train_test_split) or a count; the held-out records
    are in no training sample (even repeated ones), each is one evaluation sample, and data_seed fixes the choice."""
    ann = _qa_annotation(tmp_path, 10)
    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": ann, "repeat_time": 2}})
    store = RecordStore(meta, seed=7, val_size=val_size)
    users = lambda s: [s.conversation(i).turns[0][0] for i in range(len(s))]  # noqa: E731
    evaluated = users(store.held_out())
    assert len(evaluated) == len(set(evaluated)) == held
    assert len(store) == 2 * (10 - held) and not set(evaluated) & set(users(store))
    assert set(evaluated) | set(users(store)) == {f"q{i}" for i in range(10)}
    assert evaluated == users(RecordStore(meta, seed=7, val_size=val_size).held_out())
    others = [users(RecordStore(meta, seed=s, val_size=val_size).held_out()) for s in range(8)]
    assert any(o != evaluated for o in others)
    assert len(RecordStore(meta, seed=7)) == 20 and len(RecordStore(meta, seed=7).held_out_ids) == 0


@pytest.mark.parametrize("keys, message", [
    ({"val_size": 10}, "val_size=10 holds out 10 of the 10 valid records, leaving none to train on"),
    ({"val_size": 0.999}, "val_size=0.999 holds out 10 of the 10 valid records"),
    ({"val_size": -0.1}, "val_size=-0.1 is out of range (val_size: a fraction in [0, 1) or a whole record count)"),
    ({"val_size": 2.5}, "val_size=2.5 is out of range"),
    ({"val_size": 0.1, "split_dataset_ratio": 0.2}, "split_dataset_ratio=0.2 (test) contradicts val_size=0.1"),
])
def test_nonsense_val_size_is_one_line(tmp_path, keys, message):
    from autoparallel.config import ConfigError, RunConfig

    meta = write_json(tmp_path / "meta.json", {"d": {"annotation": _qa_annotation(tmp_path, 10)}})
    with pytest.raises((ConfigError, DataError)) as err:
        cfg = RunConfig.build("sft", [("test", {"meta_path": meta, **keys})])
        RecordStore(meta, seed=0, val_size=cfg.data.val_size)
    assert message in str(err.value) and "\n" not in str(err.value)
