"""Issue #30 scale: annotations are indexed once (byte offsets, cached keyed by content), validated once (the
cached result serves every later process), and records are parsed on demand — no process holds all of them."""
import json
import os

import numpy as np

from autoparallel.data import record_index
from autoparallel.data.records import RecordStore


def write_dataset(tmp_path, n, jsonl=True):
    records = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(n)]
    path = tmp_path / ("train.jsonl" if jsonl else "train.json")
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": path.name, "repeat_time": 2}}))
    return str(tmp_path / "meta.json"), path


def test_store_reads_records_on_demand_from_a_memory_mapped_index(tmp_path):
    meta, path = write_dataset(tmp_path, 50, jsonl=False)
    store = RecordStore(meta, seed=0)
    assert len(store) == 100 and store.num_records == 50 and not hasattr(store, "conversations")
    assert store.conversation(7).turns == (("q7", "a7"),) and store.conversation(57).turns == (("q7", "a7"),)
    index = store.indexes[0]
    assert isinstance(index.spans.base, np.memmap) and index.data_path != str(path)  # a JSON list: normalised copy
    assert store.unread_keys == {"id": 50}


def test_validation_runs_once_per_content_and_a_changed_file_is_reindexed(tmp_path, monkeypatch):
    meta, path = write_dataset(tmp_path, 20)
    RecordStore(meta, seed=0)
    calls = []
    real = record_index.AnnotationIndex._decode
    monkeypatch.setattr(record_index.AnnotationIndex, "_decode", lambda self, i, *a: calls.append(i) or real(self, i, *a))
    warm = RecordStore(meta, seed=0)  # what every worker does: nothing is parsed up front
    assert calls == [] and len(warm) == 40 and warm.indexes[0].data_path == str(path)
    path.write_text(path.read_text().replace('"q3"', '"changed"'))
    cold = RecordStore(meta, seed=0)
    assert len(calls) == 20 and cold.conversation(3).turns == (("changed", "a3"),)


def test_missing_media_is_rechecked_on_a_warm_index(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "<image>q"},
                                                                   {"role": "assistant", "content": "a"}],
                                                      "images": ["a.png"]}))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "train.jsonl", "root": "."}}))
    assert "media file not found" in str(RecordStore(str(tmp_path / "meta.json"), seed=0).missing_media[0])
    (tmp_path / "a.png").write_bytes(b"x")
    assert RecordStore(str(tmp_path / "meta.json"), seed=0).missing_media == []
    assert os.path.isdir(tmp_path / ".qwen2vl-ap-index")


def test_line_spans_equal_splitting_the_file_line_by_line(tmp_path, monkeypatch):
    """The index's line finder works on whole chunks with numpy; its spans equal those of splitting the bytes at
    each newline and keeping the lines `bytes.strip` leaves text in, also when lines and a BOM straddle chunks."""
    rng = np.random.default_rng(0)
    pieces = [b"\n", b"  \n", b"\r\n", b'{"a": 1}', b" ", b"\t", b"x", b"\xef\xbb\xbf", "你".encode(), b"\x0b\x0c"]
    path = tmp_path / "a.jsonl"
    for _ in range(200):
        data = b"".join(pieces[k] for k in rng.integers(0, len(pieces), rng.integers(0, 25)))
        path.write_bytes(data)
        want, start = [], 0
        for line in data.split(b"\n"):
            if line.strip():
                want.append([3 if start == 0 and data.startswith(b"\xef\xbb\xbf") else start, start + len(line)])
            start += len(line) + 1
        for chunk in (1, 3, 7, 1 << 20):
            monkeypatch.setattr(record_index, "_CHUNK", chunk)
            spans = record_index._line_spans(str(path))
            assert spans.dtype == np.int64 and spans.tolist() == want, (data, chunk)


def test_validation_pass_reads_every_record_in_order_across_span_slices(tmp_path, monkeypatch):
    """`records()` (the validation pass) takes the spans a slice at a time; it yields what `record(i)` reads."""
    _, path = write_dataset(tmp_path, 10)
    index = record_index.index_annotation(str(path))
    monkeypatch.setattr(record_index, "SPAN_SLICE", 3)
    assert list(index.records()) == [index.record(i) for i in range(10)] and index.record(9)["id"] == 9
