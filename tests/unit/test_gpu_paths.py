"""The bf16/GPU code paths, exercised on the CPU build: the device checks are patched, the CUDA kernels replaced by
recorders that check what they are given and answer with the exact math. These tests prove the logic (dtypes,
heads, masks, which tensor is the gradient, what a checkpoint holds), not the CUDA kernels themselves."""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
import pytest
from paddle.base import core

import network.attention as attention_mod
from autoparallel import cpu_compat
from autoparallel import forward as forward_mod
from autoparallel import pipeline
from autoparallel.engine import checkpoint
from autoparallel.gradients import gradient
from autoparallel.step import clip_gradients_, global_grad_norm
from network.attention import Segments, additive_mask, attention, kv_for_kernel
from placements.degrees import ParallelDegrees
from network.modeling_qwen2_vl import Qwen2RMSNorm, apply_rotary


def _bf16(x: paddle.Tensor) -> paddle.Tensor:
    return x.astype("bfloat16")


def _math(q, k, v, causal, mask=None):
    """The exact reference (fp32 math path), for inputs of any dtype."""
    return attention_mod._math_attention(q.astype("float32"), k.astype("float32"), v.astype("float32"), causal, mask)


class KernelRecorder:
    """Stands in for flash_attention / flash_attn_unpadded / SDPA: records what each got, computes the math."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def flash_attention(self, q, k, v, causal=False):
        self.calls.append(("flash", {"dtypes": {q.dtype, k.dtype, v.dtype}, "kv_heads": k.shape[2], "causal": causal}))
        return _math(q, k, v, causal), None

    def flash_attn_unpadded(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal=False):
        self.calls.append(("varlen", {"dtypes": {q.dtype, k.dtype, v.dtype}, "max": (max_q, max_k),
                                      "cu": cu_q.numpy().tolist(), "cu_dtype": cu_q.dtype, "causal": causal,
                                      "kv_heads": k.shape[1]}))
        bounds = cu_q.numpy()
        out = paddle.concat([_math(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0]
                             for a, b in zip(bounds[:-1], bounds[1:])])
        return out, None

    def flashmask_attention(self, q, k, v, startend_row_indices, causal=False):
        self.calls.append(("flashmask", {"dtypes": {q.dtype, k.dtype, v.dtype}, "kv_heads": k.shape[2],
                                         "causal": causal, "bounds": startend_row_indices,
                                         "placements": [x.placements if x.is_dist() else None
                                                        for x in (q, k, v, startend_row_indices)]}))
        if q.is_dist():
            return q
        # Key j is masked for query rows >= its bound; causal on top.
        rows = paddle.arange(q.shape[1])[None, :, None]
        allowed = rows < startend_row_indices[:, 0, :, 0].astype("int64")[:, None, :]
        allowed = paddle.logical_and(allowed, paddle.tril(paddle.ones([q.shape[1]] * 2, "bool"))[None])
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = (x.astype("float32").transpose([0, 2, 1, 3]) for x in (q, k, v))
        kt, vt = (paddle.repeat_interleave(x, groups, axis=1) for x in (kt, vt))
        scores = paddle.matmul(qt, kt, transpose_y=True) * q.shape[3] ** -0.5
        scores = paddle.where(allowed[:, None], scores, paddle.full([], -1e30, "float32"))
        return paddle.matmul(F.softmax(scores, -1), vt).transpose([0, 2, 1, 3])

    def sdpa(self, q, k, v, attn_mask=None):
        self.calls.append(("sdpa", {"dtypes": {q.dtype, k.dtype, v.dtype}, "kv_heads": k.shape[2],
                                    "mask_dtype": attn_mask.dtype, "mask_min": float(attn_mask.astype("float32").min())}))
        heads, dim = q.shape[2], q.shape[3]
        k, v = (attention_mod._repeat_kv(x, heads) for x in (k, v))  # SDPA's native GQA (enable_gqa)
        qt, kt, vt = (x.astype("float32").transpose([0, 2, 1, 3]) for x in (q, k, v))
        scores = paddle.matmul(qt, kt, transpose_y=True) * dim**-0.5 + attn_mask.astype("float32")
        return paddle.matmul(F.softmax(scores, -1), vt).transpose([0, 2, 1, 3])


@pytest.fixture
def gpu_kernels(monkeypatch):
    """The GPU branch of network.attention with recording kernels."""
    import paddle.nn.functional.flash_attention as fa

    recorder = KernelRecorder()
    monkeypatch.setattr(attention_mod, "flash_attention_supported", lambda: True)
    monkeypatch.setattr(fa, "flash_attention", recorder.flash_attention)
    monkeypatch.setattr(fa, "flash_attn_unpadded", recorder.flash_attn_unpadded)
    monkeypatch.setattr(fa, "flashmask_attention", recorder.flashmask_attention)
    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", recorder.sdpa)
    return recorder


def _qkv(b=2, s=6, heads=4, kv_heads=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((b, s, h, d)).astype("float32")) for h in (heads, kv_heads, kv_heads)]


def test_training_attention_is_causal_flash_without_mask(gpu_kernels):
    q, k, v = _qkv()
    out = attention(_bf16(q), _bf16(k), _bf16(v), causal=True, attention_mask=forward_mod.TRAINING_KEY_MASK)
    (kind, got), = gpu_kernels.calls
    assert kind == "flash" and got["causal"] and got["dtypes"] == {paddle.bfloat16}
    np.testing.assert_allclose(out.numpy(), _math(_bf16(q), _bf16(k), _bf16(v), True).numpy(), atol=1e-6)


def test_right_padding_without_mask_is_exact_on_real_tokens():
    """Why training needs no key mask: causal attention never lets a real token see the padding after it."""
    q, k, v = _qkv()
    mask = paddle.to_tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    masked = attention(q, k, v, causal=True, attention_mask=mask).numpy()
    unmasked = attention(q, k, v, causal=True).numpy()
    real = mask.numpy().astype(bool)
    np.testing.assert_array_equal(masked[real], unmasked[real])


def test_left_padded_generation_gets_additive_finite_mask(gpu_kernels):
    q, k, v = _qkv()
    mask = paddle.to_tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    out = attention(_bf16(q), _bf16(k), _bf16(v), causal=True, attention_mask=mask)
    (kind, got), = gpu_kernels.calls
    assert kind == "sdpa" and got["dtypes"] == {paddle.bfloat16} and got["mask_dtype"] == paddle.bfloat16
    assert got["kv_heads"] == 2  # SDPA's native GQA: no repeated copy of the cache
    assert math.isfinite(got["mask_min"]) and got["mask_min"] == float(paddle.finfo(paddle.bfloat16).min)
    expected = _math(_bf16(q), _bf16(k), _bf16(v), True, mask).numpy()
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(out.numpy()[real], expected[real], atol=1e-5)
    assert np.isfinite(out.numpy()).all()  # fully masked rows stay finite


def test_N1_decode_step_without_key_mask_is_non_causal_flash(gpu_kernels):
    """An unpadded decode step (q_len 1 < kv_len, no key mask) raised in additive_mask on main."""
    q, _, _ = _qkv(s=1)
    _, k, v = _qkv(s=6)
    out = attention(_bf16(q), _bf16(k), _bf16(v), causal=True, attention_mask=None)
    (kind, got), = gpu_kernels.calls
    assert kind == "flash" and not got["causal"] and got["kv_heads"] == 2
    np.testing.assert_allclose(out.numpy(), _math(_bf16(q), _bf16(k), _bf16(v), True).numpy(), atol=1e-6)


def test_additive_mask_values():
    mask = additive_mask(2, 3, True, paddle.to_tensor([[0, 1, 1]]), paddle.float32).numpy()[0, 0]
    low = np.finfo(np.float32).min
    np.testing.assert_array_equal(mask, [[low, 0, low], [low, 0, 0]])


def test_vision_varlen_gets_host_max_len_and_int32_bounds(gpu_kernels):
    grid = np.array([[1, 2, 4], [2, 2, 2]])
    from network.modeling_vision import vision_segments

    segments = vision_segments(grid)
    assert segments.bounds.tolist() == [0, 8, 12, 16] and segments.max_len == 8
    q, k, v = (x[:1] for x in _qkv(s=16, kv_heads=4))
    out = attention(_bf16(q), _bf16(k), _bf16(v), causal=False, segments=segments)
    (kind, got), = gpu_kernels.calls
    assert kind == "varlen" and got["max"] == (8, 8) and got["cu"] == [0, 8, 12, 16]
    assert got["cu_dtype"] == paddle.int32 and got["dtypes"] == {paddle.bfloat16}
    exact = attention(*(_bf16(x).astype("float32") for x in (q, k, v)), causal=False, segments=segments)
    np.testing.assert_allclose(out.numpy(), exact.numpy(), atol=1e-6)


def test_packed_rows_get_causal_flashmask_with_device_bounds_built_once(gpu_kernels, monkeypatch):
    """N5: packed text rows on the GPU branch: causal FlashMask with each key's sample end as its bound, built on
    the device once per forward (no host read of the ids) and reused by every layer; native GQA; the result
    equals the CPU per-sample path."""
    ids = paddle.to_tensor(np.array([[0, 0, 0, 1, 1, -1, -1, -1], [0, 0, 0, 0, 0, 1, 1, 1]]))
    q, k, v = _qkv(s=8, kv_heads=2)
    packed = attention_mod.PackedRows(ids)
    monkeypatch.setattr(attention_mod, "packed_cu_seqlens", lambda x: pytest.fail("host read of packed ids"))
    outs = [attention(_bf16(q), _bf16(k), _bf16(v), causal=True, packed=packed) for _layer in range(3)]
    assert [kind for kind, _ in gpu_kernels.calls] == ["flashmask"] * 3
    bounds = [got["bounds"] for _, got in gpu_kernels.calls]
    assert bounds[0] is bounds[1] is bounds[2] and bounds[0].dtype == paddle.int32
    assert bounds[0].numpy()[:, 0, :, 0].tolist() == [[3, 3, 3, 5, 5, 8, 8, 8], [5, 5, 5, 5, 5, 8, 8, 8]]
    got = gpu_kernels.calls[0][1]
    assert got["causal"] and got["dtypes"] == {paddle.bfloat16} and got["kv_heads"] == 2
    monkeypatch.undo()
    exact = attention(*(_bf16(x).astype("float32") for x in (q, k, v)), causal=True,
                      packed=attention_mod.PackedRows(ids))
    np.testing.assert_allclose(outs[0].astype("float32").numpy(), exact.numpy(), atol=1e-6)


def test_packed_rows_kernel_gets_rank_local_split_tensors(gpu_kernels):
    """N5: with dist q/k/v (rows split over "dp", heads over "mp") the packed GPU branch hands the kernel q/k/v
    with their own placements and bounds split over "dp" like the rows: FlashMask's sharding rule keeps them
    local (old main: `flash_attn_unpadded`, which has no rule, replicated the global batch on every rank)."""
    mesh = dist.ProcessMesh([[0]], dim_names=["dp", "mp"])
    split = [dist.Shard(0), dist.Shard(2)]
    q, k, v = (dist.auto_parallel.api.dtensor_from_local(_bf16(x), mesh, split) for x in _qkv(s=8, kv_heads=4))
    ids = dist.shard_tensor(paddle.to_tensor(np.array([[0, 0, 1, 1, 1, 2, 2, 2]] * 2)), mesh,
                            [dist.Shard(0), dist.Replicate()])
    attention(q, k, v, causal=True, packed=attention_mod.PackedRows(ids))
    (kind, got), = gpu_kernels.calls
    assert kind == "flashmask" and got["placements"][:3] == [split] * 3
    assert got["placements"][3][0] == dist.Shard(0)
    assert got["bounds"]._local_value().numpy()[:, 0, :, 0].tolist() == [[2, 2, 5, 5, 5, 8, 8, 8]] * 2


def test_vision_math_path_loops_over_segments_and_matches_block_diagonal():
    q, k, v = (x[:1] for x in _qkv(s=16, kv_heads=4))
    segments = Segments(np.array([0, 8, 12, 16]))
    looped = attention(q, k, v, causal=False, segments=segments).numpy()
    seg = np.searchsorted([8, 12, 16], np.arange(16), side="right")
    allowed = paddle.to_tensor((seg[:, None] == seg[None, :])[None, None])
    qt, kt, vt = (x.transpose([0, 2, 1, 3]) for x in (q, k, v))
    scores = paddle.where(allowed, paddle.matmul(qt, kt, transpose_y=True) * 8**-0.5, paddle.full([], -1e30))
    block = paddle.matmul(F.softmax(scores, -1), vt).transpose([0, 2, 1, 3]).numpy()
    np.testing.assert_allclose(looped, block, atol=1e-6)


def test_replicated_kv_heads_are_repeated_before_a_head_split_kernel():
    mesh = dist.ProcessMesh([0], dim_names=["mp"])
    q, k, v = _qkv(heads=4, kv_heads=2)
    q = dist.shard_tensor(q, mesh, [dist.Shard(2)])
    k_rep, v_rep = (dist.shard_tensor(x, mesh, [dist.Replicate()]) for x in (k, v))
    k2, v2 = kv_for_kernel(q, k_rep, v_rep)
    assert k2.shape[2] == v2.shape[2] == 4
    np.testing.assert_array_equal(k2._local_value().numpy()[:, :, 1], k.numpy()[:, :, 0])  # head 1 reads kv head 0
    np.testing.assert_array_equal(k2._local_value().numpy()[:, :, 2], k.numpy()[:, :, 1])
    k_split = dist.shard_tensor(k, mesh, [dist.Shard(2)])
    assert kv_for_kernel(q, k_split, k_split)[0] is k_split  # head-split k/v go as they are (native GQA)


def test_kernel_gate_needs_half_precision_and_sm80(monkeypatch):
    q = _bf16(paddle.ones([1, 2, 2, 4]))
    assert not attention_mod._use_gpu_kernels(q)  # CPU place
    monkeypatch.setattr(attention_mod, "flash_attention_supported", lambda: True)
    assert attention_mod._use_gpu_kernels(q) and not attention_mod._use_gpu_kernels(q.astype("float32"))


def test_bf16_gate_reads_device_capability(monkeypatch):
    from network import device

    assert not device.bf16_supported()  # CPU place
    monkeypatch.setattr(device, "on_gpu", lambda: True)
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda *a: True)
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert device.bf16_supported() is expected and device.flash_attention_supported() is expected


def test_rotary_returns_v_dtype_so_flash_is_reached():
    q, k = _bf16(paddle.randn([1, 3, 2, 4])), _bf16(paddle.randn([1, 3, 2, 4]))
    cos, sin = paddle.randn([1, 3, 1, 4]), paddle.randn([1, 3, 1, 4])  # fp32, as under O2
    q2, k2 = apply_rotary(q, k, cos, sin, paddle.bfloat16)
    assert q2.dtype == k2.dtype == paddle.bfloat16
    expected = q.astype("float32") * cos + paddle.concat([-q[..., 2:], q[..., :2]], -1).astype("float32") * sin
    np.testing.assert_array_equal(q2.numpy(), expected.astype("bfloat16").numpy())


def test_rmsnorm_returns_half_weight_dtype_for_fp32_input():
    x = paddle.randn([2, 4])
    assert Qwen2RMSNorm(4, 1e-6)(x).dtype == paddle.float32
    paddle.set_default_dtype("bfloat16")
    try:
        half = Qwen2RMSNorm(4, 1e-6)
    finally:
        paddle.set_default_dtype("float32")
    out = half(x)
    assert out.dtype == paddle.bfloat16
    expected = x / paddle.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    np.testing.assert_allclose(out.astype("float32").numpy(), expected.numpy(), rtol=1e-2)


@contextlib.contextmanager
def _tracer_amp_o2():
    tracer = paddle.base.framework._dygraph_tracer()
    saved = tracer._amp_level, tracer._amp_dtype
    tracer._amp_level, tracer._amp_dtype = core.AmpLevel.O2, "bfloat16"
    try:
        yield tracer
    finally:
        tracer._amp_level, tracer._amp_dtype = saved


def test_loss_row_sums_run_with_autocast_off(monkeypatch):
    """The head's logits matmul may run under O2; the loss statistics (row sums as matmuls) never do."""
    levels = []
    original = paddle.matmul

    def recording_matmul(*args, **kwargs):
        levels.append(paddle.base.framework._dygraph_tracer()._amp_level)
        return original(*args, **kwargs)

    monkeypatch.setattr(forward_mod.paddle, "matmul", recording_matmul)
    hidden, weight = paddle.randn([5, 8]), paddle.randn([8, 40])
    logits = original(hidden, weight)
    targets = paddle.to_tensor([1, 2, -100, 4, 5])
    scale = (targets != -100).astype("float32")
    expected = sum(float(paddle.logsumexp(logits[i]) - logits[i, t]) for i, t in enumerate([1, 2, -100, 4, 5])
                   if t != -100)
    with _tracer_amp_o2() as tracer:
        loss, _, _ = forward_mod.vocab_parallel_chunk(hidden, weight, targets, scale, False, (False, False))
        assert tracer._amp_level == core.AmpLevel.O2  # restored after the loss
    assert levels[0] == core.AmpLevel.O2 and len(levels) > 1
    assert all(level == core.AmpLevel.O0 for level in levels[1:])
    assert loss.dtype == paddle.float32 and abs(float(loss) - expected) < 1e-4


