"""Issue #30: other frameworks' records read as those frameworks read them (no tokenizer, no paddle model).

Fixtures follow LLaMA-Factory's data/README.md, ms-swift's Custom-dataset.md and the new-user trial's cases
(shared/notes/new-user-data-trial.md, numbered like "2e"). Each test fails on the code before #30: the shapes were
refused, or (2e, 9m) silently misread."""
import base64
import io
import json
import os

import pytest
from PIL import Image

from autoparallel.data.record_index import index_annotation
from autoparallel.data.records import DataError, RecordStore, load_meta, parse_record, resolve_sources


def write(path, obj, jsonl=False, encoding="utf-8"):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in obj) + "\n" if jsonl else json.dumps(obj)
    path.write_bytes(text.encode(encoding))
    return str(path)


def read_annotation(path):
    index = index_annotation(path)
    return [index.record(i) for i in range(len(index))]


def png_bytes(colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), colour).save(buf, format="PNG")
    return buf.getvalue()


def png(path):
    path.write_bytes(png_bytes())
    return str(path)


MLLM_DEMO = {"messages": [{"content": "<image>Who are they?", "role": "user"},
                          {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
                          {"content": "What are they doing?<image>", "role": "user"},
                          {"content": "They are celebrating on the soccer field.", "role": "assistant"}],
             "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]}
MLLM_ENTRY = {"file_name": "mllm_demo.json", "formatting": "sharegpt",
              "columns": {"messages": "messages", "images": "images"},
              "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


@pytest.fixture
def lf_dir(tmp_path):
    """A LLaMA-Factory data/ folder: the mllm_demo entry, an alpaca entry and a hub entry (trial 2a/2f)."""
    data = tmp_path / "data"
    (data / "mllm_demo_data").mkdir(parents=True)
    png(data / "mllm_demo_data" / "1.jpg")
    write(data / "mllm_demo.json", [MLLM_DEMO])
    write(data / "identity.json", [{"instruction": "hi", "input": "", "output": "Hello! I am {{name}}."}])
    write(data / "dataset_info.json", {"identity": {"file_name": "identity.json"}, "mllm_demo": MLLM_ENTRY,
                                       "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"}})
    return data


def test_lf_entries_picked_by_dataset_with_media_relative_to_dataset_dir(lf_dir, monkeypatch):
    """2a/2f: `--dataset mllm_demo,identity --dataset_dir data` from the LF root: media resolve under dataset_dir
    (not the working directory), the alpaca entry (LF's default formatting) reads instruction/output."""
    monkeypatch.chdir(lf_dir.parent)
    store = RecordStore(None, seed=0, dataset=["mllm_demo", "identity"], dataset_dir="data")
    demo, identity = store.conversation(0), store.conversation(1)
    assert demo.images == (str(lf_dir / "mllm_demo_data" / "1.jpg"),) * 2
    assert demo.turns[1] == ("What are they doing?<image>", "They are celebrating on the soccer field.")
    assert identity.turns == (("hi", "Hello! I am {{name}}."),) and identity.images == ()
    # the same entries picked out of --meta_path data/dataset_info.json
    assert [s.name for s in load_meta(str(lf_dir / "dataset_info.json"), ["mllm_demo"])] == ["mllm_demo"]


def test_lf_whole_file_names_the_hub_entry_and_unknown_picks(lf_dir, monkeypatch):
    """2f: without --dataset every entry is read, and the hub entry is refused in one line naming it."""
    with pytest.raises(DataError, match="entry 'alpaca_en': hf_hub_url: hub and script datasets are not downloaded"):
        load_meta(str(lf_dir / "dataset_info.json"))
    with pytest.raises(DataError, match="no entry named 'mllm'; entries: \\['alpaca_en', 'identity', 'mllm_demo'\\]"):
        load_meta(str(lf_dir / "dataset_info.json"), ["mllm"])
    monkeypatch.chdir(lf_dir.parent)
    with pytest.raises(DataError, match="'nope' is neither an entry of data/dataset_info.json nor an annotation"):
        resolve_sources(None, ["nope"], "data")


def test_lf_sharegpt_system_column_and_tags_remap(tmp_path):
    """2e: the sharegpt `system` column is the system prompt (it was dropped); 2g: columns/tags remap a
    `conversations` column holding role/content."""
    write(tmp_path / "old.json", [{"conversations": [{"from": "human", "value": "Colour?"},
                                                     {"from": "gpt", "value": "Red, arr."}],
                                   "system": "You are a pirate."}])
    write(tmp_path / "tags.json", [{"conversations": [{"role": "user", "content": "Colour?"},
                                                      {"role": "assistant", "content": "red"}]}])
    write(tmp_path / "dataset_info.json", {
        "old": {"file_name": "old.json", "formatting": "sharegpt",
                "columns": {"messages": "conversations", "system": "system"}},
        "tags": {"file_name": "tags.json", "formatting": "sharegpt", "columns": {"messages": "conversations"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant"}}})
    store = RecordStore(str(tmp_path / "dataset_info.json"), seed=0)
    assert store.conversation(0).system == "You are a pirate."
    assert store.conversation(1).turns == (("Colour?", "red"),)


def test_lf_system_field_without_system_column_is_an_error_not_a_replaced_prompt(tmp_path):
    """A system prompt the entry does not map would be replaced by the default: refused with the fix."""
    write(tmp_path / "old.json", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                                   "system": "You are a pirate."}])
    write(tmp_path / "dataset_info.json", {"old": {"file_name": "old.json", "formatting": "sharegpt"}})
    with pytest.raises(DataError, match='old.json, record 0: key "system" is not read.*add "system": "system"'):
        RecordStore(str(tmp_path / "dataset_info.json"), seed=0)


def test_lf_alpaca_multimodal_with_history_and_system(tmp_path):
    """2h and LF README's alpaca example: instruction + input joined by a newline, history turns first."""
    png(tmp_path / "a.png")
    write(tmp_path / "alpaca.json", [{"instruction": "<image>Describe", "input": "briefly", "output": "A red square.",
                                      "system": "S", "history": [["Hi", "Hello"]], "images": ["a.png"]}])
    write(tmp_path / "dataset_info.json", {"a": {"file_name": "alpaca.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history",
        "images": "images"}}})
    conv = RecordStore(str(tmp_path / "dataset_info.json"), seed=0).conversation(0)
    assert conv.system == "S" and conv.turns == (("Hi", "Hello"), ("<image>Describe\nbriefly", "A red square."))
    assert conv.images == (str(tmp_path / "a.png"),)


@pytest.mark.parametrize("entry, message", [
    ({"file_name": "x.json", "ranking": True}, "ranking: true is preference data"),
    ({"file_name": "x.json", "formatting": "sharegpt", "columns": {"audios": "audios"}},
     r"columns \['audios'\] not supported"),
    ({"file_name": "x.json", "num_samples": 10}, "'num_samples'"),
    ({"file_name": "x.json", "formatting": "chatml"}, "formatting 'chatml' must be one of"),
    ({"file_name": "x.json", "colums": {}}, r"unknown keys \['colums'\]"),
])
def test_lf_entry_keys_not_honoured_are_refused(tmp_path, entry, message):
    write(tmp_path / "x.json", [])
    write(tmp_path / "dataset_info.json", {"e": entry})
    with pytest.raises(DataError, match=message):
        load_meta(str(tmp_path / "dataset_info.json"))


def test_lf_images_not_mapped_in_columns_is_an_error(tmp_path):
    """An entry without an images column: LF itself would drop the images; here it is an error (9m-like)."""
    png(tmp_path / "a.png")
    write(tmp_path / "d.json", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                                 "images": ["a.png"]}])
    write(tmp_path / "dataset_info.json", {"d": {"file_name": "d.json", "formatting": "sharegpt"}})
    with pytest.raises(DataError, match="key 'images' is not read .*map it in the dataset_info.json entry"):
        RecordStore(str(tmp_path / "dataset_info.json"), seed=0)


def test_swift_documented_shapes_and_dataset_file(tmp_path, monkeypatch):
    """3b (query/response/history/system), ms-swift alpaca, messages with system, and 3d `--dataset file.jsonl`."""
    png(tmp_path / "x.png")
    records = [
        {"system": "You are a useful and harmless assistant", "query": "<image>Tell me tomorrow's weather",
         "response": "Tomorrow's weather will be sunny", "history": [["What is 1+1?", "2"]],
         "images": [str(tmp_path / "x.png")]},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"messages": [{"role": "system", "content": "You are a useful and harmless assistant"},
                      {"role": "user", "content": "Tell me tomorrow's weather"},
                      {"role": "assistant", "content": "Tomorrow's weather will be sunny"}]},
    ]
    write(tmp_path / "train.jsonl", records, jsonl=True)
    monkeypatch.chdir(tmp_path)
    store = RecordStore(None, seed=0, dataset=["train.jsonl"])
    first, second, third = (store.conversation(i) for i in range(3))
    assert first.system == "You are a useful and harmless assistant"
    assert first.turns == (("What is 1+1?", "2"), ("<image>Tell me tomorrow's weather",
                                                   "Tomorrow's weather will be sunny"))
    assert first.images == (str(tmp_path / "x.png"),)
    assert second.turns == (("Translate\nbonjour", "hello"),) and second.system is None
    assert third.system == "You are a useful and harmless assistant"


