"""Every pickle read from a user-supplied path goes through a restricted unpickler: a crafted file whose reduce
calls os.system is refused, naming the file, and its payload never runs. One test per entry point, for the plain
crafted pickle and for the desync pickle of security review 2 (C1: a payload crossing its frame's end, read as
`{}` by a frame-bound walker and as code by CPython's C unpickler)."""
import json
import pickle
import random
from pathlib import Path

import numpy as np
import paddle
import pytest

from autoparallel.engine.checkpoint import (DIST_DIR, TRAINER_STATE, capture_rng_state, load_dist_state,
                                            load_rng_state, resolve_resume_path)
from autoparallel.engine.trainer import build_model
from autoparallel.sharded_load import load_sharded
from crafted_pickles import desync_pickle, plain_pickle, plant_desync_checkpoint
from launch import cli, launcher
from launch.config import load_run_config
from launch.infer import infer_main
from network.config import Qwen2VLConfig
from network.formats import CheckpointError, FormatError, index_pickle
from network.lora import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME, read_adapter
from tiny_model import save_tiny_model

# Keys of the tiny model's sft and lora training state: a metadata entry for them makes Paddle read the file.
RESUMED_KEYS = ["visual.patch_embed.proj.weight", "model.layers.0.self_attn.q_proj.lora_A"]
DESYNC_REASON = "runs past the end of its pickle frame"


def plant(path: Path, marker: Path, wrap=lambda p: {"model.embed_tokens.weight": p}) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plain_pickle(marker, wrap))
    return path


def one_line_naming(text: str, file: Path, reason: str) -> str:
    lines = [line for line in text.splitlines() if str(file) in line]
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in text, text
    return lines[0]


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


def test_C1_desync_pickle_is_refused_by_the_indexer(tmp_path, marker):
    file = tmp_path / "0_0.distcp"
    file.write_bytes(desync_pickle(marker))
    with pytest.raises(FormatError, match=f"{file}: a 19-byte payload at byte 16 {DESYNC_REASON}"):
        index_pickle(str(file))
    proof = tmp_path / "proof"  # the file is the real thing: CPython's unpickler runs its payload
    pickle.loads(desync_pickle(proof))
    assert proof.exists()


def test_C1_bytes_after_stop_are_refused(tmp_path):
    file = tmp_path / "model_state.pdparams"
    file.write_bytes(pickle.dumps({"w": np.ones(3, np.float32)}, protocol=4) + b"\x80\x04N.")
    with pytest.raises(FormatError, match=f"{file}: 4 bytes follow the end of the pickle"):
        index_pickle(str(file))


def checkpoint_planted(tmp_path: Path, marker: Path, file: str) -> tuple[Path, Path, str]:
    """(checkpoint, planted file, expected reason): a plain crafted `.metadata` or `.distcp`, or the desync one."""
    ckpt = tmp_path / "out" / "checkpoint-1"
    if file == "desync":
        return ckpt, plant_desync_checkpoint(ckpt, marker, RESUMED_KEYS), "a pickled rank file"
    checkpoint_dir(tmp_path)
    reason = "unexpected global posix.system" if file.endswith(".metadata") else "a pickled rank file"
    return ckpt, plant(ckpt / DIST_DIR / file, marker), reason


@pytest.mark.parametrize("file", ["0.metadata", "0_0.distcp", "desync"])
def test_resume_refuses_crafted_dist_files_before_paddle_reads_them(tmp_path, marker, file, monkeypatch, capsys):
    """C1: `--resume_from_checkpoint PATH` and `auto` (the checkpoint planted in output_dir) refuse in the parent;
    resume loads only safetensors rank files, so no `.distcp` (crafted or not) ever reaches Paddle."""
    ckpt, planted, reason = checkpoint_planted(tmp_path, marker, file)
    for resume in (str(ckpt), "auto"):
        with pytest.raises(CheckpointError, match=f"{planted}: .*{reason}"):
            resolve_resume_path(resume, str(tmp_path / "out"))
    # `sft`/`lora --resume_from_checkpoint`: refused in the parent, before any worker (Paddle's loader) starts
    monkeypatch.setattr(launcher.WorkerLaunch, "start", lambda *a, **k: pytest.fail("workers were started"))
    for command in ("sft", "lora"):
        code = cli.main([command, "--resume_from_checkpoint", str(ckpt), "--output_dir", str(tmp_path / "out"),
                         "--synthetic_data_dir", str(tmp_path / "syn")])
        assert code == 2
        one_line_naming(capsys.readouterr().err, planted, reason)


def test_C1_the_loading_rank_never_unpickles_a_distcp(tmp_path, marker):
    """The worker's own check: `load_dist_state` (what `Trainer.resume` calls) refuses the desync checkpoint
    instead of handing it to `dist.load_state_dict`, which ran its payload."""
    planted = plant_desync_checkpoint(tmp_path / "checkpoint-1", marker, ["w"])
    with pytest.raises(CheckpointError, match=f"refusing {planted}: a pickled rank file"):
        load_dist_state({"w": paddle.zeros([1])}, planted.parent, None, [])