def _params_with_grads(values):
    params = []
    for value in values:
        p = paddle.create_parameter([len(value)], "float32")
        p.grad = paddle.to_tensor(value, "float32")
        params.append(p)
    return params


class _Model(paddle.nn.Layer):
    def __init__(self, params):
        super().__init__()
        for i, p in enumerate(params):
            self.add_parameter(f"p{i}", p)


def test_master_grad_is_what_norm_and_clip_read():
    params = _params_with_grads([[9.0, 9.0], [9.0]])  # stale low-precision .grad
    for p, main in zip(params, ([3.0, 0.0], [4.0])):
        p.main_grad = paddle.to_tensor(main, "float32")
    model = _Model(params)
    assert gradient(params[0]) is params[0].main_grad
    norm = global_grad_norm(model)
    assert norm == pytest.approx(5.0)
    clip_gradients_(model.parameters(), norm, 1.0)
    np.testing.assert_allclose(params[0].main_grad.numpy(), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(params[1].main_grad.numpy(), [0.8], rtol=1e-6)
    np.testing.assert_array_equal(params[0].grad.numpy(), [9.0, 9.0])  # not the gradient the optimizer uses


def test_rng_state_is_one_generator_of_this_device():
    state = checkpoint.capture_rng_state()
    assert "paddle" not in state and isinstance(state["paddle_device"], core.GeneratorState)
    first = (random.random(), np.random.rand(), paddle.rand([3]).numpy())
    checkpoint.restore_rng_state(state)
    again = (random.random(), np.random.rand(), paddle.rand([3]).numpy())
    assert first[0] == again[0] and first[1] == again[1]
    np.testing.assert_array_equal(first[2], again[2])


def test_old_rng_state_from_more_devices_is_skipped(caplog):
    state = checkpoint.capture_rng_state()
    old = {"python": state["python"], "numpy": state["numpy"], "paddle": paddle.get_rng_state() * 8}
    checkpoint.restore_rng_state(old)  # would raise in paddle.set_rng_state (8 states, 1 device)
    assert "saved for 8 devices, this process sees 1" in caplog.text


def test_pipeline_receive_buffer_takes_the_senders_dtype(monkeypatch):
    sent, wire = [], []
    mesh = dist.ProcessMesh([[0]], dim_names=["dp", "mp"])
    monkeypatch.setattr(pipeline.dist, "send", lambda t, dst: (sent.append(t.clone()), wire.append(t.clone())))

    def recv(buffer, src):
        buffer.set_value(wire.pop(0).astype(buffer.dtype)) if buffer.dtype == wire[0].dtype else \
            pytest.fail(f"receive buffer {buffer.dtype} for a {wire[0].dtype} message")

    monkeypatch.setattr(pipeline.dist, "recv", recv)
    x = dist.shard_tensor(_bf16(paddle.randn([1, 2, 4])), mesh, [dist.Shard(0), dist.Replicate()])
    pipeline._send(x, 1, with_dtype=True)
    got = pipeline._recv([1, 2, 4], None, 0, mesh)
    assert got.dtype == paddle.bfloat16
    np.testing.assert_array_equal(got._local_value().numpy(), x._local_value().numpy())


def test_rank_without_images_builds_empty_features_in_the_towers_dtype(monkeypatch):
    seen = {}
    original = paddle.concat

    def recording_concat(items, *args, **kwargs):
        seen.setdefault("dtypes", [t.dtype for t in items])
        return original(items, *args, **kwargs)

    class Tower:
        class config:
            embed_dim = 4
        patch_embed = type("P", (), {"proj": type("C", (), {"weight": _bf16(paddle.ones([1]))})()})()
        merger = type("M", (), {"mlp": [type("L", (), {"weight": paddle.ones([1])})()]})()

    class Model:
        visual = Tower()
        model = type("T", (), {"embed_tokens": type("E", (), {"weight": paddle.zeros([8, 4])})()})()

    batch = type("B", (), {"max_patches": 2, "pixel_values": None, "input_ids": None, "mesh": None})()
    monkeypatch.setattr(forward_mod, "lookup", lambda weight, ids: paddle.zeros([1, 2, 4]))
    monkeypatch.setattr(forward_mod.paddle, "concat", recording_concat)
    with contextlib.suppress(Exception):  # stops after the features are built (no mesh here)
        forward_mod.embed_inputs(Model(), batch)
    assert seen["dtypes"] == [paddle.bfloat16, paddle.bfloat16]


def test_cpu_compat_is_keyed_on_the_current_place(monkeypatch):
    assert cpu_compat.runs_on_cpu()
    monkeypatch.setattr(paddle.framework, "_current_expected_place_", lambda: object())  # any non-CPU place
    assert not cpu_compat.runs_on_cpu()


# ---- issue 28, round 2 ------------------------------------------------------------------------------------------

@pytest.fixture
def amp_state():
    """Paddle's process-wide AMP state (master-grad list, hook flags), restored afterwards."""
    from paddle.amp.auto_cast import amp_global_state

    state = amp_global_state()
    saved = (state.use_master_grad, list(state.model_parameters), state.already_register_final_backward_hook,
             state.already_classify_params_meshes, dict(state.mesh2params))
    yield state
    (state.use_master_grad, params, state.already_register_final_backward_hook,
     state.already_classify_params_meshes, mesh2params) = saved
    state.model_parameters[:] = params
    state.mesh2params.clear()
    state.mesh2params.update(mesh2params)


class _GpuPlace:
    """A place that says it is a GPU: what `paddle.amp.decorate` checks before doing anything."""

    def is_gpu_place(self):
        return True

    def is_xpu_place(self):
        return False

    def is_custom_place(self):
        return False


class _TracerOnGpu:
    """Paddle's tracer, except that its place says GPU (reads and writes go to the real tracer)."""

    def __init__(self, tracer):
        object.__setattr__(self, "_tracer", tracer)

    def __getattr__(self, name):
        return _GpuPlace() if name == "_expected_place" else getattr(self._tracer, name)

    def __setattr__(self, name, value):
        setattr(self._tracer, name, value)


@pytest.fixture
def amp_on_gpu(monkeypatch):
    """`paddle.amp.decorate` / `auto_cast` past their place checks: they see a bf16-capable GPU place, so their
    whole logic runs (on CPU the casts apply to distributed tensors, which Paddle's AMP treats as on a device)."""
    import sys

    auto_cast_mod = sys.modules["paddle.amp.auto_cast"]  # `paddle.amp.auto_cast` is the function of that module
    monkeypatch.setattr(auto_cast_mod, "_dygraph_tracer", lambda: _TracerOnGpu(paddle.base.framework._dygraph_tracer()))
    monkeypatch.setattr(auto_cast_mod, "_is_gpu_bfloat16_supported", lambda: True)


@pytest.mark.parametrize("sharding", ["", "stage1"])
def test_n2_master_grads_reach_the_live_parallelized_parameters(monkeypatch, amp_state, amp_on_gpu, sharding):
    """N2: under ZeRO stage 0/1 `amp_master_grad` casts the gradients of the parameters the model trains with.

    The trainer's real `distribute` runs `paddle.amp.decorate(master_grad=True)` (its CPU early return bypassed by
    a tracer whose place says GPU, so decorate casts the weights to bf16 and registers the master-grad list) and
    `dist.parallelize`, which replaces every parameter object. A backward under `auto_cast` (which registers
    Paddle's own end-of-backward `master_grad_hook`, also on CPU) must leave an fp32 gradient on the live bf16
    dist parameter. Before the fix the hook cast the stale tensors' (absent) gradients and the live one stayed bf16.
    What this cannot show: the bf16 forward kernels (the loss here is an fp32 cast of one parameter)."""
    from autoparallel.config import RunConfig
    from autoparallel.engine import trainer as trainer_mod
    from parallel_cases import build_model, tiny_config

    cfg = RunConfig.build("sft", [("test", {"amp_master_grad": "true", "bf16": "true", "sharding": sharding})])
    monkeypatch.setattr(trainer_mod, "use_bf16", lambda _cfg: True)
    cpu_compat.apply()
    model = build_model(tiny_config())
    optimizer = paddle.optimizer.AdamW(parameters=model.parameters(), multi_precision=True)
    mesh = dist.ProcessMesh([[0]], dim_names=["dp", "mp"])  # ZeRO-1 over a one-rank "dp" (no degree check)
    model, _ = trainer_mod.distribute(model, optimizer, cfg, mesh, None, cfg.model.trainable())
    monkeypatch.undo()  # the rest runs on the plain CPU tracer

    live = [p for p in model.parameters() if not p.stop_gradient]
    assert amp_state.use_master_grad
    assert {id(p) for p in amp_state.model_parameters} == {id(p) for p in live}
    weight = model.model.embed_tokens.weight
    assert weight.is_dist() and weight.dtype == paddle.bfloat16
    with paddle.amp.auto_cast(enable=True, level="O2", dtype="bfloat16"):  # registers master_grad_hook
        loss = (weight.astype("float32") ** 2).sum()
    loss.backward()
    grad = gradient(weight)
    assert grad.dtype == paddle.float32
    np.testing.assert_allclose(grad._local_value().numpy(), 2 * weight.astype("float32")._local_value().numpy(),
                               rtol=1e-6)


def test_n3_loss_statistics_run_without_tf32_and_restore_the_switch(monkeypatch):
    """N3: the fp32 row sums of the loss statistics run with cuBLAS's TF32 switch off (Paddle turns it on by
    default on a CUDA build); the logits matmul before them keeps the switch as it was, and so does everything
    after. The switch is spied on (on the CPU build it changes nothing): this proves the switching, not cuBLAS."""
    switch = {"tf32": True}
    monkeypatch.setattr(core, "get_cublas_switch", lambda: switch["tf32"])
    monkeypatch.setattr(core, "set_cublas_switch", lambda on: switch.update(tf32=on))
    seen = []
    original = paddle.matmul
    monkeypatch.setattr(forward_mod.paddle, "matmul", lambda *a, **k: seen.append(switch["tf32"]) or original(*a, **k))
    hidden, weight = paddle.randn([5, 8]), paddle.randn([8, 40])
    targets = paddle.to_tensor([1, 2, 3, 4, 5])
    loss, _, d_weight = forward_mod.vocab_parallel_chunk(hidden, weight, targets, paddle.ones([5]), False,
                                                         (False, True))
    assert seen[0] is True and len(seen) > 2 and not any(seen[1:])
    assert switch["tf32"] is True  # restored
    logits = original(hidden, weight)
    expected = float((paddle.logsumexp(logits, axis=-1) - logits[paddle.arange(5), targets]).sum())
    assert abs(float(loss) - expected) < 1e-4 and d_weight.shape == [8, 40]


def test_n9_training_autocast_keeps_the_embedding_output_bf16(monkeypatch, amp_on_gpu):
    """N9: the trainer's O2 autocast (also around pipeline stages) white-lists the embedding lookup, as PaddleMIX's
    trainer does, so the residual stream is bf16; Paddle's own O2 lists keep the lookup fp32. Runs Paddle's real
    `auto_cast` (place check bypassed) on a distributed bf16 embedding weight, for which Paddle's AMP casts on CPU."""
    from autoparallel.config import RunConfig
    from autoparallel.engine import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "use_bf16", lambda _cfg: True)
    trainer = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    trainer.cfg = RunConfig.build("sft", [("test", {"bf16": "true"})])
    mesh = dist.ProcessMesh([0], dim_names=["dp"])
    weight = dist.shard_tensor(_bf16(paddle.randn([10, 4])), mesh, [dist.Replicate()])
    ids = dist.shard_tensor(paddle.to_tensor([[1, 2, 3]]), mesh, [dist.Replicate()])
    with paddle.amp.auto_cast(enable=True, level="O2", dtype="bfloat16"):
        assert F.embedding(ids, weight).dtype == paddle.float32  # Paddle's default O2 lists: an fp32 residual
    with trainer.autocast():
        white_list, _ = paddle.base.framework._dygraph_tracer()._get_amp_op_list()
        out = F.embedding(ids, weight)
    assert "lookup_table_v2" in white_list and out.dtype == paddle.bfloat16
    np.testing.assert_array_equal(out._local_value().numpy(), weight._local_value().numpy()[[1, 2, 3]][None])


