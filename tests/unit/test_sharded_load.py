"""Lazy start-up pieces: slice reads straight from the weight files (all four layouts, HF transposition), the slice
of each rank, lazy models that allocate nothing until loaded, bf16 kept bit-exact."""
from __future__ import annotations

import dataclasses

from types import SimpleNamespace

import ml_dtypes
import numpy as np
import paddle
import paddle.distributed as dist
import pytest
from hf_oracle import tiny_config

from autoparallel.sharded_load import lazy_parameters, local_box, local_range, read_local
from network import weights
from network.formats import index_safetensors, read_ref_slice
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.writers import ShardedWriter, PlannedTensor


@pytest.fixture(scope="module")
def model():
    paddle.seed(3)
    return Qwen2VLForConditionalGeneration(tiny_config(tied=False))


@pytest.mark.parametrize("fmt, shard", [("safetensors", None), ("safetensors", 1 << 20), ("paddle", None),
                                        ("paddle", 1 << 20)])
def test_slices_read_from_every_layout_equal_slices_of_the_tensor(model, tmp_path, fmt, shard):
    weights.save_weights(model, str(tmp_path), format=fmt, max_shard_bytes=shard)
    sources = {s.name: s for s in weights.index_weights(str(tmp_path))}
    state = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias",
                 "visual.patch_embed.proj.weight"):
        full = state[name].numpy()
        source = sources[name]
        assert source.ref is not None
        for dim in range(full.ndim):
            size = full.shape[dim]
            for start, stop in ((0, size // 2), (size // 2, size), (1, max(2, size // 3))):
                got = source.read_paddle_slice(dim, start, stop)
                expected = full[(slice(None),) * dim + (slice(start, stop),)]
                assert got.flags.c_contiguous
                np.testing.assert_array_equal(got, expected, err_msg=f"{name} dim {dim} {start}:{stop}")


def test_column_slices_map_only_blocks_of_the_file(tmp_path):
    array = np.arange(6 * 5, dtype=np.float32).reshape(6, 5).astype(ml_dtypes.bfloat16)
    writer = ShardedWriter(str(tmp_path), "safetensors", "model", [PlannedTensor("w", (6, 5), array.dtype)], None)
    writer.write("w", array)
    files = writer.finish()
    (ref,) = index_safetensors(str(tmp_path / files[0])).values()
    np.testing.assert_array_equal(read_ref_slice(ref, 1, 1, 4), array[:, 1:4])
    np.testing.assert_array_equal(read_ref_slice(ref, 0, 2, 5), array[2:5])
    with pytest.raises(ValueError, match="outside dim 1"):
        read_ref_slice(ref, 1, 3, 9)


def test_local_range_matches_paddles_ceil_split():
    assert [local_range(10, 4, i) for i in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [local_range(8, 2, i) for i in range(2)] == [(0, 4), (4, 8)]


def test_local_box_per_rank_on_a_dp_x_mp_mesh():
    mesh = SimpleNamespace(process_ids=[0, 1, 2, 3], shape=[2, 2])  # ["dp", "mp"], rank = 2 * dp + mp
    col = SimpleNamespace(shape=[8, 6], process_mesh=mesh, placements=[dist.Replicate(), dist.Shard(1)])
    assert local_box(col, 3) == [(0, 8), (3, 6)] and local_box(col, 2) == [(0, 8), (0, 3)]
    zero3 = SimpleNamespace(shape=[8, 6], process_mesh=mesh, placements=[dist.Shard(0), dist.Shard(1)])
    assert local_box(zero3, 1) == [(0, 4), (3, 6)] and local_box(zero3, 2) == [(4, 8), (0, 3)]
    nested = SimpleNamespace(shape=[8], process_mesh=mesh, placements=[dist.Shard(0), dist.Shard(0)])
    assert [local_box(nested, r) for r in range(4)] == [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 8)]]


def test_read_local_of_a_two_dim_box(model, tmp_path):
    weights.save_weights(model, str(tmp_path))
    source = {s.name: s for s in weights.index_weights(str(tmp_path))}["model.layers.0.mlp.up_proj.weight"]
    full = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    np.testing.assert_array_equal(read_local(source, [(2, 5), (1, 7)]), full[2:5, 1:7])
    np.testing.assert_array_equal(read_local(source, [(0, full.shape[0]), (0, full.shape[1])]), full)


def test_lazy_model_allocates_nothing_and_loads_like_the_eager_one(model, tmp_path):
    model.save_pretrained(str(tmp_path))
    lazy = Qwen2VLForConditionalGeneration.lazy(model.config)
    assert len(lazy_parameters(lazy)) == len(lazy.state_dict())
    weights.load_weights(lazy, str(tmp_path))
    assert lazy_parameters(lazy) == []
    for (name, p), q in zip(model.state_dict().items(), lazy.state_dict().values()):
        np.testing.assert_array_equal(q.numpy(), p.numpy(), err_msg=name)


def test_bf16_checkpoint_loads_bit_exactly_in_bf16_and_widened_in_fp32(model, tmp_path):
    bf16 = {n: p.numpy().astype(ml_dtypes.bfloat16) for n, p in model.state_dict().items()}
    hf = {n: weights.to_hf_layout(n, a) for n, a in bf16.items()}
    weights.write_safetensors(hf.items(), str(tmp_path))
    model.config.save_pretrained(str(tmp_path))
    as_bf16 = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), "bfloat16")
    as_fp32 = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), "float32")
    for name, array in bf16.items():
        p16, p32 = as_bf16.state_dict()[name], as_fp32.state_dict()[name]
        assert p16.dtype == paddle.bfloat16 and p32.dtype == paddle.float32
        np.testing.assert_array_equal(p16.numpy(), array.view(np.uint16), err_msg=name)  # Paddle shows bf16 bits
        np.testing.assert_array_equal(p32.numpy(), array.astype(np.float32), err_msg=name)


def test_amp_decorate_keeps_a_lazy_bf16_model_lazy(model):
    lazy = Qwen2VLForConditionalGeneration.lazy(model.config, "bfloat16")
    optimizer = paddle.optimizer.AdamW(parameters=lazy.parameters(), multi_precision=True)
    decorated, _ = paddle.amp.decorate(models=lazy, optimizers=optimizer, level="O2", dtype="bfloat16",
                                       master_weight=True, master_grad=True)
    assert len(lazy_parameters(decorated)) == len(decorated.state_dict())
    assert {p.dtype for p in decorated.parameters()} == {paddle.bfloat16}


def test_load_errors_list_every_problem(model, tmp_path):
    model.save_pretrained(str(tmp_path))
    fewer = dataclasses.replace(model.config, num_hidden_layers=model.config.num_hidden_layers - 1)
    other = Qwen2VLForConditionalGeneration.lazy(fewer)
    last = model.config.num_hidden_layers - 1
    with pytest.raises(ValueError, match=f"unexpected key 'model.layers.{last}.self_attn.q_proj.weight'"):
        weights.load_weights(other, str(tmp_path))
    pairs = weights.match_weights(other, str(tmp_path), part=True)  # a pipeline stage skips what it lacks
    assert len(pairs) == len(other.state_dict())
