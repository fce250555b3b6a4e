"""merge-lora: adapters of our engine (files and dist checkpoint) and of paddlenlp folded into every base format,
merged logits equal the LoRA model's (ours and HF transformers), corrupt inputs, bounded memory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import paddle
import pytest

from autoparallel.engine.lora_trainer import gather_adapter
from ckpt_tools.convert import convert
from ckpt_tools.distckpt import CheckpointError, DistCheckpoint
from network.formats import FormatError, index_file
from ckpt_tools.lora_merge import LoraMergeError, merge_lora, merged_weight
from network.lora import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME, PADDLEMIX_TARGETS, LoraArgs, apply_lora, save_adapter
from network.weights import index_weights
from hf_oracle import Sample, build_batch, tiny_config
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

REPO = Path(__file__).resolve().parents[2]
# untied small-vocab tiny model; adapters on every decoder projection, two ViT layers, the merger and the
# (untied) head
ARGS = LoraArgs(lora_rank=4, lora_alpha=32, lora_target_modules=PADDLEMIX_TARGETS + [
    "visual.blocks.0.attn.qkv", "visual.blocks.1.mlp.fc1", "visual.merger.mlp.2", "lm_head"])
ADAPTED = 7 * 2 + 2 + 2
Q_PROJ = "model.layers.0.self_attn.q_proj"


def model_logits(model, batch: dict) -> np.ndarray:
    model.eval()
    with paddle.no_grad():
        return model(**{k: paddle.to_tensor(v) for k, v in batch.items()}).logits.numpy()


def merged_logits(directory: Path, batch: dict) -> np.ndarray:
    return model_logits(Qwen2VLForConditionalGeneration.from_pretrained(str(directory)), batch)


def weight_names(directory: Path) -> list[str]:
    return [s.name for s in index_weights(str(directory))]


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


@pytest.fixture(scope="module")
def batch() -> dict:
    return build_batch(tiny_config(tied=False), [Sample(4, [("image", (1, 4, 6))], 5), Sample(7, [], 3)], seed=3)


@pytest.fixture(scope="module")
def lora_case(tmp_path_factory, batch):
    """Base model saved as pdparams and as sharded safetensors, its LoRA model's logits, the exported adapter."""
    root = tmp_path_factory.mktemp("lora_case")
    paddle.seed(7)
    model = Qwen2VLForConditionalGeneration(tiny_config(tied=False))
    model.save_pretrained(str(root / "base_pd"), format="paddle")
    convert(str(root / "base_pd"), str(root / "base_st"), "safetensors", shard_size=400_000, progress=False)
    assert (root / "base_st" / "model.safetensors.index.json").is_file()
    apply_lora(model, ARGS)
    for name, param in model.named_parameters():
        if name.endswith(".lora_B"):  # trained adapters: B is no longer zero
            param.set_value(paddle.randn(param.shape) * 0.05)
    save_adapter(root / "adapter", gather_adapter(model), ARGS, "tiny")
    return root, model_logits(model, batch), model


# ---- the update itself ---------------------------------------------------------------------------------------
def test_merged_weight_layouts_blocks_and_dtypes(monkeypatch):
    from ckpt_tools import lora_merge

    monkeypatch.setattr(lora_merge, "_BLOCK_BYTES", 4 * 9 * 3)  # 3 rows per block: several blocks, a partial one
    rng = np.random.default_rng(0)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((10, 9), (10, 3), (3, 9)))
    expect = w + (a @ b) * np.float32(2.5)
    got = merged_weight(w.copy(), "paddle", a, b, 2.5, np.dtype(np.float32))
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
    hf = merged_weight(np.ascontiguousarray(w.T), "hf", a, b, 2.5, np.dtype(np.float32))
    np.testing.assert_allclose(hf, expect.T, rtol=1e-6, atol=1e-6)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    base = w.astype(bf16)
    exact = base.astype(np.float32) + (a.astype(bf16).astype(np.float32) @ b.astype(bf16).astype(np.float32)) * 2.5
    in_place = merged_weight(base, "paddle", a.astype(bf16), b.astype(bf16), 2.5, bf16)
    assert in_place is base and in_place.dtype == bf16  # computed in fp32, cast once to the base dtype
    np.testing.assert_array_equal(in_place.astype(np.float32), exact.astype(bf16).astype(np.float32))
    wide = merged_weight(w.astype(bf16), "paddle", a, b, 2.5, np.dtype(np.float32))
    np.testing.assert_allclose(wide, w.astype(bf16).astype(np.float32) + (a @ b) * 2.5, rtol=1e-6, atol=1e-6)