def test_content_lists_in_training_records(tmp_path):
    """4a/4b/4c: OpenAI/HF/Anthropic content lists, mixed with plain strings; media order = appearance."""
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    record = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And "},
                                     {"type": "image_url", "image_url": {"url": f"file://{b}"}}]},
        {"role": "assistant", "content": "Also red."}]}
    conv = parse_record(record, "f.json", 0, None)
    assert conv.turns == (("<image>What colour?", "It is red."), ("And <image>", "Also red."))
    assert conv.images == (a, b)
    with pytest.raises(DataError, match="message 1: images and videos belong in user messages"):
        parse_record({"messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": [{"type": "image", "image": a}]}]}, "f", 0, None)
    with pytest.raises(DataError, match=r"message 0.content\[0\]: a content part needs \"type\""):
        parse_record({"messages": [{"role": "user", "content": [{"txt": "q"}]},
                                   {"role": "assistant", "content": "a"}]}, "f", 0, None)


def test_content_part_keys_are_read_counted_or_refused(tmp_path):
    """Nothing in a content part is dropped silently: qwen_vl_utils' per-part sampling options (which would change
    the frames or pixels) are refused naming the part and key; any other key no reader uses is counted."""
    a = png(tmp_path / "a.png")

    def record(part: dict) -> dict:
        return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "q"}]},
                             {"role": "assistant", "content": "a"}]}

    for option in ("nframes", "fps", "max_pixels", "resized_height"):
        with pytest.raises(DataError, match=rf"f.json, record 2: message 0.content\[0\].{option}: per-part media "
                                            "options are not supported"):
            parse_record(record({"type": "video", "video": [a, a], option: 4}), "f.json", 2, None)
    conv = parse_record(record({"type": "image", "image": a, "detail": "high"}), "f.json", 2, None)
    assert conv.images == (a,) and conv.unread_keys == ("content part key detail",)
    assert parse_record(record({"type": "image", "image": a}), "f.json", 2, None).unread_keys == ()


