"""Issue 29's fixes that one process can check on a one-rank mesh: N8 (loss chunks from local shapes), N10 (the
pipeline norm: Partial gradients reduced once, one scalar reduction), N11 (ZeRO-1 reduces to the optimizer
shard), and the communication ledger's pieces that need no peer (reshard kinds, the planner's ring volumes)."""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.distributed as dist
import pytest

from autoparallel import gradients, pipeline
from autoparallel.comm_ledger import StepComm, render_comm_summary, reshard_kind
from autoparallel.forward import loss_chunk_rows
from autoparallel.planning.communication import Collective, wire_bytes_sent
from network.loss_chunks import rows_per_chunk


class _DistLike:
    """A dist tensor's shape facts only: global `shape`, this rank's `_local_shape`."""

    def __init__(self, shape, local):
        self.shape, self._local_shape = shape, local

    def is_dist(self) -> bool:
        return True


def test_n8_loss_chunks_are_sized_from_local_shapes():
    """N8: at dp 4 x mp 2 a rank computes logits of [1, K] rows x V/2 columns; the chunk must hold 8x the rows the
    global shapes [4, K, H] x V would give (old main sized from the global shapes)."""
    K, H, V = 4096, 64, 32768
    hidden = _DistLike([4, K, H], [1, K, H])
    weight = _DistLike([V, H], [V // 2, H])
    global_rows = rows_per_chunk([4, K, H], [V, H], transpose_weight=True)
    assert loss_chunk_rows(hidden, weight, transpose_weight=True) == 8 * global_rows
    dense = paddle.zeros([2, 3, H])
    assert loss_chunk_rows(dense, paddle.zeros([H, V]), transpose_weight=False) == rows_per_chunk(
        [2, 3, H], [H, V], transpose_weight=False)


@pytest.fixture
def mesh():
    return dist.ProcessMesh([0], dim_names=["dp"])


def _partial_grads(mesh, n=3):
    """A layer with replicated [4, 2] parameters whose gradients are Partial over "dp" (a dp-sharded batch
    through them)."""
    layer = paddle.nn.Layer()
    for i in range(n):
        init = paddle.nn.initializer.Constant(float(i + 1))
        param = layer.create_parameter([4, 2], default_initializer=init)
        layer.add_parameter(f"w{i}", dist.shard_tensor(param, mesh, [dist.Replicate()]))
    params = list(layer.parameters())
    x = dist.shard_tensor(paddle.ones([3, 4]), mesh, [dist.Shard(0)])
    sum(paddle.matmul(x, p).sum() for p in params).backward()
    assert all(p.grad.placements[0].is_partial() for p in params)
    return layer


def _spy_reshard(monkeypatch):
    calls = []
    original = dist.reshard

    def reshard(tensor, mesh, placements):
        calls.append((list(tensor.placements), list(placements)))
        return original(tensor, mesh, placements)

    monkeypatch.setattr(dist, "reshard", reshard)
    return calls


def test_n11_zero1_reduces_partial_gradients_to_the_optimizer_shard(mesh, monkeypatch):
    """N11: under ZeRO-1 a Partial gradient goes to the shard ShardingStage1 keeps (Partial -> Shard(0): a
    reduce-scatter), not to the replicated parameter's placements (Partial -> Replicate: an all-reduce)."""
    params = _partial_grads(mesh).parameters()
    optimizer = dist.shard_optimizer(paddle.optimizer.AdamW(parameters=params),
                                     dist.ShardingStage1("dp", mesh))
    axis = gradients.zero1_sharding_axis(optimizer)
    assert axis == 0
    calls = _spy_reshard(monkeypatch)
    gradients.reduce_partial_gradients_(params, axis)
    assert [dst for _, dst in calls] == [[dist.Shard(0)]] * 3
    assert all(p.grad.placements == [dist.Shard(0)] for p in params)
    np.testing.assert_allclose(params[0].grad.numpy(), np.full([4, 2], 3.0))
    assert gradients.zero1_sharding_axis(paddle.optimizer.AdamW(parameters=params)) is None
    stage2 = dist.shard_optimizer(paddle.optimizer.AdamW(parameters=params), dist.ShardingStage2("dp", mesh))
    assert gradients.zero1_sharding_axis(stage2) is None


def test_n10_pipeline_norm_reduces_partials_once_then_one_scalar(mesh, monkeypatch):
    """N10: `finish_gradients` reshards each Partial gradient once (to the parameter's placements) and takes the
    stage's sum of squares with ONE scalar reduction (old main: one blocking `replicated_value` per parameter,
    each squaring a Partial gradient)."""
    model = _partial_grads(mesh)
    stage = pipeline.Stage(index=0, num_stages=1, layers=range(0), mesh=mesh, prev_rank=None, next_rank=None,
                           tied_peer=None, ranks_per_stage=1)
    scalars = []
    monkeypatch.setattr(pipeline, "replicated_value",
                        lambda t: scalars.append(t) or t._local_value().numpy())
    monkeypatch.setattr(pipeline, "_world_sum", lambda value: value)
    calls = _spy_reshard(monkeypatch)
    norm = pipeline.finish_gradients(model, stage)
    assert len(scalars) == 1
    assert [src[0].is_partial() and dst == [dist.Replicate()] for src, dst in calls] == [True] * 3
    # grad of p = x^T @ ones = 3 everywhere: 3 params x 8 entries x 9
    assert math.isclose(norm, math.sqrt(3 * 8 * 9), rel_tol=1e-6)


def test_reshard_kinds_follow_the_placement_change():
    P, R, S0, S1 = dist.Partial(), dist.Replicate(), dist.Shard(0), dist.Shard(1)
    assert reshard_kind([P], [R]) == "all_reduce"
    assert reshard_kind([P, R], [S0, R]) == "reduce_scatter"
    assert reshard_kind([S0], [R]) == "all_gather"
    assert reshard_kind([S0], [S1]) == "all_to_all"
    assert reshard_kind([R], [S0]) == "local"
    assert reshard_kind([P, S0], [R, R]) == "all_reduce"


def test_planned_wire_bytes_are_ring_volumes():
    """The planner's ideal per-rank sent bytes: ring all-reduce 2(n-1)/n, all-gather/reduce-scatter (n-1)/n,
    send/recv entries half sent."""
    setup = type("S", (), {"degrees": type("D", (), {"dp": 4, "mp": 2})(), "pp": 1})()
    assert wire_bytes_sent(Collective("dp", "all_reduce", "g", 2, 1000), setup) == 2 * 1000 * 2 * 3 / 4
    assert wire_bytes_sent(Collective("dp", "reduce_scatter", "g", 1, 1000), setup) == 750
    assert wire_bytes_sent(Collective("mp", "all_gather", "g", 1, 1000), setup) == 500
    assert wire_bytes_sent(Collective("pp", "send/recv", "a", 4, 1000), setup) == 2000


def test_summary_puts_cpu_workarounds_on_their_own_line():
    step = StepComm(sent=3000, received=3000)
    step.bytes["all_reduce"] = [1000, 1000]
    step.bytes["reduce_scatter"] = [2000, 2000]
    step.calls.update(all_reduce=1, reduce_scatter=1)
    step.workaround["reduce_scatter"] = [2000, 2000]
    text = render_comm_summary([step], {"all_reduce": 3000}, {"all_reduce": 1000, "reduce_scatter": 1000})
    first, *kinds, workaround = text.splitlines()
    assert "measured/planned 1.000" in first
    assert workaround.strip().startswith("CPU-only workarounds") and "ratio 1.000" in workaround
    assert step.record()["kinds"]["other"] == {"sent": 0, "received": 0, "calls": None}


def test_n6_padded_vit_builds_one_mask_per_forward(monkeypatch):
    """N6: on the GPU path the trainable ViT's block-diagonal additive mask is built once per `forward_padded` and
    shared by every block (old main: one [B, 1, N, N] mask per block, each kept for backward); same output.
    Run on the simulated GPU (network/simulated_gpu.py, as QWEN2VL_AP_SIMULATE_GPU=1 does)."""
    import network.attention as attention_mod
    from network import simulated_gpu
    from network.config import Qwen2VLConfig
    from network.modeling_vision import Qwen2VisionTransformer, vision_segment_ids

    config = Qwen2VLConfig.preset("tiny").vision_config
    paddle.seed(0)
    tower = Qwen2VisionTransformer(config)
    grid = np.array([[1, 4, 4], [1, 4, 8]])
    n, width = 48, 56
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    pad = lambda x, value: paddle.concat([x, paddle.full([width - n, *x.shape[1:]], value, x.dtype)])[None]
    cos, sin = tower.rotary_cos_sin(grid)
    inputs = (pad(paddle.randn([n, patch_dim]), 0.0), pad(cos, 0.0), pad(sin, 0.0),
              pad(paddle.to_tensor(vision_segment_ids(grid)), -1))
    expected = tower.forward_padded(*inputs).numpy()

    built = []
    original = attention_mod.additive_mask
    monkeypatch.setattr(attention_mod, "additive_mask", lambda *a, **k: built.append(1) or original(*a, **k))
    simulated_gpu.activate()  # the simulated device: SDPA's real input contract, fp32 arithmetic
    try:
        out = tower.forward_padded(*inputs).numpy()
        calls = dict(simulated_gpu.calls)
    finally:
        simulated_gpu.deactivate()
    assert len(tower.blocks) > 1 and len(built) == 1 and calls.get("scaled_dot_product_attention") == len(tower.blocks)
    np.testing.assert_allclose(out[0, :n], expected[0, :n], rtol=1e-4, atol=1e-5)


def _setup(seq=256, mp=1, sharding=0, flash=True, vit=False, lora=None, dtype="bfloat16"):
    from autoparallel.planning.memory import PlanSetup, Workload
    from network.config import Qwen2VLConfig
    from placements.degrees import ParallelDegrees
    from placements.qwen2_vl import Trainable

    degrees = ParallelDegrees(tensor_parallel_degree=mp, **(dict(sharding_parallel_degree=2, sharding_stage=sharding)
                                                            if sharding else {}))
    workload = Workload(1, seq, image_grid=(1, 16, 16))
    return PlanSetup(Qwen2VLConfig.preset("qwen2-vl-2b"), degrees, workload, dtype=dtype,
                     trainable=Trainable(vit=vit, merger=vit), lora=lora, flash_attention=flash)


def test_n12_flash_decoder_layer_has_no_mask_nor_repeated_kv():
    """N12: with flash attention a decoder layer keeps nothing of size S^2 (training passes no mask: its bytes
    double with S) and k/v are not repeated to the query heads (2B: 12 heads, 2 KV heads); old main counted an
    additive [b, 1, S, S] mask and repeated k/v."""
    from autoparallel.planning.memory import _decoder_layer_saved, local_widths

    one, two = _setup(1024), _setup(2048)
    w = local_widths(one.config, 1)
    _, rest1, _ = _decoder_layer_saved(one, w)
    _, rest2, _ = _decoder_layer_saved(two, w)
    assert rest2 == 2 * rest1
    t, e = 1024, 2
    qkv = t * e * (3 * w.q + 2 * w.kv + w.kv + w.kv)  # q/k projections + rotary, v: no repeat
    assert rest1 == qkv + t * w.q * e + 4 * t * w.ffn * e + w.heads * t * 4


def test_n12_loss_forward_counts_the_fp32_head_gradient_accumulator():
    """N12/N8: the fused loss computes its gradients in its forward; over several chunks it sums the [V/mp, H]
    weight gradients in an fp32 accumulator beside the chunk's fp32 copy of its bf16 gradient, and keeps the bf16
    result (with the [K, H] hidden gradient, no logits) for the backward: 10 bytes per head weight element
    under bf16 (old main: 2), next to one chunk's [rows, V] blocks."""
    from autoparallel.planning.memory import activation_estimate, local_widths
    from network.loss_chunks import rows_per_chunk

    setup = _setup(seq=8192)  # 2048 supervised rows x 151936 fp32 logits: several chunks
    est = activation_estimate(setup)
    phases = {p.name: p.bytes for p in est.phases}
    kept = sum(x.bytes for x in est.saved)
    head = next(x.bytes for x in est.saved if x.name.startswith("loss head"))
    w, k = local_widths(setup.config, 1), setup.workload.supervised
    rows = rows_per_chunk([1, k, w.h], [w.vocab, w.h], transpose_weight=True)
    assert rows < k
    assert head == k * w.h * 2 + w.vocab * w.h * 2
    assert phases["loss forward"] - kept == rows * w.vocab * (6 * 4 + 2 * 2) + w.vocab * w.h * 8


def test_n12_trainable_vit_on_flash_keeps_one_patch_mask():
    """N12/N6: a trainable ViT on the GPU path keeps one additive [P, P] mask (shared by all blocks)."""
    from autoparallel.planning.memory import activation_estimate

    with_vit = {t.name: t.bytes for t in activation_estimate(_setup(vit=True)).saved}
    p = _setup(vit=True).workload.patches
    term = next(v for n, v in with_vit.items() if n.startswith("trainable ViT"))
    no_mask = {t.name: t.bytes for t in activation_estimate(_setup(vit=True, flash=False)).saved}
    assert p > 0 and term >= p * p * 2
    assert next(v for n, v in no_mask.items() if n.startswith("trainable ViT")) != term


def test_n12_lora_zero3_starts_dense():
    """N12: LoRA under ZeRO-3 loads the whole model first, as the trainer does (needs_dense_load ignores LoRA)."""
    from autoparallel.planning.memory import LoraSpec, startup_memory, state_memory
    from autoparallel.sharded_load import needs_dense_load

    setup = _setup(sharding=3, lora=LoraSpec(8, ("q_proj",)))
    assert needs_dense_load(3)
    assert startup_memory(setup, state_memory(setup)).dense_first


def test_n12_gpu_memory_report_has_device_peak(tmp_path, monkeypatch):
    """N12: on a GPU, memory_rank*.txt reports the device's peak allocated memory beside host RSS."""
    from autoparallel.engine import trainer as trainer_mod
    from network import device

    monkeypatch.setattr(device, "on_gpu", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    t = object.__new__(trainer_mod.Trainer)
    t.rank, t.step, t.output_dir = 0, 5, tmp_path
    assert t.report_peak_memory()["peak_allocated_bytes"] == 3 * 2**30
    lines = (tmp_path / "memory_rank0.txt").read_text().splitlines()
    assert lines[0].startswith("peak RSS")
    assert lines[1] == f"peak device memory allocated after 5 steps: 3.000 GiB ({3 * 2**30} bytes, during the steps)"


def test_host_peak_allocated_is_the_steps_peak(tmp_path):
    """On CPU the figure is Paddle's host allocator peak since the reset at the start of the steps: a tensor
    freed before the reset does not count, one alive during the steps does, to the byte."""
    from autoparallel.engine import trainer as trainer_mod
    from network.device import allocated_bytes, reset_peak_allocated

    before = paddle.zeros([4096, 1024])  # 16 MiB, freed before the "steps"
    del before
    reset_peak_allocated()
    base = allocated_bytes()
    step = paddle.zeros([1024, 1024])  # 4 MiB during the "steps"
    del step
    t = object.__new__(trainer_mod.Trainer)
    t.rank, t.step, t.output_dir = 1, 2, tmp_path
    assert t.report_peak_memory()["peak_allocated_bytes"] == base + 4 * 2**20
    assert f"({base + 4 * 2**20} bytes, during the steps)" in (tmp_path / "memory_rank1.txt").read_text()


def test_first_step_moment_creation_counts_whole_moments_of_a_split_tensor():
    """Paddle creates AdamW's moments at the parameter's global shape, then shards them: under mp2 the tiny
    preset's vocab-split embedding (the largest tensor) has its two whole fp32 moments and one shard alive, less
    the two shards the state counts (bench_comm: 262.07 MiB measured, 262.84 planned on rank 0)."""
    from autoparallel.planning.memory import PlanSetup, Workload, state_memory
    from network.config import Qwen2VLConfig
    from placements.degrees import ParallelDegrees

    config = Qwen2VLConfig.preset("tiny")
    table = config.vocab_size * config.hidden_size
    mp2 = state_memory(PlanSetup(config, ParallelDegrees(tensor_parallel_degree=2), Workload(2, 48)))
    dp2 = state_memory(PlanSetup(config, ParallelDegrees(data_parallel_degree=2), Workload(2, 48)))
    assert mp2.moment_creation == 2 * 4 * table + 4 * table // 2 - 2 * 4 * table // 2
    assert dp2.moment_creation == 4 * table  # unsplit: only the copy shard_tensor makes


def test_step_workload_plans_the_recorded_shapes():
    """The bench plans each step as the trainer recorded it: padded length, patches, loss positions exactly."""
    from autoparallel.planning.memory import Workload
    from autoparallel.planning.setup import step_workload

    for batch, seq, patches, positions in ((2, 48, 80, 4), (2, 40, 32, 7), (2, 128, 0, 1), (3, 96, 2 * 1296, 61),
                                           (3, 40, 100, 13)):
        wl = step_workload(Workload(batch=batch, seq_len=4096, image_grid=(1, 36, 36)), seq, patches, positions)
        assert (wl.seq_len, wl.patches, wl.supervised) == (seq, patches, positions)


def test_decode_communication_per_token():
    """A generated token under mp2: the embedding and two rowwise all-reduces per layer of [b, 1, H], the
    vocab-split logits all-gathered; nothing without mp."""
    from autoparallel.planning.communication import decode_communication, planned_sent_by_kind
    from autoparallel.planning.memory import PlanSetup, Workload
    from network.config import Qwen2VLConfig
    from placements.degrees import ParallelDegrees

    config = Qwen2VLConfig.preset("tiny")
    setup = PlanSetup(config, ParallelDegrees(tensor_parallel_degree=2), Workload(1, 1))
    sent = planned_sent_by_kind(decode_communication(setup, batch=3), setup)
    h, v = config.hidden_size, config.vocab_size
    assert sent == {"all_reduce": (1 + 2 * config.num_hidden_layers) * 3 * h * 4, "all_gather": 3 * v * 4 // 2}
    assert decode_communication(PlanSetup(config, ParallelDegrees(), Workload(1, 1))) == []


def test_context_parallel_plan_reduces_only_the_split_gradients():
    """Under cp the embedding lookup and the vision tower run on the whole sequence on every cp rank: their
    gradients are complete and not reduced over "cp" (bench_comm cp2 once measured 1.48 MiB/step where the plan
    counted every trainable tensor). The decoder layers and final norm run on each rank's tokens and the head on
    its share of the supervised rows: theirs are (the tiny preset's head is tied: the table's)."""
    import numpy as np

    from autoparallel.planning.communication import communication
    from autoparallel.planning.memory import PlanSetup, Workload
    from network.config import Qwen2VLConfig
    from placements.degrees import ParallelDegrees
    from placements.qwen2_vl import parameter_shapes

    config = Qwen2VLConfig.preset("tiny")
    setup = PlanSetup(config, ParallelDegrees(context_parallel_degree=2), Workload(2, 48))
    reduced = [c for c in communication(setup, cpu=True) if c.group == "cp" and c.op == "all_reduce"]
    split = [int(np.prod(s)) * 4 for n, s in parameter_shapes(config).items()
             if n.startswith(("model.layers.", "model.norm.", "model.embed_tokens."))]
    assert config.tie_word_embeddings and len(reduced) == 1 and reduced[0].calls == len(split)
    assert reduced[0].bytes_per_call == sum(split) // len(split)