# ---- adapter files ---------------------------------------------------------------------------------------------
def test_sharded_safetensors_base_to_paddle(lora_case, batch, tmp_path):
    root, expected, _ = lora_case
    summary = merge_lora(str(root / "base_st"), str(root / "adapter"), str(tmp_path / "out"), "paddle",
                         progress=False)
    assert summary["merged"] == ADAPTED and summary["scaling"] == 8.0 and summary["peak_rss_bytes"] > 0
    assert (tmp_path / "out" / "model_state.pdparams").is_file()
    assert not any("lora" in n for n in index_file(str(tmp_path / "out" / "model_state.pdparams")))
    np.testing.assert_allclose(merged_logits(tmp_path / "out", batch), expected, rtol=0, atol=1e-5)
    # neither input has a tokenizer: the embedded one and the processor files are written
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.jinja"} <= files


def test_pdparams_base_to_safetensors_loads_in_transformers(lora_case, batch, tmp_path):
    import torch
    import transformers

    from network.tokenizer import embedded_tokenizer_dir

    root, expected, _ = lora_case
    adapter = tmp_path / "adapter"  # an adapter directory with tokenizer files (e.g. a checkpoint-N)
    shutil.copytree(root / "adapter", adapter)
    shutil.copy(Path(embedded_tokenizer_dir()) / "tokenizer.json", adapter)
    (adapter / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    merge_lora(str(root / "base_pd"), str(adapter), str(tmp_path / "out"), progress=False)
    names = weight_names(tmp_path / "out")
    assert "lm_head.weight" in names and not any("lora" in n for n in names)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"model_max_length": 77}
    np.testing.assert_allclose(merged_logits(tmp_path / "out", batch), expected, rtol=0, atol=1e-5)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        str(tmp_path / "out"), torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(hf_logits - expected).max() < 1e-4


def test_paddlenlp_lora_model_files_with_and_without_prefix(lora_case, batch, tmp_path):
    from paddlenlp.peft import LoRAModel

    root, expected, _ = lora_case
    plain = Qwen2VLForConditionalGeneration(tiny_config(tied=False))
    plain.config.tensor_parallel_degree = 1  # LoRAModel reads this PretrainedConfig field
    LoRAModel.from_pretrained(plain, str(root / "adapter")).save_pretrained(str(tmp_path / "pn"))
    config = json.loads((tmp_path / "pn" / LORA_CONFIG_NAME).read_text())
    assert "do_qat" in config and config["lora_alpha"] == 32  # paddlenlp's own LoRAConfig file, not ours
    merge_lora(str(root / "base_st"), str(tmp_path / "pn"), str(tmp_path / "out"), "paddle", progress=False)
    np.testing.assert_allclose(merged_logits(tmp_path / "out", batch), expected, rtol=0, atol=1e-5)

    # the names of the LoRAModel wrapper (LoRAModel.state_dict()): every key gains "model."
    state = paddle.load(str(tmp_path / "pn" / LORA_WEIGHTS_NAME))
    assert f"{Q_PROJ}.lora_A" in state and "lm_head.lora_B" in state  # the plain model's names
    paddle.save({f"model.{k}": v for k, v in state.items()}, str(tmp_path / "pn" / LORA_WEIGHTS_NAME))
    summary = merge_lora(str(root / "base_pd"), str(tmp_path / "pn"), str(tmp_path / "out2"), progress=False)
    assert summary["merged"] == ADAPTED
    np.testing.assert_allclose(merged_logits(tmp_path / "out2", batch), expected, rtol=0, atol=1e-5)


