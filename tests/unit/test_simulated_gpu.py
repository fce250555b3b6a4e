"""The simulated GPU (network/simulated_gpu.py) in one process, and the fixes it was built with: N1 (decode without a
key mask), N4 (weights created on the expected place). Deliberately broken branches must fail naming the op or
the tensor; working ones must compute what the plain CPU path computes."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist
import pytest

import network.attention as attention_mod
import network.weights as weights_mod
from network import device, simulated_gpu
from network.attention import PackedRows, Segments, additive_mask, attention
from network.simulated_gpu import KernelContractError


@pytest.fixture
def simulated():
    simulated_gpu.activate()
    yield simulated_gpu.calls
    simulated_gpu.deactivate()


def _qkv(b=2, q_len=6, kv_len=6, heads=4, kv_heads=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
            for shape in ((b, q_len, heads, d), (b, kv_len, kv_heads, d), (b, kv_len, kv_heads, d))]


def _math(q, k, v, causal, mask=None):
    return attention_mod._math_attention(q, k, v, causal, mask).numpy()


def test_gates_report_a_bf16_sm90_device(simulated):
    assert device.on_gpu() and device.bf16_supported() and device.flash_attention_supported()
    assert device.device_capability() == (9, 0)
    assert device.allocation_dtype("bfloat16") == "float32" and device.allocation_dtype("float32") == "float32"
    assert not device.weights_zero_copy()


def test_gates_off_after_deactivate():
    simulated_gpu.activate()
    simulated_gpu.deactivate()
    assert not device.bf16_supported() and device.allocation_dtype("bfloat16") == "bfloat16"
    import paddle.nn.functional.flash_attention as fa

    assert fa.flash_attention is not simulated_gpu.flash_attention


def test_N1_additive_mask_is_none_when_nothing_is_masked():
    assert additive_mask(1, 5, True, None, paddle.bfloat16) is None  # a decode step: no causal cut, no padding
    assert additive_mask(3, 3, False, None, paddle.float32) is None


def test_N1_decode_without_key_mask_is_non_causal_flash_with_native_gqa(simulated):
    """q_len 1 < kv_len with attention_mask None (every unpadded decode step): on main this reached
    additive_mask -> paddle.where(None, ...) and raised."""
    q, k, v = _qkv(q_len=1, kv_len=6)
    out = attention(q, k, v, causal=True, attention_mask=None)
    assert simulated == {"flash_attention": 1}
    np.testing.assert_allclose(out.numpy(), _math(q, k, v, True), atol=1e-6)


def test_N1_chunked_prefill_over_a_cache_gets_a_causal_mask(simulated):
    q, k, v = _qkv(q_len=3, kv_len=6)
    out = attention(q, k, v, causal=True)
    assert simulated == {"scaled_dot_product_attention": 1}
    np.testing.assert_allclose(out.numpy(), _math(q, k, v, True), atol=1e-6)


@pytest.mark.parametrize("mask", [None, [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]])
def test_prefill_and_padded_prefill_equal_the_math_path(simulated, mask):
    q, k, v = _qkv()
    mask = None if mask is None else paddle.to_tensor(mask)
    out = attention(q, k, v, causal=True, attention_mask=mask).numpy()
    assert simulated == {"flash_attention" if mask is None else "scaled_dot_product_attention": 1}
    expected = _math(q, k, v, True, mask)
    real = slice(None) if mask is None else mask.numpy().astype(bool)
    np.testing.assert_allclose(out[real], expected[real], atol=1e-6)


def test_vision_segments_take_varlen_flash_and_packed_rows_flashmask(simulated):
    q, k, v = _qkv(b=1, q_len=10, kv_len=10, kv_heads=4)
    out = attention(q, k, v, causal=False, segments=Segments(np.array([0, 4, 10])))
    parts = [_math(q[:, a:b], k[:, a:b], v[:, a:b], False) for a, b in ((0, 4), (4, 10))]
    np.testing.assert_allclose(out.numpy(), np.concatenate(parts, axis=1), atol=1e-6)
    q, k, v = _qkv(b=2, q_len=5, kv_len=5)
    ids = paddle.to_tensor([[0, 0, 1, 1, 1], [2, 2, 2, -1, -1]])
    out = attention(q, k, v, causal=True, packed=PackedRows(ids))
    np.testing.assert_allclose(out.numpy()[0, 2:], _math(q[:1, 2:], k[:1, 2:], v[:1, 2:], True)[0], atol=1e-6)
    assert simulated == {"flash_attn_unpadded": 1, "flashmask_attention": 1}  # packed rows: FlashMask (N5)


def test_flashmask_reference_matches_a_document_mask(simulated):
    """flashmask_attention (FlashMaskInferSpmd) with causal LTS bounds: two documents of 3 and 4 tokens."""
    q, k, v = _qkv(b=1, q_len=7, kv_len=7)
    ends = paddle.to_tensor([3, 3, 3, 7, 7, 7, 7], dtype="int32").reshape([1, 1, 7, 1])
    out = paddle.nn.functional.flashmask_attention(q, k, v, ends, causal=True)
    parts = [_math(q[:, a:b], k[:, a:b], v[:, a:b], True) for a, b in ((0, 3), (3, 7))]
    np.testing.assert_allclose(out.numpy(), np.concatenate(parts, axis=1), atol=1e-6)
    per_kv_head = paddle.nn.functional.flashmask_attention(q, k, v, paddle.concat([ends, ends], axis=1), causal=True)
    np.testing.assert_allclose(per_kv_head.numpy(), out.numpy(), atol=1e-6)
    with pytest.raises(KernelContractError, match="flashmask_attention: startend_row_indices must be int32"):
        paddle.nn.functional.flashmask_attention(q, k, v, ends.astype("int64"), causal=True)


# ---- deliberately broken branches ---------------------------------------------------------------------------
def test_broken_distributed_tensor_into_op_without_spmd_rule(simulated):
    """A dp-sharded batch reaching flash_attn_unpadded (no SPMD rule in Paddle 3.3.1; the packed-rows route
    before review N5's fix) fails naming the op; packed rows now take FlashMask (FlashMaskInferSpmd) and stay
    split, each row's samples attending only to themselves."""
    from paddle.nn.functional.flash_attention import flash_attn_unpadded

    mesh = dist.ProcessMesh([0], dim_names=["dp"])
    q, k, v = (dist.shard_tensor(x, mesh, [dist.Shard(0)]) for x in _qkv(b=2, q_len=5, kv_len=5))
    ids = dist.shard_tensor(paddle.to_tensor([[0, 0, 1, 1, 1], [2, 2, 2, -1, -1]]), mesh, [dist.Shard(0)])
    cu = paddle.to_tensor([0, 5, 10], dtype="int32")
    flat = [x.reshape([10, x.shape[2], x.shape[3]]) for x in (q, k, v)]
    with pytest.raises(KernelContractError, match="flash_attn_unpadded: distributed tensor 'query' passed, but "
                                                  "flash_attn_unpadded has no SPMD rule"):
        flash_attn_unpadded(*flat, cu, cu, 5, 5, scale=8**-0.5, causal=True)
    packed = attention(q, k, v, causal=True, packed=PackedRows(ids))
    assert packed.placements == [dist.Shard(0)]
    local = [x._local_value() for x in (q, k, v)]
    np.testing.assert_allclose(packed._local_value().numpy()[0, 2:], _math(*(x[:1, 2:] for x in local), True)[0],
                               atol=1e-6)
    with pytest.raises(KernelContractError, match="repeat_interleave: distributed tensor 'x'"):
        paddle.repeat_interleave(k, 2, axis=2)
    out = attention(q, k, v, causal=True)  # flash_attention has FlashAttInferSpmd: dist tensors are fine
    np.testing.assert_allclose(out._local_value().numpy(), _math(*(x._local_value() for x in (q, k, v)), True),
                               atol=1e-6)


def test_broken_host_resident_weight(simulated, monkeypatch):
    """The pre-N4 route (DLPack zero-copy whatever the place) under the simulated GPU fails naming the weight."""
    layer = paddle.nn.Linear(3, 2)
    monkeypatch.setattr(weights_mod, "weights_zero_copy", lambda: True)
    value = weights_mod.to_paddle(np.ones((3, 2), np.float32), paddle.float32)
    with pytest.raises(device.HostResidentError, match=f"weight '{layer.weight.name}' would live in host memory"):
        weights_mod.assign(layer.weight, value)
    monkeypatch.undo()
    weights_mod.assign(layer.weight, weights_mod.to_paddle(np.ones((3, 2), np.float32), paddle.float32))
    np.testing.assert_array_equal(layer.weight.numpy(), np.ones((3, 2)))


def test_broken_mask_of_the_wrong_dtype(simulated, monkeypatch):
    real = attention_mod.additive_mask
    monkeypatch.setattr(attention_mod, "additive_mask", lambda *a: real(*a[:4], paddle.float16))
    q, k, v = _qkv()
    with pytest.raises(KernelContractError, match="scaled_dot_product_attention: attn_mask dtype paddle.float16 "
                                                  "differs from the query's paddle.float32"):
        attention(q, k, v, causal=True, attention_mask=paddle.to_tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))