def test_inline_media_forms_and_payload_never_printed(tmp_path):
    """4d file://, 5a data: URI, 5c raw base64, ms-swift {"bytes"}: all decode to the same image file;
    5b https is refused with the reason; a bad data URI never prints its payload."""
    payload = base64.b64encode(png_bytes()).decode()
    path = png(tmp_path / "red.png")
    cache = str(tmp_path / "cache")
    forms = [f"file://{path}", f"data:image/png;base64,{payload}", payload, {"bytes": payload, "path": None},
             {"path": path}]
    files = []
    for form in forms:
        conv = parse_record({"messages": [{"role": "user", "content": "<image>q"},
                                          {"role": "assistant", "content": "a"}], "images": [form]},
                            "f.json", 3, None, cache_dir=cache)
        files.append(open(conv.images[0], "rb").read())
    assert all(f == png_bytes() for f in files)
    with pytest.raises(DataError, match=r"f.json, record 3: images\[0\]: https://x.org/a.png: http\(s\) URLs are "
                                        "not downloaded for training"):
        parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                      "images": ["https://x.org/a.png"]}, "f.json", 3, None)
    long_bad = "data:image/png;charset=utf8," + "A" * 5000
    with pytest.raises(DataError) as info:
        parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                      "images": [long_bad]}, "f.json", 3, None)
    assert "must be base64" in str(info.value) and "A" * 100 not in str(info.value) and "5028 chars" in str(info.value)


