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
from hostile_data import CASES, MAX_SEQ_LENGTH, record, truncated, write_hostile_dataset, written
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
    "media_without_placeholder": lambda s: grid(s) == [1, 4, 4] and (s["input_ids"] == 151655).sum() == 4,
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
    assert final["skipped_by_kind"] == expected and final["skipped_samples"] == sum(expected.values()) == 9, final
    assert final["placeholders_added"] == 1  # media_without_placeholder


def good_records(root: Path, n: int) -> list[dict]:
    from hostile_data import noise, saved

    return [record("<image>What colour is the shape?", "images", [saved(noise(56, 56, seed=i), root / f"g{i}.png")])
            for i in range(n)]


# case -> (bad annotation content or None, expected text in the one line, found before workers start)
CORPUS = {
    "missing_image": (lambda r: [record("<image>q", "images", ["nope.png"])], "media file not found", True),
    "truncated_image": (lambda r: [record("<image>q", "images", [truncated(r / "t.png", "PNG")])],
                        "unreadable media", False),
    "fake_image": (lambda r: [record("<image>q", "images", [written(r / "fake.png", b"GIF89a but not really")])],
                   "unreadable media", False),
    "placeholder_mismatch": (lambda r: [record("<image><image>q", "images", ["g0.png"])],
                             "2 <image> placeholders but 1 images", True),
    "invalid_json": (lambda r: b"[{not json", "invalid JSON", True),
    "missing_meta": (None, "file not found", True),
    "smaller_than_one_global_batch": (lambda r: [], "fewer than one global batch of 4", True),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_dataset_gives_one_clean_line(tmp_path, case):
    """No skip mode: every broken dataset stops the run with one line naming file, record and reason (found in
    the parent where cheap, else relayed from the worker), a non-zero exit code and no traceback."""
    make_bad, reason, in_parent = CORPUS[case]
    root = tmp_path / "data"
    root.mkdir()
    good = good_records(root, 1 if case == "smaller_than_one_global_batch" else 3)
    ann = root / "ann.json"
    if make_bad is None:
        meta = str(root / "missing" / "meta.json")
    else:
        bad = make_bad(root)
        ann.write_bytes(bad if isinstance(bad, bytes) else json.dumps(bad + good).encode())
        meta = str(root / "meta.json")
        Path(meta).write_text(json.dumps({"d": {"annotation": "ann.json", "root": "."}}))
    out = tmp_path / "run"
    run = sft(out, ["--meta_path", meta, "--data_parallel_degree", "2", "--max_steps", "1", *FAST])
    assert run.returncode == (2 if in_parent else 1), run.logs()
    lines = [line for line in run.stderr.splitlines() if line.startswith("qwen2vl-ap sft:")]
    assert len(lines) == 1, run.stderr
    assert reason in lines[0]
    assert (meta if case in ("missing_meta", "smaller_than_one_global_batch") else str(ann)) in lines[0]
    if case not in ("missing_meta", "invalid_json", "smaller_than_one_global_batch"):
        assert "record 0" in lines[0]
    assert "Traceback" not in run.stdout + run.stderr
    if not in_parent:
        assert "Traceback" in run.worker_logs()  # the details stay in the worker log


def test_verbose_shows_the_worker_traceback(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    records = [record("<image>q", "images", [truncated(root / "t.png", "PNG")])] + good_records(root, 3)
    (root / "ann.json").write_text(json.dumps(records))
    (root / "meta.json").write_text(json.dumps({"d": {"annotation": "ann.json", "root": "."}}))
    run = sft(tmp_path / "run", ["--meta_path", str(root / "meta.json"), "--data_parallel_degree", "2",
                                 "--max_steps", "1", "--verbose", *FAST])
    assert run.returncode == 1 and "Traceback" in run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("qwen2vl-ap sft: error: rank ")


def test_a_rank_killed_by_a_signal_is_named_with_its_last_log_line(tmp_path):
    meta, _ = write_hostile_dataset(tmp_path / "data")
    run = sft(tmp_path / "run", ["--meta_path", meta, "--data_parallel_degree", "2", "--skip_bad_samples", "true",
                                 "--max_steps", "3", *FAST], env={"QWEN2VL_AP_FAULT": "rank=1,step=1,at=sigkill"})
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen2vl-ap sft: error: rank 1 was killed by SIGKILL (out of memory?); its last log "
                           "line: "), run.stderr
    assert "fault injection: rank 1 sends itself SIGKILL after step 1" in last


# C1: the desync checkpoint of security review 2 (section 6) on every resume entry point, as a user runs it. On
# the old code the parent accepted it and a worker's `dist.load_state_dict` ran its payload; now the parent
# refuses it before any worker starts (exit 2, one line naming the file).
RESUMES = {"sft_path": ("sft", "path"), "lora_path": ("lora", "path"), "sft_auto": ("sft", "auto"),
           "lora_auto": ("lora", "auto")}


@pytest.mark.parametrize("case", list(RESUMES))
def test_C1_resume_never_runs_a_desync_checkpoint(tmp_path, case):
    from crafted_pickles import plant_desync_checkpoint

    command, resume = RESUMES[case]
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    keys = ["visual.patch_embed.proj.weight", "model.layers.0.self_attn.q_proj.lora_A"]  # sft and lora state
    planted = plant_desync_checkpoint(out / "checkpoint-1", marker, keys)
    run = sft(out, ["--resume_from_checkpoint", str(out / "checkpoint-1") if resume == "path" else "auto",
                    "--synthetic_data_dir", str(tmp_path / "syn"), "--nproc_per_node", "1",
                    "--data_parallel_degree", "1", "--max_steps", "1", *FAST], command=command)
    assert not marker.exists(), "the payload ran"
    assert run.returncode == 2, run.logs()
    lines = [line for line in run.stderr.splitlines() if str(planted) in line]
    assert len(lines) == 1 and "a pickled rank file" in lines[0], run.stderr
    assert "Traceback" not in run.stdout + run.stderr and not run.worker_logs()