def test_trainable_modules_replace_base_tensors_and_bf16_output(lora_case, batch, tmp_path):
    root, _, model = lora_case
    shutil.copytree(root / "adapter", tmp_path / "adapter")
    state = paddle.load(str(tmp_path / "adapter" / LORA_WEIGHTS_NAME))
    norm = paddle.full([model.config.hidden_size], 0.5)
    state["model.norm.weight"] = norm  # paddlenlp writes trainable_modules next to the adapters
    paddle.save(state, str(tmp_path / "adapter" / LORA_WEIGHTS_NAME))
    summary = merge_lora(str(root / "base_st"), str(tmp_path / "adapter"), str(tmp_path / "out"), dtype="bf16",
                         progress=False)
    assert summary["replaced"] == 1
    merged = {s.name: s.read() for s in index_weights(str(tmp_path / "out"))}
    assert {a.dtype for a in merged.values()} == {np.dtype(ml_dtypes.bfloat16)}
    np.testing.assert_array_equal(merged["model.norm.weight"].astype(np.float32), 0.5)
    params = dict(model.named_parameters())
    q = params[f"{Q_PROJ}.weight"].numpy() + params[f"{Q_PROJ}.lora_A"].numpy() @ params[f"{Q_PROJ}.lora_B"].numpy() * 8
    np.testing.assert_array_equal(merged[f"{Q_PROJ}.weight"].T, q.astype(ml_dtypes.bfloat16))  # fp32 -> bf16 once