@pytest.mark.parametrize("pp", [1, 2])
def test_n9_planner_counts_layer_inputs_and_stage_outputs_in_the_residual_dtype(monkeypatch, pp):
    """N9: recompute's kept layer inputs and a pipeline stage's kept output are the residual stream: bf16 bytes under
    O2 with the lookup white-listed (what the trainer runs), fp32 bytes if it were not."""
    from autoparallel.planning import memory
    from parallel_cases import tiny_config

    config = tiny_config()
    setup = memory.PlanSetup(config, ParallelDegrees(pipeline_parallel_degree=pp),
                             memory.Workload(2, 64, recompute=True), dtype="bfloat16")

    def residual_terms() -> list[int]:
        saved = memory.activation_estimate(setup, 0).saved
        return [x.bytes for x in saved if "recompute: layer inputs" in x.name or x.name.startswith("stage output")]

    layers = len(setup.stage_split()[0])
    tokens_x_hidden = 2 * 64 * config.hidden_size
    expected = [layers * tokens_x_hidden] + ([tokens_x_hidden] if pp > 1 else [])
    assert residual_terms() == [2 * x for x in expected]
    monkeypatch.setattr(memory, "O2_WHITE_LIST", frozenset())
    assert residual_terms() == [4 * x for x in expected]


