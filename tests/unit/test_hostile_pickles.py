"""Every pickle read from a user-supplied path goes through a restricted unpickler: a crafted file whose reduce
calls os.system is refused, naming the file, and its payload never runs. One test per entry point."""
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import paddle
import pytest

from autoparallel.engine.checkpoint import (DIST_DIR, TRAINER_STATE, capture_rng_state, load_rng_state,
                                            resolve_resume_path)
from autoparallel.engine.trainer import build_model
from autoparallel.sharded_load import load_sharded
from launch import cli, launcher
from launch.config import load_run_config
from launch.infer import infer_main
from network.config import Qwen2VLConfig
from network.formats import CheckpointError, FormatError
from network.lora import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME, read_adapter


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, wrap=lambda p: {"model.embed_tokens.weight": p}) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(wrap(Payload(marker)), protocol=4))
    return path


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """cli.main installs the project's log handler on the stream of the moment (pytest's capture of one test);
    drop it afterwards so later tests do not log into a closed stream."""
    from network.log import logger

    before = list(logger.handlers)
    yield
    logger.handlers[:] = before


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the payload ran"


def checkpoint_dir(tmp_path: Path) -> Path:
    """A checkpoint that looks complete: trainer state and an (empty, genuine) dist metadata file."""
    from paddle.distributed.flex_checkpoint.dcp.metadata import Metadata

    ckpt = tmp_path / "out" / "checkpoint-1"
    (ckpt / DIST_DIR).mkdir(parents=True)
    (ckpt / TRAINER_STATE).write_text(json.dumps({"global_step": 1}))
    (ckpt / DIST_DIR / "0.metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={}, storage_metadata={})))
    return ckpt


@pytest.mark.parametrize("file", ["0.metadata", "0_0.distcp"])
def test_resume_refuses_crafted_dist_files_before_paddle_reads_them(tmp_path, marker, file, monkeypatch, capsys):
    ckpt = checkpoint_dir(tmp_path)
    planted = plant(ckpt / DIST_DIR / file, marker)
    for resume in (str(ckpt), "auto"):
        with pytest.raises(CheckpointError, match=f"{planted}: .*unexpected global posix.system"):
            resolve_resume_path(resume, str(tmp_path / "out"))
    # `sft --resume_from_checkpoint`: refused in the parent, before any worker (Paddle's loader) starts
    monkeypatch.setattr(launcher.WorkerLaunch, "start", lambda *a, **k: pytest.fail("workers were started"))
    code = cli.main(["sft", "--resume_from_checkpoint", str(ckpt), "--output_dir", str(tmp_path / "out"),
                     "--synthetic_data_dir", str(tmp_path / "syn")])
    err = capsys.readouterr().err
    assert code == 2 and str(planted) in err and "unexpected global posix.system" in err


def test_rng_state_is_read_with_the_restricted_unpickler(tmp_path, marker):
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    random.seed(3), np.random.seed(3), paddle.seed(3)
    state = capture_rng_state()
    (ckpt / "rng_state_0.pkl").write_bytes(pickle.dumps(state))
    loaded = load_rng_state(ckpt, 0)  # a genuine file still loads, Paddle's generator state included
    assert loaded["python"] == state["python"] and np.array_equal(loaded["numpy"][1], state["numpy"][1])
    assert loaded["paddle_device"].current_seed() == state["paddle_device"].current_seed()
    planted = plant(ckpt / "rng_state_1.pkl", marker, wrap=lambda p: {"python": p})
    with pytest.raises(CheckpointError, match=f"{planted}: .*unexpected global posix.system"):
        load_rng_state(ckpt, 1)


@pytest.fixture
def crafted_model_dir(tmp_path, marker):
    model_dir = tmp_path / "model"
    Qwen2VLConfig.preset("tiny").save_pretrained(str(model_dir))
    return model_dir, plant(model_dir / "model_state.pdparams", marker)


def test_infer_refuses_a_crafted_pdparams(crafted_model_dir, capsys):
    model_dir, planted = crafted_model_dir
    assert infer_main(["--model", str(model_dir), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(planted) in err and "unexpected global posix.system" in err


def test_training_refuses_a_crafted_pdparams_as_model_name_or_path(crafted_model_dir):
    model_dir, planted = crafted_model_dir
    cfg = load_run_config("sft", None, {"model_name_or_path": str(model_dir)})
    model = build_model(cfg)  # lazy: the weights are read after the plan is applied (Trainer.load_weights)
    with pytest.raises(FormatError, match=f"{planted}: .*unexpected global posix.system"):
        load_sharded(model, str(model_dir))


def test_lora_adapter_refuses_a_crafted_pdparams(tmp_path, marker):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / LORA_CONFIG_NAME).write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": []}))
    planted = plant(adapter / LORA_WEIGHTS_NAME, marker)
    with pytest.raises(FormatError, match=f"{planted}: .*unexpected global posix.system"):
        read_adapter(adapter)
