"""Hostile inputs (docs/RELIABILITY.md): each is handled as documented or rejected with a DataError naming the
annotation file and record; a dp2 training run in skip mode over all of them finishes and reports the skip count."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from autoparallel.data import DataConfig, DataError, SFTDataset
from cli_runs import FAST, metrics, no_leftover_processes, sft  # noqa: F401
from hostile_data import CASES, MAX_SEQ_LENGTH, record, write_hostile_dataset
from network.processor import Qwen2VLProcessor

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


@pytest.fixture(scope="module")
def processor() -> Qwen2VLProcessor:
    return Qwen2VLProcessor.from_pretrained(None)


def write_annotation(root: Path, records: list[dict] | bytes, name: str = "ann.json") -> tuple[Path, str]:
    ann = root / name
    if isinstance(records, bytes):
        ann.write_bytes(records)
    else:
        ann.write_text(json.dumps(records))
    meta = root / "meta.json"
    meta.write_text(json.dumps({"d": {"annotation": name, "root": "."}}))
    return ann, str(meta)


def grid(sample: dict) -> list[int]:
    return sample["image_grid_thw"].tolist()[0]


# Extra checks on the samples of handled inputs.
HANDLED = {
    "1x1": lambda s: grid(s) == [1, 4, 4],  # resized up to 56x56 (min_pixels), as HF does
    "16bit": lambda s: np.unique(s["pixel_values"]).size > 50,  # scaled to 8 bits, not saturated to white
    "cmyk": lambda s: grid(s) == [1, 4, 4],
    "palette": lambda s: grid(s) == [1, 4, 4],
    "rgba": lambda s: grid(s) == [1, 4, 4],  # alpha dropped, as HF's convert("RGB")
    "exif_rotated": lambda s: grid(s) == [1, 8, 4],  # stored 56 wide x 112 high: orientation ignored, as HF
    "animated_gif": lambda s: grid(s) == [1, 4, 4],  # first frame only
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_record_is_handled_or_rejected_with_file_and_record(tmp_path, processor, case):
    kind, write, user, expected = CASES[case]
    file = write(tmp_path)
    ann, meta = write_annotation(tmp_path, [record(user, kind, [file] if file else [])])
    config = DataConfig(meta_path=meta, max_seq_length=MAX_SEQ_LENGTH)
    if expected == "ok":
        sample = SFTDataset(config, processor).sample(0)
        assert sample["num_labels"] > 0 and np.isfinite(sample["pixel_values"]).all()
        assert HANDLED[case](sample)
        return
    with pytest.raises(DataError) as info:
        dataset = SFTDataset(config, processor)  # placeholder mismatches are found while parsing
        dataset.probe(0)  # headers: missing/unreadable files, sizes, frame counts, length
        dataset.sample(0)  # pixels: truncated data
    assert info.value.kind == expected
    assert str(info.value).startswith(f"{ann}, record 0: ")
    if expected == "unreadable media":
        assert file in str(info.value)


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_non_utf8_text_rejects_only_its_record(tmp_path, processor, ext):
    good = json.dumps(record("hello", "images", []), ensure_ascii=False).encode()
    bad = json.dumps(record("caf\u00e9", "images", []), ensure_ascii=False).encode().replace(b"\xc3\xa9", b"\xe9")
    data = b"[" + good + b"," + bad + b"]" if ext == "json" else good + b"\n" + bad + b"\n"
    ann, meta = write_annotation(tmp_path, data, f"ann.{ext}")
    with pytest.raises(DataError, match=r"record 1: text is not valid UTF-8 \(byte 0xe9\)") as info:
        SFTDataset(DataConfig(meta_path=meta), processor)
    assert info.value.file == str(ann) and info.value.kind == "invalid text"
    dataset = SFTDataset(DataConfig(meta_path=meta, skip_bad_samples=True), processor)
    assert len(dataset) == 1 and dataset.skips.report()["by_kind"] == {"invalid text": 1}


@pytest.mark.parametrize("skip", [False, True])
def test_annotation_that_is_not_json_is_rejected_naming_the_file(tmp_path, processor, skip):
    ann, meta = write_annotation(tmp_path, b"\x89PNG this is not JSON")
    with pytest.raises(DataError, match="invalid JSON") as info:  # a whole file is never skipped silently
        SFTDataset(DataConfig(meta_path=meta, skip_bad_samples=skip), processor)
    assert info.value.file == str(ann) and info.value.index is None


def test_missing_meta_path_is_rejected(tmp_path, processor, monkeypatch, capsys):
    missing = tmp_path / "nope" / "meta.json"
    with pytest.raises(DataError, match="meta_path does not exist") as info:
        SFTDataset(DataConfig(meta_path=str(missing)), processor)
    assert info.value.file == str(missing)
    from launch import cli, launcher

    monkeypatch.setattr(launcher.WorkerLaunch, "start", lambda *a, **k: pytest.fail("workers were started"))
    assert cli.main(["sft", "--meta_path", str(missing), "--output_dir", str(tmp_path / "run")]) == 2
    assert f"meta_path='{missing}': file not found" in capsys.readouterr().err


def test_training_in_skip_mode_finishes_with_the_skip_count(tmp_path):
    meta, _ = write_hostile_dataset(tmp_path / "data")
    out = tmp_path / "run"
    # One epoch: 20 samples / (2 per device x dp2) = 5 steps, so every record is drawn once.
    sft(out, ["--meta_path", meta, "--data_parallel_degree", "2", "--skip_bad_samples", "true",
              "--max_steps", "5", *FAST]).assert_ok()
    records = metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and all(math.isfinite(r["loss"]) for r in steps)
    # Every rejected case once, plus the non-UTF-8 record; decode failures happen on one rank only, yet count.
    expected = {e: sum(1 for *_, k in CASES.values() if k == e) for *_, e in CASES.values() if e != "ok"}
    expected["invalid text"] = 1
    final = records[-1]
    assert final["skipped_by_kind"] == expected and final["skipped_samples"] == sum(expected.values()) == 10, final