def _count_int32_uploads(monkeypatch) -> list[int]:
    """Every int32 tensor network.attention creates from host data (cu_seqlens uploads on a GPU)."""
    uploads, original = [], paddle.to_tensor

    def counting(data, *args, **kwargs):
        out = original(data, *args, **kwargs)
        if out.dtype == paddle.int32:
            uploads.append(out.shape[0])
        return out

    monkeypatch.setattr(attention_mod.paddle, "to_tensor", counting)
    return uploads


def test_cu_seqlens_are_uploaded_once_per_forward(gpu_kernels, monkeypatch):
    """Smaller finding (a): the int32 cu_seqlens reach the device once per forward, not once per ViT block
    (`Segments`); packed rows' bounds (`PackedRows`) are built once per forward, on the device."""
    uploads = _count_int32_uploads(monkeypatch)
    segments = Segments(np.array([0, 8, 12, 16]))
    q, k, v = (_bf16(x[:1]) for x in _qkv(s=16, kv_heads=4))
    for _block in range(3):
        attention(q, k, v, causal=False, segments=segments)
    assert uploads == [4]
    packed = attention_mod.PackedRows(paddle.to_tensor(np.array([[0, 0, 0, 1, 1, -1, -1, -1]])))
    q, k, v = (_bf16(x[:1]) for x in _qkv(s=8))
    for _layer in range(3):
        attention(q, k, v, causal=True, packed=packed)
    assert uploads == [4]  # packed rows' FlashMask bounds are computed on the device (N5)
    assert [got["cu"] for kind, got in gpu_kernels.calls[:3]] == [[0, 8, 12, 16]] * 3
    assert len({id(got["bounds"]) for kind, got in gpu_kernels.calls[3:]}) == 1


