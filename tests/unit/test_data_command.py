"""Issue #30 `qwen2vl-ap data`: the dataset as training reads it — counts, lengths, warnings, the rendered sample
with its system prompt and supervised span — and exit code 2 when no sample fits max_seq_length."""
import json

from PIL import Image

from launch.cli import main


def write_dataset(tmp_path, size=56):
    Image.new("RGB", (size, size), (200, 0, 0)).save(tmp_path / "a.png")
    records = [{"system": "You are a pirate.", "id": i, "images": ["a.png"],
                "conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Red."}]}
               for i in range(3)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return str(tmp_path / "train.jsonl")


def test_data_command_previews_as_training_reads(tmp_path, capsys):
    path = write_dataset(tmp_path)
    assert main(["data", "--dataset", path, "--show", "1", "--mask_history", "true"]) == 0
    out = capsys.readouterr().out
    assert f"data: {path}: 3 samples from 3 valid records" in out
    assert "token lengths before truncation (all 3 samples probed)" in out and "images per sample: 1: 3" in out
    assert "record keys not read by any reader (ignored): 'id' (3 records)" in out
    assert ("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>x4"
            "<|vision_end|>Colour?<|im_end|>\n<|im_start|>assistant\n«Red.<|im_end|>»") in out


def test_data_command_exit_2_when_nothing_fits(tmp_path, capsys):
    path = write_dataset(tmp_path, size=448)
    assert main(["data", "--dataset", path, "--max_seq_length", "64", "--show", "0"]) == 2
    assert "all 3 probed samples are longer than max_seq_length 64" in capsys.readouterr().out


def test_data_command_shows_the_held_out_split(tmp_path, capsys):
    path = write_dataset(tmp_path)
    assert main(["data", "--dataset", path, "--show", "0", "--split_dataset_ratio", "0.3"]) == 0
    assert (f"data: {path}: 2 samples from 3 valid records (repeat_time applied); 1 records held out for evaluation "
            "(val_size)") in capsys.readouterr().out