def test_broken_int64_cu_seqlens(simulated, monkeypatch):
    monkeypatch.setattr(Segments, "cu_seqlens", property(lambda self: paddle.to_tensor(self.bounds.astype("int64"))))
    q, k, v = _qkv(b=1, q_len=10, kv_len=10, kv_heads=4)
    with pytest.raises(KernelContractError, match="flash_attn_unpadded: cu_seqlens_q must be int32"):
        attention(q, k, v, causal=False, segments=Segments(np.array([0, 4, 10])))


def test_broken_kernel_inputs_named(simulated):
    import paddle.nn.functional.flash_attention as fa

    q, k, v = _qkv()
    with pytest.raises(KernelContractError, match="flash_attention: q/k/v dtypes differ"):
        fa.flash_attention(q, k.astype("float16"), v)
    with pytest.raises(KernelContractError, match="4 query heads are not a multiple of 3"):
        fa.flash_attention(q, *_qkv(kv_heads=3)[1:])
    with pytest.raises(KernelContractError, match=r"must be \[batch, seq, heads, head_dim\]"):
        fa.flash_attention(q[0], k[0], v[0])
    flat = [x.reshape([-1, x.shape[2], x.shape[3]]) for x in (q, k, v)]
    cu = paddle.to_tensor([0, 6, 12], dtype="int32")
    with pytest.raises(KernelContractError, match="max_seqlen for cu_seqlens_q must be a host int, got Tensor"):
        fa.flash_attn_unpadded(*flat, cu, cu, paddle.to_tensor(6), 6, 8**-0.5)


