"""Issue #30 parent-side checks: too-long samples found before workers start, unread keys counted, LF/ms-swift
config keys, `report_to` values not honoured, every unknown key at once, `sft --help`."""
import json

import pytest
from PIL import Image

from autoparallel.config import ConfigError, RunConfig
from autoparallel.data import DataConfig, SFTDataset
from autoparallel.data.records import DataError
from launch.cli import main
from launch.prepare import check_records
from network.processor import Qwen2VLProcessor


def build(**layer):
    return RunConfig.build("sft", [("command line", layer)])


def dataset_dir(tmp_path, size, n=2, extra=None):
    Image.new("RGB", size, (9, 9, 9)).save(tmp_path / "a.png")
    records = [{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                "images": ["a.png"], **(extra or {})} for _ in range(n)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return str(tmp_path / "train.jsonl")


def test_every_sample_too_long_is_refused_in_the_parent_naming_the_limit(tmp_path):
    """6d/6e: every sample over max_seq_length was found only inside the workers ("no valid sample left")."""
    dataset_dir(tmp_path, (448, 448))  # 256 image tokens: the span cannot be cut at 64
    cfg = build(dataset=str(tmp_path / "train.jsonl"), max_seq_length=64, per_device_train_batch_size=1)
    with pytest.raises(DataError, match=r"all 2 probed samples are longer than max_seq_length 64 and cannot be "
                                        r"truncated \(they are (\d+)-\1 tokens\): raise max_seq_length to at least"):
        check_records(cfg, None, train=True)
    check_records(build(dataset=str(tmp_path / "train.jsonl"), max_seq_length=400, per_device_train_batch_size=1),
                  None, train=True)


def test_unread_record_keys_are_one_counted_warning(tmp_path, caplog):
    dataset_dir(tmp_path, (28, 28), n=3, extra={"id": 7})
    check_records(build(dataset=str(tmp_path / "train.jsonl"), per_device_train_batch_size=1), None, train=True)
    lines = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("record keys not read by any reader (ignored): 'id' (3 records)")


def test_report_to_a_tracker_that_is_not_wired_is_refused():
    """`report_to wandb` was accepted and ignored."""
    with pytest.raises(ConfigError, match="report_to='wandb' .*only visualdl, none"):
        build(report_to="wandb")
    assert build(report_to="visualdl").compatibility_keys == ["report_to"]


def test_lf_and_swift_keys_and_all_unknown_keys_at_once():
    """2k: an LF YAML took 8 runs, one unknown key per run; cutoff_len/max_length are max_seq_length."""
    assert build(cutoff_len=1024).data.max_seq_length == 1024 and build(max_length=512).data.max_seq_length == 512
    assert build(dataset="a,b", dataset_dir="data").data.dataset == ["a", "b"]
    with pytest.raises(ConfigError, match="unknown config keys 'stage' .*; 'finetuning_type' .*; 'template'"):
        build(stage="sft", finetuning_type="lora", template="qwen2_vl")


def test_sft_help_prints_the_keys(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qwen2vl-ap sft") and "max_seq_length" in out and "dataset_dir" in out


def test_records_own_system_prompts_replacing_system_prompt_are_counted(tmp_path, caplog):
    path = dataset_dir(tmp_path, (28, 28), n=2, extra={"system": "You are a pirate."})
    check_records(build(dataset=path, per_device_train_batch_size=1, system_prompt="Be formal."), None, train=True)
    assert any(r.getMessage().endswith("2 of 2 records carry their own system prompt, which replaces system_prompt "
                                       "for them") for r in caplog.records)


def test_plan_refuses_a_meta_path_that_does_not_exist(tmp_path, capsys):
    """8p: `plan --meta_path /nonexistent/meta.json` exited 0."""
    assert main(["plan", "--meta_path", str(tmp_path / "nope.json")]) == 2
    assert "meta_path=" in capsys.readouterr().err


def test_plan_reads_lengths_and_image_sizes_from_the_data(tmp_path, capsys):
    """`plan --dataset` plans the data's longest sample (padded as the loader pads), its most images per sample and
    its largest image (original size) instead of max_seq_length and the assumed square image."""
    Image.new("RGB", (112, 56), (9, 9, 9)).save(tmp_path / "wide.png")
    Image.new("RGB", (28, 28), (9, 9, 9)).save(tmp_path / "small.png")
    records = [{"messages": [{"role": "user", "content": "<image><image>two?"}, {"role": "assistant", "content": "a"}],
                "images": [str(tmp_path / "small.png"), str(tmp_path / "wide.png")]},
               {"messages": [{"role": "user", "content": "<image>one?"}, {"role": "assistant", "content": "b"}],
                "images": [str(tmp_path / "small.png")]}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    assert main(["plan", "--dataset", str(path), "--data_parallel_degree", "1", "--nproc_per_node", "1"]) == 0
    out = capsys.readouterr().out
    decoded = SFTDataset(DataConfig(dataset=[str(path)]), Qwen2VLProcessor.from_pretrained(None))
    longest = max(len(decoded[i]["input_ids"]) for i in range(2))  # the oracle: samples decoded from pixels
    padded = -(-longest // 8) * 8
    assert (f"data: 2 samples, 2 trainable; longest {longest} tokens (padded {padded}), up to 2 images/sample, "
            "largest image 56x112 px") in out
    assert f" x {padded} tokens; 2 image/sample of 56x112 px -> 56x112" in out
    assert main(["plan", "--dataset", str(path), "--image_size", "224", "--images_per_sample", "1"]) == 0
    assert "1 image/sample of 224x224 px" in capsys.readouterr().out


def test_held_out_split_smaller_than_one_evaluation_batch_is_refused_in_the_parent(tmp_path):
    path = dataset_dir(tmp_path, (28, 28), n=6)
    keys = dict(dataset=path, per_device_train_batch_size=1, evaluation_strategy="steps", eval_steps=1, val_size=1)
    with pytest.raises(DataError, match=r"val_size=1 holds out 1 records, fewer than one evaluation batch of 2 "
                                        r"\(per_device_eval_batch_size 2 x 1 data-parallel ranks\)"):
        check_records(build(**keys, per_device_eval_batch_size=2), None, train=True)
    check_records(build(**keys, per_device_eval_batch_size=1), None, train=True)