class _Fp32Sdpa:
    """Stands in for `F.scaled_dot_product_attention` on fp32: checks the call contract of Paddle 3.3.1's sdpa.py
    (equal q/k/v dtypes, a mask of q's dtype, not both a mask and is_causal, GQA heads dividing), computes the
    exact math."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, attn_mask=None, is_causal=False):
        assert q.dtype == k.dtype == v.dtype == paddle.float32
        assert attn_mask is None or (attn_mask.dtype == q.dtype and not is_causal)
        assert q.shape[2] % k.shape[2] == 0 and k.shape[2] == v.shape[2]
        self.calls.append({"causal": is_causal, "mask": attn_mask is not None, "kv_heads": k.shape[2]})
        k, v = (attention_mod._repeat_kv(x, q.shape[2]) for x in (k, v))
        qt, kt, vt = (x.transpose([0, 2, 1, 3]) for x in (q, k, v))
        scores = paddle.matmul(qt, kt, transpose_y=True) * q.shape[-1] ** -0.5
        if is_causal:
            scores = scores + additive_mask(q.shape[1], k.shape[1], True, None, paddle.float32)
        if attn_mask is not None:
            scores = scores + attn_mask
        return paddle.matmul(F.softmax(scores, -1), vt).transpose([0, 2, 1, 3])


def test_fp32_prefill_on_gpu_goes_to_sdpa_not_the_math_path(monkeypatch):
    """Smaller finding (b): fp32 text prefill on a GPU runs SDPA (its memory-efficient backend takes fp32)
    instead of materialising [b, heads, S, S] fp32 scores; unpadded prefill as is_causal without a mask,
    left-padded prefill with an fp32 additive mask; GQA k/v unrepeated. Decoding (one query) and distributed
    tensors (no sharding rule for that kernel) stay on the math path. Results equal the math path."""
    sdpa = _Fp32Sdpa()
    monkeypatch.setattr(attention_mod, "on_gpu", lambda: True)
    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", sdpa)
    math_calls = []
    original_math = attention_mod._math_attention
    monkeypatch.setattr(attention_mod, "_math_attention", lambda *a, **kw: math_calls.append(1) or original_math(*a, **kw))
    q, k, v = _qkv()
    out = attention(q, k, v, causal=True)
    np.testing.assert_allclose(out.numpy(), original_math(q, k, v, True, None).numpy(), atol=1e-5)
    mask = paddle.to_tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    padded = attention(q, k, v, causal=True, attention_mask=mask)
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(padded.numpy()[real], original_math(q, k, v, True, mask).numpy()[real], atol=1e-5)
    assert sdpa.calls == [{"causal": True, "mask": False, "kv_heads": 2}, {"causal": False, "mask": True, "kv_heads": 2}]
    assert math_calls == []
    attention(q[:, -1:], k, v, causal=True)  # a decode step
    mesh = dist.ProcessMesh([0], dim_names=["mp"])
    attention(*(dist.shard_tensor(x, mesh, [dist.Replicate()]) for x in (q, k, v)), causal=True)
    assert len(sdpa.calls) == 2 and len(math_calls) == 2


@pytest.mark.parametrize("launched", [False, True])
@pytest.mark.parametrize("tp, processes", [(2, None), (1, 2)], ids=["tp2", "eval-dp2"])
def test_tensor_parallel_parent_does_not_read_the_device(monkeypatch, tmp_path, launched, tp, processes):
    """Smaller finding (c): the parent of a multi-process `infer`/`serve`/`eval` (all use `check_model_args`)
    does not read the device (on a GPU build that creates a CUDA context on GPU 0 beside rank 0's); the ranks check
    `--dtype bfloat16` themselves, and refuse it on a device without bf16 — a data-parallel `eval` rank
    (tensor_parallel_degree 1 in a 2-process job) included."""
    from launch import infer as infer_mod
    from network.config import Qwen2VLConfig

    Qwen2VLConfig.preset("tiny").save_pretrained(str(tmp_path))
    reads = []
    monkeypatch.setattr(infer_mod, "bf16_supported", lambda: reads.append(1) or False)
    if launched:
        monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
        with pytest.raises(infer_mod.InferError, match="--dtype bfloat16 needs a GPU"):
            infer_mod.check_model_args(str(tmp_path), tp, None, "bfloat16", processes=processes)
        assert reads == [1]
    else:
        monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
        assert infer_mod.check_model_args(str(tmp_path), tp, None, "bfloat16", processes=processes) == str(tmp_path)
        assert reads == []


def test_every_rank_lifts_its_pixels_in_the_towers_dtype(monkeypatch):
    """Smaller finding (d): a trainable ViT's rank with images lifts its fp32 `pixel_values` in the tower's dtype
    (bf16 under O2), like an image-less rank, so the dist tensor has one dtype on every rank."""
    lifted = []
    monkeypatch.setattr(forward_mod, "lift_local", lambda x, mesh, dim: lifted.append(x) or x)

    class Tower:
        class config:
            in_channels, temporal_patch_size, patch_size, embed_dim, num_heads = 3, 2, 2, 8, 2
        patch_embed = type("P", (), {"proj": type("C", (), {"weight": _bf16(paddle.ones([1]))})()})()

        @staticmethod
        def rotary_cos_sin(grid):
            return paddle.zeros([4, 4]), paddle.zeros([4, 4])

        @staticmethod
        def forward_padded(pixels, cos, sin, segments):
            return pixels

    pixel_values = paddle.randn([4, 24])
    batch = type("B", (), {"max_patches": 6, "pixel_values": pixel_values, "grid_thw": np.array([[1, 2, 2]]),
                           "mesh": None})()
    out = forward_mod.distributed_vision_features(Tower(), batch)
    assert out.dtype == paddle.bfloat16 and lifted[0] is out and out.shape == [1, 6, 24]
    np.testing.assert_array_equal(out[0, :4].numpy(), _bf16(pixel_values).numpy())
    empty = type("B", (), {"max_patches": 6, "pixel_values": None, "mesh": None})()
    assert forward_mod.distributed_vision_features(Tower(), empty).dtype == paddle.bfloat16