# ---- N4 ------------------------------------------------------------------------------------------------------
class _DevicePlace:
    def is_cpu_place(self):
        return False


def test_N4_to_paddle_creates_weights_on_a_device_place(monkeypatch):
    """On a GPU place `to_paddle` must not zero-copy numpy through DLPack (host memory): it creates the tensor on
    the expected place, for fp32 and for fp32 -> bf16 and bf16 -> fp32."""
    shared, created = [], []
    real_to_tensor = paddle.to_tensor
    monkeypatch.setattr(paddle.framework, "_current_expected_place", lambda: _DevicePlace())
    monkeypatch.setattr(weights_mod, "_share", lambda a: shared.append(a) or real_to_tensor(a))

    def to_tensor(data, dtype=None, place=None, stop_gradient=True):
        created.append(place)
        return real_to_tensor(data, dtype=dtype, stop_gradient=stop_gradient)

    monkeypatch.setattr(paddle, "to_tensor", to_tensor)
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    for source, dtype in ((array, paddle.float32), (array, paddle.bfloat16),
                          (array.astype(weights_mod._BF16), paddle.float32)):
        out = weights_mod.to_paddle(source.copy(), dtype)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out.astype("float32").numpy(), array)
    assert shared == [] and len(created) == 3 and all(isinstance(p, _DevicePlace) for p in created)


def test_N4_cpu_place_keeps_the_zero_copy():
    array = np.arange(6, dtype=np.float32)
    out = weights_mod.to_paddle(array, paddle.float32)
    assert out.data_ptr() == array.ctypes.data  # DLPack shares the numpy memory on the CPU place


def test_N7_replicated_kv_for_head_split_q_keeps_placements(simulated):
    """mp > kv heads: k/v replicated over "mp" are repeated to q's heads with ops that have SPMD rules; on main
    repeat_interleave (no SPMD rule) returned Replicate over "dp" too, and the simulated GPU refuses it."""
    mesh = dist.ProcessMesh([[0]], dim_names=["dp", "mp"])
    q, k, v = _qkv()
    qd = dist.shard_tensor(q, mesh, [dist.Shard(0), dist.Shard(2)])
    kd, vd = (dist.shard_tensor(x, mesh, [dist.Shard(0), dist.Replicate()]) for x in (k, v))
    k2, _ = attention_mod.kv_for_kernel(qd, kd, vd)
    assert k2.shape[2] == 4 and str(k2.placements) == "[Shard(dim=0), Replicate()]"
    np.testing.assert_array_equal(k2._local_value().numpy(), np.repeat(k.numpy(), 2, axis=2))
    out = attention(qd, kd, vd, causal=True)
    assert simulated == {"flash_attention": 1}
    np.testing.assert_allclose(out._local_value().numpy(), _math(q, k, v, True), atol=1e-6)


def test_console_line_parses_back():
    from collections import Counter

    from dist_utils import console_kernels

    counts = Counter({"flash_attn_unpadded": 8, "flash_attention": 96})
    assert simulated_gpu.report_line(counts) == "simulated GPU kernels: flash_attention 96, flash_attn_unpadded 8"
    assert console_kernels(f"log\n{simulated_gpu.report_line(counts)}\n") == counts
    assert console_kernels(simulated_gpu.report_line(Counter())) == Counter()