def test_video_as_frame_list(tmp_path):
    """6b: `"videos": [[f0, f1, f2, f3]]` is one video of 4 frames (serve accepts the same)."""
    frames = [png(tmp_path / f"{i}.png") for i in range(4)]
    conv = parse_record({"messages": [{"role": "user", "content": "<video>What happens?"},
                                      {"role": "assistant", "content": "Nothing."}], "videos": [frames]}, "f", 0, None)
    assert conv.videos == (tuple(frames),)


def test_unread_media_key_is_an_error_and_other_keys_are_counted(tmp_path):
    """9m: `image_paths` (no placeholder) trained text-only in silence; now refused. Other unread keys: one
    counted warning line."""
    png(tmp_path / "a.png")
    with pytest.raises(DataError, match="record 0: key 'image_paths' is not read"):
        parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                      "image_paths": ["a.png"]}, "f", 0, None)
    write(tmp_path / "a.json", [{"id": i, "conversations": [{"from": "human", "value": "q"},
                                                            {"from": "gpt", "value": "a"}]} for i in range(3)])
    write(tmp_path / "meta.json", {"d": {"annotation": "a.json"}})
    store = RecordStore(str(tmp_path / "meta.json"), seed=0)
    assert store.unread_keys_warning().endswith("record keys not read by any reader (ignored): 'id' (3 records)")


def test_two_different_system_prompts_are_refused():
    with pytest.raises(DataError, match="two different system prompts"):
        parse_record({"messages": [{"role": "system", "content": "A"}, {"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a"}], "system": "B"}, "f", 0, None)


REC = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("name, body", [
    ("jsonl_named.json", (json.dumps(REC) + "\r\n") * 2),  # 7c (+ CRLF)
    ("array_named.jsonl", json.dumps([REC, REC], indent=2)),  # 7d
    ("oneline.jsonl", json.dumps([REC, REC])),  # 7e
    ("bom.jsonl", "\ufeff" + (json.dumps(REC) + "\n") * 2 + "\n"),  # 7b
])
def test_json_vs_jsonl_by_content(tmp_path, name, body):
    (tmp_path / name).write_text(body, encoding="utf-8")
    assert read_annotation(str(tmp_path / name)) == [REC, REC]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_annotations_decode(tmp_path, encoding):
    """9g: Windows Notepad's "Unicode" (UTF-16 with BOM) gave "Expecting value"."""
    write(tmp_path / "u.json", [REC, {**REC, "messages": [{"role": "user", "content": "é?"},
                                                          {"role": "assistant", "content": "ü"}]}], encoding=encoding)
    assert read_annotation(str(tmp_path / "u.json"))[1]["messages"][0]["content"] == "é?"


def test_broken_utf16_and_empty_files_are_named(tmp_path):
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe[\x00\x00\xd8")  # a lone surrogate
    with pytest.raises(DataError, match="bad.json: looks like UTF-16 text but does not decode"):
        read_annotation(str(tmp_path / "bad.json"))
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(DataError, match="empty.json: the file is empty"):
        read_annotation(str(tmp_path / "empty.json"))


@pytest.mark.parametrize("jsonl", [False, True])
def test_annotation_file_as_meta_path_says_what_to_do(tmp_path, jsonl):
    """2d / 3c: an annotation file passed as --meta_path ("expected a non-empty object" / "Extra data")."""
    path = write(tmp_path / ("train.jsonl" if jsonl else "train.json"), [REC, REC], jsonl=jsonl)
    with pytest.raises(DataError, match=f"this is an annotation file .*--dataset {path}"):
        load_meta(path)
