"""ckpt_tools: merge dist checkpoints of every layout, convert, inspect, corrupt inputs, bounded memory.

Run as a script (by `dist_utils.run_workers`) this file is the worker that saves a dist checkpoint of the tiny
Qwen2-VL under one layout; rank 0 also stores the gathered (unsharded) state as the reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))

# vocab 511: the mp layouts split the embedding/head unevenly (256 + 255 rows/columns)
SMALL = dict(vocab_size=511, image_token_id=505, video_token_id=506, vision_start_token_id=502,
             vision_end_token_id=503, bos_token_id=500, eos_token_id=501, pad_token_id=500)
LAYOUTS = {  # name -> (processes, dist-checkpoint file format)
    "dp2": (2, "pickle"), "mp2": (2, "pickle"), "mp2_bf16_safetensors": (2, "safetensors"),
    "sharding3": (2, "pickle"), "dp2mp2": (4, "pickle"),
}
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "attn.qkv", "mlp.fc1", "merger.mlp.0", "lm_head")
ROW = ("o_proj", "down_proj", "attn.proj", "mlp.fc2", "merger.mlp.2", "embed_tokens")


def tiny_config():
    from network.config import Qwen2VLConfig

    return dataclasses.replace(Qwen2VLConfig.preset("tiny"), tie_word_embeddings=False, **SMALL)


def build_model():
    import paddle

    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    paddle.seed(1234)
    return Qwen2VLForConditionalGeneration(tiny_config())


# ---- worker ------------------------------------------------------------------------------------------------
def mp_placement(name: str, value):
    import paddle.distributed as dist

    if any(f".{k}." in f".{name}" for k in COLUMN):  # Paddle Linear [in, out]: column parallel splits `out`
        return dist.Shard(value.ndim - 1)
    if any(f".{k}." in f".{name}" for k in ROW):
        return dist.Shard(0)
    return dist.Replicate()


def worker(out: Path, layout: str) -> None:
    import paddle
    import paddle.distributed as dist

    from autoparallel import cpu_compat
    from dist_utils import write_result

    cpu_compat.apply()
    dist.init_parallel_env()
    rank = dist.get_rank()
    model = build_model()
    if layout == "dp2mp2":
        mesh = dist.ProcessMesh([[0, 1], [2, 3]], dim_names=["dp", "mp"])
    else:
        mesh = dist.ProcessMesh([0, 1], dim_names=["dp" if layout in ("dp2", "sharding3") else "mp"])
    if layout == "sharding3":
        opt = paddle.optimizer.AdamW(1e-3, parameters=model.parameters())
        opt = dist.shard_optimizer(opt, dist.ShardingStage3("dp", mesh))
        # The tiny model's forward hits all_to_all under stage 3 on CPU (no gloo kernel); the checkpoint layout
        # only needs sharded params and moments, so one step on an L2 objective of the parameters suffices.
        paddle.add_n([(p * p).sum() for p in model.parameters()]).backward()
        opt.step()
        opt.clear_grad()
        state = {**model.state_dict(), **opt.state_dict()}
    else:
        state = {}
        for name, value in model.state_dict().items():
            placements = {"dp2": [dist.Replicate()], "dp2mp2": [dist.Replicate(), mp_placement(name, value)]}.get(
                layout, [mp_placement(name, value)])
            if layout == "mp2_bf16_safetensors" and placements[0].is_shard() and \
                    value.shape[placements[0].get_dim()] % 2:
                # dtensor_from_local (used below) infers global = 2 x local, wrong for uneven splits: Paddle
                # then records two different global shapes (inspect reports it), so keep those replicated.
                placements = [dist.Replicate()]
            state[name] = dist.shard_tensor(value, mesh, placements)
    full = {name: (dist.unshard_dtensor(v) if v.is_dist() else v).numpy() for name, v in state.items()}
    if layout == "mp2_bf16_safetensors":
        # No bf16 all_gather on CPU and a cast of a dist tensor replicates it: cast the local pieces, and the
        # gathered fp32 reference with ml_dtypes (round-to-nearest-even, as Paddle's cast).
        state = {k: dist.auto_parallel.api.dtensor_from_local(v._local_value().astype("bfloat16"), v.process_mesh,
                                                              v.placements) for k, v in state.items()}
        full = {k: v.astype(ml_dtypes.bfloat16) for k, v in full.items()}
    ckpt = out / "checkpoint-1"
    dist.save_state_dict(state, str(ckpt / "dist_ckpt"), safetensors=layout.endswith("safetensors"))
    if rank == 0:
        tiny_config().save_pretrained(str(ckpt))
        (ckpt / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
        with open(out / "reference.pkl", "wb") as f:
            pickle.dump(full, f)
    write_result(out, rank, {"saved": sorted(state)})
    dist.barrier()


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from dist_utils import run_workers

    made = {}
    for layout, (nproc, _) in LAYOUTS.items():
        out = tmp_path_factory.mktemp(layout)
        res = run_workers(Path(__file__), nproc, out, ["--layout", layout], timeout=300)
        assert res.returncode == 0 and len(res.results) == nproc, res.logs()
        with open(out / "reference.pkl", "rb") as f:
            made[layout] = (out / "checkpoint-1", pickle.load(f))
    return made


@pytest.fixture(scope="module")
def single_process_state():
    model = build_model()
    return {k: v.numpy() for k, v in model.state_dict().items()}, model


def _linear(name: str) -> bool:
    from network.weights import is_linear_weight

    return is_linear_weight(name)


def _load_safetensors_dir(path: Path) -> dict[str, np.ndarray]:
    from network.weights import index_weights

    return {s.name: s.read() for s in index_weights(str(path))}


def _assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


# ---- unit tests --------------------------------------------------------------------------------------------
def test_lazy_pickle_index_reads_what_paddle_load_reads(tmp_path):
    import paddle

    from network.formats import index_pickle, read_ref

    state = {"big": paddle.randn([300, 200]), "small": paddle.randn([7]), "bf16": paddle.randn([90, 5]).astype(
        "bfloat16"), "scalar": paddle.to_tensor(2.5), "ints": paddle.arange(70000, dtype="int64")}
    paddle.save(state, str(tmp_path / "x.pdparams"))
    refs = index_pickle(str(tmp_path / "x.pdparams"))
    assert sorted(refs) == sorted(state)
    for name, ref in refs.items():
        np.testing.assert_array_equal(read_ref(ref), state[name].numpy())


def test_flat_range_boxes_cover_exactly_the_range():
    from ckpt_tools.distckpt import _flat_range_boxes

    for shape in [(5,), (3, 4), (2, 3, 4), (4, 1, 3)]:
        n = int(np.prod(shape))
        for start in range(n):
            for stop in range(start + 1, n + 1):
                hits = np.zeros(shape, int)
                for first, (off, shp) in _flat_range_boxes(shape, start, stop):
                    assert np.ravel_multi_index(off, shape) == first
                    hits[tuple(slice(o, o + s) for o, s in zip(off, shp))] += 1
                expected = np.zeros(n, int)
                expected[start:stop] = 1
                np.testing.assert_array_equal(hits.reshape(-1), expected)


def test_writers_shard_transpose_cast(tmp_path):
    import paddle
    from safetensors import safe_open

    from network.formats import index_safetensors, read_ref
    from network.writers import PlannedTensor, ShardedWriter

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((7, 5), np.float32), "b": np.arange(6, dtype=np.int64),
              "c": rng.standard_normal((40, 9), np.float32)}
    for fmt in ("safetensors", "paddle"):
        plan = [PlannedTensor("a", (5, 7), np.dtype(ml_dtypes.bfloat16), True),
                PlannedTensor("b", (6,), np.dtype(np.int64)), PlannedTensor("c", (40, 9), np.dtype(np.float16))]
        writer = ShardedWriter(str(tmp_path), fmt, "w" + fmt, plan, shard_size=100)
        for name, array in arrays.items():
            writer.write(name, array)
        files = writer.finish()
        assert len(files) == 4 and files[-1].endswith(".index.json")
        loaded = {}
        for file in files[:-1]:
            path = str(tmp_path / file)
            if fmt == "paddle":
                loaded.update({k: v.astype("float32").numpy() if v.dtype == paddle.bfloat16 else v.numpy()
                               for k, v in paddle.load(path).items()})
            else:
                with safe_open(path, framework="np") as f:  # the reference parser accepts the header
                    names = list(f.keys())
                refs = index_safetensors(path)
                assert sorted(names) == sorted(refs)
                loaded.update({k: read_ref(r).astype(np.float32) for k, r in refs.items()})
        np.testing.assert_array_equal(loaded["a"], arrays["a"].T.astype(ml_dtypes.bfloat16).astype(np.float32))
        np.testing.assert_array_equal(loaded["b"], arrays["b"])
        np.testing.assert_array_equal(loaded["c"], arrays["c"].astype(np.float16))


# ---- merging every layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_matches_reference_and_paddle(checkpoints, single_process_state, layout, tmp_path):
    import paddle
    from paddle.distributed.flex_checkpoint.dcp.load_state_dict import load_merged_state_dict

    from ckpt_tools.merge import merge_dist_checkpoint

    ckpt, reference = checkpoints[layout]
    single, _ = single_process_state
    st = merge_dist_checkpoint(str(ckpt), str(tmp_path / "st"), "safetensors", include_optimizer=True,
                               progress=False)
    merge_dist_checkpoint(str(ckpt / "dist_ckpt"), str(tmp_path / "pd"), "paddle", progress=False)
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "st"))
    generation = json.loads((tmp_path / "st" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 500, "eos_token_id": 501, "pad_token_id": 500}

    merged_hf = _load_safetensors_dir(tmp_path / "st")  # HF layout on disk, back to Paddle layout here
    merged_pd = {k: v.astype("float32").numpy() if v.dtype == paddle.bfloat16 else v.numpy()
                 for k, v in paddle.load(str(tmp_path / "pd" / "model_state.pdparams")).items()}
    paddle_merged = load_merged_state_dict(str(ckpt / "dist_ckpt"), safetensors=LAYOUTS[layout][1] == "safetensors")
    model_keys = [k for k in reference if k in single]
    assert sorted(merged_pd) == sorted(model_keys) and st["tensors"] == len(reference)
    for name in model_keys:
        expect = reference[name]
        as_f32 = expect.astype(np.float32)
        got_hf = merged_hf[name].T if _linear(name) else merged_hf[name]
        assert got_hf.dtype == expect.dtype and got_hf.shape == expect.shape, name
        assert np.ascontiguousarray(got_hf).tobytes() == np.ascontiguousarray(expect).tobytes(), name  # bit-exact
        np.testing.assert_array_equal(merged_pd[name], as_f32, name)
        theirs = paddle_merged[name]
        theirs = theirs.astype("float32").numpy() if theirs.dtype == paddle.bfloat16 else theirs.numpy()
        np.testing.assert_array_equal(theirs, as_f32, name)
        if layout != "sharding3":  # no training step: the single-process init itself
            np.testing.assert_array_equal(as_f32, single[name].astype(np.float32) if "bf16" not in layout
                                          else single[name].astype(ml_dtypes.bfloat16).astype(np.float32), name)
    if layout == "sharding3":
        from network.formats import index_safetensors, read_ref

        optim = {k: read_ref(r) for k, r in index_safetensors(str(tmp_path / "st" / "optimizer.safetensors")).items()}
        assert optim and sorted(optim) == sorted(k for k in reference if k not in single)
        for name, value in optim.items():
            np.testing.assert_array_equal(value, reference[name], name)


def test_merged_safetensors_loads_in_transformers_with_our_logits(checkpoints, single_process_state, tmp_path):
    import paddle
    import torch
    import transformers
    from hf_oracle import Sample, build_batch

    from ckpt_tools.convert import convert
    from ckpt_tools.merge import merge_dist_checkpoint
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    ckpt, _ = checkpoints["dp2mp2"]
    _, ours = single_process_state
    merge_dist_checkpoint(str(ckpt), str(tmp_path / "hf"), "safetensors", shard_size=200_000, progress=False)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32,
                                                                      attn_implementation="eager").eval()
    batch = build_batch(tiny_config(), [Sample(4, [("image", (1, 4, 6))], 5)], "right", seed=3)
    with torch.no_grad():
        hf_logits = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    ours.eval()
    with paddle.no_grad():
        our_logits = ours(**{k: paddle.to_tensor(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(hf_logits - our_logits).max() < 1e-4

    # convert round trip: safetensors -> pdparams (our loader, same logits) -> safetensors (same bytes)
    convert(str(tmp_path / "hf"), str(tmp_path / "pd"), "paddle", progress=False)
    reloaded = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "pd"))
    with paddle.no_grad():
        np.testing.assert_array_equal(reloaded(**{k: paddle.to_tensor(v) for k, v in batch.items()}).logits.numpy(),
                                      our_logits)
    convert(str(tmp_path / "pd"), str(tmp_path / "hf2"), "safetensors", progress=False)
    first, second = _load_safetensors_dir(tmp_path / "hf"), _load_safetensors_dir(tmp_path / "hf2")
    assert sorted(first) == sorted(second)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert (tmp_path / "hf2" / "tokenizer_config.json").is_file()


def test_merge_dtype_prefix_and_cli(checkpoints, tmp_path, capsys):
    from ckpt_tools.cli import inspect_main, merge_ckpt_main
    from network.formats import index_pickle

    ckpt, reference = checkpoints["mp2"]
    assert merge_ckpt_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bf"), "--format", "paddle",
                            "--dtype", "bf16", "--no_progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == len(reference) and summary["peak_rss_bytes"] > 0
    refs = index_pickle(str(tmp_path / "bf" / "model_state.pdparams"))
    assert {r.dtype for r in refs.values()} == {np.dtype(np.uint16)}  # Paddle's bf16 storage
    # an existing non-empty output is refused, the first result kept
    assert merge_ckpt_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bf"), "--no_progress"]) == 1
    assert inspect_main([str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "COMPLETE" in text and "model.embed_tokens.weight" in text and "@[256, 0]+[255, 128]" in text
    assert inspect_main([str(tmp_path / "bf")]) == 0


def test_flattened_slices_and_prefix(tmp_path):
    """ShardedWeight-style flat ranges (sharding v2 layouts) under a `{"model": ..., "optimizer": ...}` nesting."""
    from paddle.distributed.flex_checkpoint.dcp.metadata import LocalTensorIndex, LocalTensorMetadata, Metadata

    from ckpt_tools.merge import merge_dist_checkpoint

    dist_dir = tmp_path / "dist_ckpt"
    dist_dir.mkdir()
    weight = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    moment = np.arange(6, dtype=np.float32) / 3
    meta = Metadata(state_dict_metadata={}, storage_metadata={}, flat_mapping={})
    files = [{}, {}]
    cuts = {"model.w": (weight, [(0, 17), (17, 60)]), "optimizer.w_moment1_0": (moment, [(0, 6)])}
    for key, (value, ranges) in cuts.items():
        meta.state_dict_metadata[key] = []
        for rank, (a, b) in enumerate(ranges):
            zero = (0,) * value.ndim
            meta.state_dict_metadata[key].append(LocalTensorMetadata(zero, value.shape, "float32", value.shape,
                                                                     True, (a, b)))
            meta.storage_metadata[LocalTensorIndex(key, zero, True, (a, b), local_shape=value.shape)] = \
                f"{rank}_0.distcp"
            files[rank][key] = value.reshape(-1)[a:b].copy()
    for rank, state in enumerate(files):
        with open(dist_dir / f"{rank}_0.distcp", "wb") as f:
            pickle.dump(state, f, protocol=4)
    with open(dist_dir / "0.metadata", "wb") as f:
        pickle.dump(meta, f, protocol=4)
    summary = merge_dist_checkpoint(str(dist_dir), str(tmp_path / "out"), "safetensors", prefix="model",
                                    progress=False)
    assert summary["tensors"] == 1 and summary["skipped_optimizer_tensors"] == 1
    merged = _load_safetensors_dir(tmp_path / "out")
    assert list(merged) == ["w"]
    np.testing.assert_array_equal(merged["w"], weight)


# ---- corrupt inputs ----------------------------------------------------------------------------------------
def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "dist_ckpt"


def _rewrite_metadata(dist_dir: Path, edit) -> None:
    import paddle

    path = dist_dir / "0.metadata"
    meta = paddle.load(str(path))
    edit(meta)
    with open(path, "wb") as f:
        pickle.dump(meta, f, protocol=4)


def _drop_slice(meta, key):
    meta.state_dict_metadata[key] = meta.state_dict_metadata[key][:1]


def _shift_slice(meta, key):
    first, second = meta.state_dict_metadata[key]
    meta.state_dict_metadata[key] = [first, dataclasses.replace(second, global_offset=(1, 0))]
    for idx in list(meta.storage_metadata):
        if idx.tensor_key == key and idx.global_offset == second.global_offset:
            meta.storage_metadata[dataclasses.replace(idx, global_offset=(1, 0))] = meta.storage_metadata.pop(idx)


DOWN = "model.layers.0.mlp.down_proj.weight"  # Shard(0) in both mp2 variants
CORRUPTIONS = {  # case -> (damage(dist_dir, data-file suffix), expected message)
    "missing_file": (lambda d, x: (d / f"1_0.{x}").unlink(), r"missing file 1_0\.{x}"),
    "truncated_payload": (lambda d, x: os.truncate(d / f"1_0.{x}", os.path.getsize(d / f"1_0.{x}") - 1000),
                          r"1_0\.{x}: truncated"),
    "truncated_header": (lambda d, x: os.truncate(d / f"0_0.{x}", 100), r"0_0\.{x}: truncated"),
    "missing_slice": (lambda d, x: _rewrite_metadata(d, lambda m: _drop_slice(m, DOWN)),
                      r"'model\.layers\.0\.mlp\.down_proj\.weight' \[256, 128\]: slices cover 16384 of 32768"),
    "overlapping_slices": (lambda d, x: _rewrite_metadata(d, lambda m: _shift_slice(m, DOWN)),
                           r"'model\.layers\.0\.mlp\.down_proj\.weight': overlapping slices"),
    "config_mismatch": (lambda d, x: (d.parent / "config.json").write_text(
        (d.parent / "config.json").read_text().replace('"intermediate_size": 256', '"intermediate_size": 320')),
        r"'model\.layers\.0\.mlp\.gate_proj\.weight' in 0_0\.{x}, 1_0\.{x} has shape \[128, 256\], "
        r"config\.json .* implies \[128, 320\]"),
}


@pytest.mark.parametrize("layout", ["mp2", "mp2_bf16_safetensors"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_input_clear_error_and_no_output(checkpoints, tmp_path, case, layout):
    from ckpt_tools.distckpt import CheckpointError
    from ckpt_tools.inspect import inspect_path
    from ckpt_tools.merge import merge_dist_checkpoint

    damage, message = CORRUPTIONS[case]
    suffix = "safetensors" if layout.endswith("safetensors") else "distcp"
    dist_dir = _corrupt_copy(checkpoints[layout][0], tmp_path / "checkpoint-1")
    damage(dist_dir, suffix)
    for fmt in ("safetensors", "paddle"):
        out = tmp_path / f"merged-{fmt}"
        with pytest.raises(CheckpointError, match=message.replace("{x}", suffix)) as err:
            merge_dist_checkpoint(str(dist_dir.parent), str(out), fmt, progress=False)
        _assert_no_output(out)
    print(f"[corrupt] {layout}/{case}: {str(err.value).splitlines()[-1].strip()}")
    report = inspect_path(str(dist_dir.parent))
    assert not report.complete and "INCOMPLETE" in report.render()


def test_failure_while_writing_leaves_no_output(checkpoints, tmp_path, monkeypatch):
    from ckpt_tools import distckpt
    from ckpt_tools.merge import merge_dist_checkpoint

    calls = []
    original = distckpt.DistCheckpoint.read

    def failing_read(self, key):
        calls.append(key)
        if len(calls) == 5:
            raise OSError("disk went away")
        return original(self, key)

    monkeypatch.setattr(distckpt.DistCheckpoint, "read", failing_read)
    with pytest.raises(OSError):
        merge_dist_checkpoint(str(checkpoints["dp2"][0]), str(tmp_path / "out"), progress=False)
    _assert_no_output(tmp_path / "out")


# ---- memory ------------------------------------------------------------------------------------------------
def _write_synthetic_checkpoint(root: Path, layers: int, hidden: int, vocab: int) -> int:
    """A 2-rank dist checkpoint written directly in Paddle's format (pickled numpy dicts + Metadata):
    per layer up/down projections (Shard(1)/Shard(0) over 2 ranks) and a norm (replicated), plus a vocab x
    hidden embedding split on dim 0 and an lm_head split on dim 1. Returns the largest tensor's bytes."""
    from paddle.distributed.flex_checkpoint.dcp.metadata import LocalTensorIndex, LocalTensorMetadata, Metadata

    dist_dir = root / "dist_ckpt"
    dist_dir.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": ((vocab, hidden), 0), "lm_head.weight": ((hidden, vocab), 1)}
    for i in range(layers):
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = ((hidden, 2 * hidden), 1)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = ((2 * hidden, hidden), 0)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = ((hidden,), None)
    meta = Metadata(state_dict_metadata={}, storage_metadata={}, flat_mapping={})
    ranks = [{}, {}]
    for name, (shape, dim) in shapes.items():
        value = np.full(shape, len(meta.state_dict_metadata) / 7, dtype=np.float32)
        pieces = [((0,) * len(shape), value, 0)] if dim is None else []
        if dim is not None:
            half = shape[dim] // 2
            for r, (a, b) in enumerate(((0, half), (half, shape[dim]))):
                offset = tuple(a if d == dim else 0 for d in range(len(shape)))
                pieces.append((offset, np.ascontiguousarray(np.take(value, range(a, b), axis=dim)), r))
        meta.state_dict_metadata[name] = []
        for offset, part, rank in pieces:
            meta.state_dict_metadata[name].append(LocalTensorMetadata(offset, part.shape, "float32", shape))
            meta.storage_metadata[LocalTensorIndex(name, offset, local_shape=part.shape)] = f"{rank}_0.distcp"
            ranks[rank][name] = part
        meta.flat_mapping[name] = (name,)
    for rank, state in enumerate(ranks):
        with open(dist_dir / f"{rank}_0.distcp", "wb") as f:
            pickle.dump(state, f, protocol=4)  # what paddle.save does for a dict of arrays
    with open(dist_dir / "0.metadata", "wb") as f:
        pickle.dump(meta, f, protocol=4)
    return max(int(np.prod(s)) * 4 for s, _ in shapes.values())