@pytest.mark.parametrize("name", ["../../outside.safetensors", "0_0.distcp", 7])
def test_C1_resume_metadata_may_name_only_its_safetensors_files(tmp_path, name):
    from paddle.distributed.flex_checkpoint.dcp.metadata import LocalTensorIndex, Metadata

    ckpt = checkpoint_dir(tmp_path)
    meta = ckpt / DIST_DIR / "0.metadata"
    meta.write_bytes(pickle.dumps(Metadata({}, {LocalTensorIndex("w", (0,)): name}, {})))
    with pytest.raises(CheckpointError, match=f"refusing {meta}: it names the data file {name!r}, which is not"):
        resolve_resume_path(str(ckpt), str(tmp_path / "out"))


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


@pytest.fixture(params=["plain", "desync"])
def crafted_model_dir(tmp_path, marker, request):
    """(model directory, its crafted model_state.pdparams, the reason the refusal gives)."""
    model_dir = tmp_path / "model"
    Qwen2VLConfig.preset("tiny").save_pretrained(str(model_dir))
    planted = model_dir / "model_state.pdparams"
    if request.param == "desync":
        planted.write_bytes(desync_pickle(marker))
        return model_dir, planted, DESYNC_REASON
    return model_dir, plant(planted, marker), "unexpected global posix.system"


def test_infer_refuses_a_crafted_pdparams(crafted_model_dir, capsys):
    model_dir, planted, reason = crafted_model_dir
    assert infer_main(["--model", str(model_dir), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(planted) in err and reason in err


def test_training_refuses_a_crafted_pdparams_as_model_name_or_path(crafted_model_dir):
    model_dir, planted, reason = crafted_model_dir
    cfg = load_run_config("sft", None, {"model_name_or_path": str(model_dir)})
    model = build_model(cfg)  # lazy: the weights are read after the plan is applied (Trainer.load_weights)
    with pytest.raises(FormatError, match=f"{planted}: .*{reason}"):
        load_sharded(model, str(model_dir))


def test_lora_adapter_refuses_a_crafted_pdparams(tmp_path, marker):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / LORA_CONFIG_NAME).write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": []}))
    planted = plant(adapter / LORA_WEIGHTS_NAME, marker)
    with pytest.raises(FormatError, match=f"{planted}: .*unexpected global posix.system"):
        read_adapter(adapter)


def test_L9_serve_refuses_a_crafted_pdparams_in_one_line(crafted_model_dir, capsys):
    from launch.serve import serve_main

    model_dir, planted, reason = crafted_model_dir
    assert serve_main(["--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(planted) in err and reason in err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    save_tiny_model(directory)
    return directory


def adapter_dir(root: Path, weights: bytes) -> Path:
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / LORA_CONFIG_NAME).write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (adapter / LORA_WEIGHTS_NAME).write_bytes(weights)
    return adapter


@pytest.fixture
def no_server(monkeypatch):
    """`serve` must stop before it listens: on a refused adapter it would otherwise serve until killed."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("the server started"))


@pytest.mark.parametrize("command", ["infer", "serve", "merge-lora"])
def test_C1_desync_adapter_is_refused_by_every_adapter_reader(tmp_path, marker, tiny_model_dir, command, no_server,
                                                              capsys):
    adapter = adapter_dir(tmp_path, desync_pickle(marker))
    argv = {"infer": ["infer", "--model", str(tiny_model_dir), "--lora", str(adapter), "--prompt", "Hi"],
            "serve": ["serve", "--model", str(tiny_model_dir), "--lora", str(adapter)],
            "merge-lora": ["merge-lora", "--base", str(tiny_model_dir), "--lora", str(adapter),
                           "--out", str(tmp_path / "merged")]}[command]
    assert cli.main(argv) != 0
    captured = capsys.readouterr()
    one_line_naming(captured.out + captured.err, adapter / LORA_WEIGHTS_NAME, DESYNC_REASON)


@pytest.mark.parametrize("command", ["merge-ckpt", "inspect", "merge-lora"])
def test_C1_desync_checkpoint_is_refused_by_the_checkpoint_tools(tmp_path, marker, command, capsys):
    ckpt = tmp_path / "checkpoint-1"
    planted = plant_desync_checkpoint(ckpt, marker, RESUMED_KEYS)
    argv = {"merge-ckpt": ["merge-ckpt", "--ckpt", str(ckpt), "--out", str(tmp_path / "merged")],
            "inspect": ["inspect", str(ckpt)],
            "merge-lora": ["merge-lora", "--lora", str(ckpt), "--out", str(tmp_path / "merged")]}[command]
    assert cli.main(argv) != 0
    captured = capsys.readouterr()
    one_line_naming(captured.out + captured.err, planted, DESYNC_REASON)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", ["infer", "serve"])
def test_L8_an_adapter_without_lora_tensors_is_refused(tmp_path, tiny_model_dir, command, no_server, capsys):
    """An honest but empty adapter was folded as "0 weights" and the base model served under its name."""
    adapter = adapter_dir(tmp_path, pickle.dumps({"scale": np.ones(2, np.float32)}, protocol=4))
    argv = [command, "--model", str(tiny_model_dir), "--lora", str(adapter)] + (["--prompt", "Hi"]
                                                                                 if command == "infer" else [])
    assert cli.main(argv) == 2
    one_line_naming(capsys.readouterr().err, adapter / LORA_WEIGHTS_NAME, "holds no LoRA tensors")