# ---- a LoRA dist checkpoint of the engine ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_run(tmp_path_factory) -> Path:
    from autoparallel.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("engine")
    meta = make_synthetic_dataset(str(root / "data"), n_train=16, n_eval=4)
    out = root / "run"
    args = ["--meta_path", str(meta), "--tensor_parallel_degree", "2", "--per_device_train_batch_size", "2",
            "--max_seq_length", "128", "--evaluation_strategy", "no", "--learning_rate", "1e-2", "--warmup_steps",
            "0", "--max_steps", "2", "--save_steps", "2", "--lora_rank", "4", "--lora_alpha", "8",
            "--lora_target_modules", ",".join(PADDLEMIX_TARGETS + ["visual.merger.mlp.2"])]
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "lora", "--output_dir", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_lora_dist_checkpoint_without_base(engine_run, tmp_path):
    ckpt = engine_run / "checkpoint-2"
    from network.config import Qwen2VLConfig

    config = Qwen2VLConfig.from_pretrained(str(ckpt))
    batch = build_batch(config, [Sample(4, [("image", (1, 4, 6))], 5)], seed=5)
    reference = Qwen2VLForConditionalGeneration(config)  # the LoRA model exactly as the checkpoint holds it
    saved = json.loads((ckpt / LORA_CONFIG_NAME).read_text())
    apply_lora(reference, LoraArgs(lora_rank=saved["r"], lora_alpha=saved["lora_alpha"],
                                   lora_target_modules=saved["target_modules"]))
    params = dict(reference.named_parameters())
    with DistCheckpoint(str(ckpt)) as ck:
        assert {k for k in ck.split_keys()[0]} == set(params)
        for name, param in params.items():
            param.set_value(ck.read(name))
    assert any(np.abs(p.numpy()).max() > 0 for n, p in params.items() if n.endswith("lora_B"))
    expected = model_logits(reference, batch)

    summary = merge_lora(None, str(ckpt), str(tmp_path / "st"), progress=False)
    assert summary["merged"] == 7 * config.num_hidden_layers + 1 and summary["adapter"].endswith("dist_ckpt")
    names = weight_names(tmp_path / "st")
    assert len(names) == len(params) - 2 * summary["merged"] and not any("lora" in n for n in names)
    assert {"tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(tmp_path / "st"))  # from checkpoint-N
    np.testing.assert_allclose(merged_logits(tmp_path / "st", batch), expected, rtol=0, atol=1e-5)

    from ckpt_tools.cli import merge_lora_main

    assert merge_lora_main(["--lora", str(ckpt / "dist_ckpt"), "--out", str(tmp_path / "pd"), "--format", "paddle",
                            "--no_progress"]) == 0
    np.testing.assert_allclose(merged_logits(tmp_path / "pd", batch), expected, rtol=0, atol=1e-5)

    # the final adapter files in output_dir on the checkpoint's base weights: the same tensors
    merge_lora(str(ckpt), str(engine_run), str(tmp_path / "files"), progress=False)
    first = {s.name: s.read() for s in index_weights(str(tmp_path / "st"))}
    second = {s.name: s.read() for s in index_weights(str(tmp_path / "files"))}
    assert sorted(first) == sorted(second)
    for name in first:
        np.testing.assert_allclose(first[name], second[name], rtol=0, atol=1e-6, err_msg=name)


# ---- bad input -------------------------------------------------------------------------------------------------
def _edit_state(directory: Path, edit) -> None:
    state = paddle.load(str(directory / LORA_WEIGHTS_NAME))
    edit(state)
    paddle.save(state, str(directory / LORA_WEIGHTS_NAME))


def _rename(state: dict, old: str, new: str) -> None:
    for suffix in (".lora_A", ".lora_B"):
        state[new + suffix] = state.pop(old + suffix)


BAD = {  # case -> (damage(adapter dir, base dir), base argument or None, expected error, message)
    "shape_mismatch": (lambda a, b: _edit_state(a, lambda s: s.update({f"{Q_PROJ}.lora_B": paddle.ones([4, 96])})),
                       "base", LoraMergeError, rf"'{Q_PROJ}\.lora_A' \[128, 4\] @ '{Q_PROJ}\.lora_B' \[4, 96\] in "
                       rf".*lora_model_state\.pdparams does not fit base '{Q_PROJ}\.weight' \[128, 128\]"),
    "key_not_in_base": (lambda a, b: _edit_state(a, lambda s: _rename(s, Q_PROJ, "model.layers.9.self_attn.q_proj")),
                        "base", LoraMergeError, r"1 adapter keys in .*lora_model_state\.pdparams target tensors the "
                                                r"base does not have: model\.layers\.9\.self_attn\.q_proj\.weight"),
    "unpaired": (lambda a, b: _edit_state(a, lambda s: s.pop(f"{Q_PROJ}.lora_B")), "base", LoraMergeError,
                 rf"'{Q_PROJ}\.lora_A' in .* has no matching '{Q_PROJ}\.lora_B'"),
    "no_config": (lambda a, b: (a / LORA_CONFIG_NAME).unlink(), "base", FileNotFoundError, r"no lora_config\.json"),
    "no_weights": (lambda a, b: (a / LORA_WEIGHTS_NAME).unlink(), "base", FileNotFoundError,
                   r"no lora_model_state\.pdparams or peft_model\.safetensors"),
    "truncated_adapter": (lambda a, b: os.truncate(a / LORA_WEIGHTS_NAME, 5000), "base", FormatError,
                          r"lora_model_state\.pdparams: truncated"),
    "truncated_base": (lambda a, b: os.truncate(sorted(b.glob("model-*.safetensors"))[1], 100), "base", FormatError,
                       r"model-00002-of-\d{5}\.safetensors: truncated"),
    "no_base_dir": (lambda a, b: shutil.rmtree(b), "base", FileNotFoundError, r"--base .*: no such directory"),
    "base_omitted": (lambda a, b: None, None, FileNotFoundError, r"--base is required"),
    "pissa": (lambda a, b: (a / LORA_CONFIG_NAME).write_text(json.dumps({"r": 4, "lora_alpha": 8, "pissa": True})),
              "base", LoraMergeError, r"pissa adapters are not merged"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_clear_error_exit_1_no_output(lora_case, tmp_path, case):
    from ckpt_tools.cli import merge_lora_main

    root, _, _ = lora_case
    damage, base_arg, error, message = BAD[case]
    adapter, base = tmp_path / "adapter", tmp_path / "base"
    shutil.copytree(root / "adapter", adapter)
    shutil.copytree(root / "base_st", base)
    damage(adapter, base)
    base_path = str(base) if base_arg else None
    with pytest.raises(error, match=message):
        merge_lora(base_path, str(adapter), str(tmp_path / "out"), progress=False)
    assert_no_output(tmp_path / "out")
    argv = (["--base", base_path] if base_path else []) + ["--lora", str(adapter), "--out", str(tmp_path / "out"),
                                                          "--no_progress"]
    assert merge_lora_main(argv) == 1
    assert_no_output(tmp_path / "out")


def test_existing_output_and_failure_while_writing(lora_case, tmp_path, monkeypatch):
    from ckpt_tools import lora_merge

    root, _, _ = lora_case
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        merge_lora(str(root / "base_st"), str(root / "adapter"), str(tmp_path / "taken"), progress=False)
    assert os.listdir(tmp_path / "taken") == ["keep"]
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk went away")
        return merged_weight(*args, **kwargs)

    monkeypatch.setattr(lora_merge, "merged_weight", failing)
    with pytest.raises(OSError, match="disk went away"):
        merge_lora(str(root / "base_st"), str(root / "adapter"), str(tmp_path / "out"), progress=False)
    assert_no_output(tmp_path / "out")


# ---- memory ----------------------------------------------------------------------------------------------------
def _write_big_case(root: Path, layers: int, hidden: int, inter: int, rank: int) -> int:
    """HF-layout fp32 safetensors base (sharded) with many tensors + a rank-`rank` adapter on every projection.
    Returns the largest tensor's bytes."""
    from network.writers import PlannedTensor, ShardedWriter
    from network.tokenizer import TOKENIZER_FILES, embedded_tokenizer_dir

    shapes = {"model.embed_tokens.weight": (8192, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,)})
    f32 = np.dtype(np.float32)
    base = root / "base"
    base.mkdir(parents=True)
    writer = ShardedWriter(str(base), "safetensors", "model", [PlannedTensor(n, s, f32) for n, s in shapes.items()],
                           shard_size=300 << 20)
    for n, s in shapes.items():
        writer.write(n, np.full(s, 0.01, f32))
    writer.finish()
    for name in TOKENIZER_FILES:  # a base with its tokenizer: nothing heavy is imported after the merge
        if os.path.isfile(os.path.join(embedded_tokenizer_dir(), name)):
            shutil.copy(os.path.join(embedded_tokenizer_dir(), name), base / name)
    rng = np.random.default_rng(0)
    state = {}
    for n, s in shapes.items():
        if n.endswith("proj.weight"):  # HF [out, in] -> adapters A [in, r], B [r, out]
            key = n[: -len(".weight")]
            state[key + ".lora_A"] = paddle.to_tensor(rng.standard_normal((s[1], rank), np.float32))
            state[key + ".lora_B"] = paddle.to_tensor(rng.standard_normal((rank, s[0]), np.float32))
    save_adapter(root / "adapter", state, LoraArgs(lora_rank=rank, lora_alpha=2 * rank, lora_target_modules=[".*"]))
    return max(int(np.prod(s)) * 4 for s in shapes.values())


def _child_json(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_merge_lora_peak_memory_is_one_tensor(tmp_path):
    """~0.77 GB fp32 base, 19 tensors (largest 64 MiB), 15 adapters: peak RSS of the child process <
    1.5 x largest + import baseline + 128 MiB (fp32 row block, writer chunk, bookkeeping)."""
    try:
        largest = _write_big_case(tmp_path, layers=3, hidden=2048, inter=8192, rank=16)
        baseline = _child_json("import json, ckpt_tools.lora_merge, ckpt_tools.cli\n"
                               "print(json.dumps(ckpt_tools.merge.peak_rss_bytes()))")
        for fmt in ("safetensors", "paddle"):
            summary = _child_json(
                "import json\nfrom ckpt_tools.lora_merge import merge_lora\n"
                f"print(json.dumps(merge_lora({str(tmp_path / 'base')!r}, {str(tmp_path / 'adapter')!r}, "
                f"{str(tmp_path / fmt)!r}, {fmt!r}, progress=False)))")
            print(f"[memory] {fmt}: {summary['bytes'] / 2**30:.2f} GiB, {summary['tensors']} tensors "
                  f"({summary['merged']} merged) in {summary['seconds']} s, peak RSS "
                  f"{summary['peak_rss_bytes'] / 2**20:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB, import "
                  f"baseline {baseline / 2**20:.0f} MiB")
            assert summary["merged"] == 15 and summary["largest_tensor_bytes"] == largest
            assert summary["peak_rss_bytes"] < 1.5 * largest + baseline + (128 << 20)
            shutil.rmtree(tmp_path / fmt)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # pytest keeps old tmp dirs; do not leave a GB behind


def test_damaged_lora_checkpoint(engine_run, tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(engine_run / "checkpoint-2", ckpt)
    (ckpt / LORA_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no lora_config\.json in .*dist_ckpt"):
        merge_lora(None, str(ckpt), str(tmp_path / "out"), progress=False)
    assert_no_output(tmp_path / "out")
    shutil.copy(engine_run / "checkpoint-2" / LORA_CONFIG_NAME, ckpt)
    (ckpt / "dist_ckpt" / "1_0.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file 1_0\.safetensors"):
        merge_lora(None, str(ckpt), str(tmp_path / "out"), progress=False)
    assert_no_output(tmp_path / "out")