def _child_json(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_merge_peak_memory_is_one_tensor(tmp_path):
    """2.5 GiB fp32 checkpoint, 20 tensors, largest 512 MiB: merge to both formats in a child process."""
    largest = _write_synthetic_checkpoint(tmp_path / "checkpoint-1", layers=6, hidden=4096, vocab=32768)
    try:
        baseline = _child_json("import json, ckpt_tools.merge, ckpt_tools.cli\n"
                               "print(json.dumps(ckpt_tools.merge.peak_rss_bytes()))")
        overhead = baseline + (128 << 20)  # imports + conversion chunks / bookkeeping
        for fmt in ("safetensors", "paddle"):
            summary = _child_json(
                "import json\nfrom ckpt_tools.merge import merge_dist_checkpoint\n"
                f"print(json.dumps(merge_dist_checkpoint({str(tmp_path / 'checkpoint-1')!r}, "
                f"{str(tmp_path / fmt)!r}, {fmt!r}, progress=False)))")
            print(f"[memory] {fmt}: {summary['bytes'] / 2**30:.2f} GiB, {summary['tensors']} tensors in "
                  f"{summary['seconds']} s, peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB; largest tensor "
                  f"{largest / 2**20:.0f} MiB, import baseline {baseline / 2**20:.0f} MiB")
            assert summary["peak_rss_bytes"] < 1.5 * largest + overhead
            shutil.rmtree(tmp_path / fmt)
    finally:
        shutil.rmtree(tmp_path / "checkpoint-1")  # pytest keeps old tmp dirs; do not leave GBs behind


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layout", choices=list(LAYOUTS), required=True)
    args = parser.parse_args()
    worker(args.out, args.layout)
