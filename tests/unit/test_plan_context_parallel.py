"""#32 context parallel in the planner: decoder activations divided by the context degree, the Ulysses exchanges
listed (all-to-all on GPU and, as pairwise send/recv, on CPU), `qwen2vl-ap plan` advice reaching for cp when one long
sample does not fit, and degree checks before any worker."""
from __future__ import annotations

import dataclasses

from autoparallel.planning.communication import communication
from autoparallel.planning.memory import PlanSetup, Workload, activation_estimate
from launch.plan import PlanOptions, advise, build, plan_main
from parallel_cases import tiny_config
from placements.degrees import ParallelDegrees, degree_problems

CP2 = ParallelDegrees(context_parallel_degree=2)


def _decoder_bytes(degrees: ParallelDegrees, recompute: bool) -> int:
    saved = activation_estimate(PlanSetup(tiny_config(), degrees, Workload(1, 256, recompute=recompute))).saved
    return sum(t.bytes for t in saved if t.name.startswith("decoder"))


def test_context_parallel_halves_decoder_activations():
    for recompute in (False, True):
        assert _decoder_bytes(CP2, recompute) * 2 == _decoder_bytes(ParallelDegrees(), recompute)


def test_ulysses_collectives_listed():
    config = tiny_config()
    wl = Workload(batch=1, seq_len=64, gradient_accumulation_steps=3)
    layers = config.num_hidden_layers
    for cpu in (False, True):  # gloo: pairwise send/recv moving the all-to-all's bytes (cpu_compat)
        cp = [c for c in communication(PlanSetup(config, CP2, wl), cpu=cpu) if c.group == "cp"]
        exchanges = [c for c in cp if "Ulysses" in c.phase or "exchanges" in c.phase]
        assert [c.op for c in exchanges] == ["all_to_all", "all_to_all"]
        assert sum(c.calls for c in exchanges) == 3 * 4 * layers * 2
        # q/k/v/o pieces of S/cp tokens: (2 x heads + 2 x kv heads) x head_dim / 4 per call, fp32, on CPU too.
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        assert exchanges[0].bytes_per_call == 32 * (2 * q + 2 * kv) * 4 // 4
        assert any(c.op == "all_reduce" and c.phase.startswith("gradients") for c in cp)
    # cp2 x mp2: one KV head per mp rank, repeated for the two cp ranks (q: 2 of the 4 heads per mp rank).
    cp_mp = communication(PlanSetup(config, ParallelDegrees(context_parallel_degree=2, tensor_parallel_degree=2), wl))
    exchange = next(c for c in cp_mp if c.group == "cp" and "Ulysses" in c.phase)
    assert exchange.bytes_per_call == 32 * (2 * q // 2 + 2 * 2 * kv // 2) * 4 // 4
    assert not any(c.group == "cp" for c in communication(PlanSetup(config, ParallelDegrees(), wl)))


def test_plan_advice_suggests_context_parallel_for_a_long_sample():
    """A 64k-token sample (few supervised tokens) does not fit 23.5 GiB per rank even with recompute on, stage 2/3
    or a smaller batch; cp2 (sharding 4 -> 2) is the first change that fits, and replanning it agrees."""
    options = PlanOptions(device_memory_gb=23.5, nproc_per_node=4, supervised_fraction=0.01)
    overrides = {"model_name_or_path": "qwen2-vl-2b", "max_seq_length": 65536, "per_device_train_batch_size": 1,
                 "recompute": True, "sharding_parallel_degree": 4}
    assert build("qwen2vl_2b_sft_auto", overrides, options).memory.total > 23.5 * 2**30
    attempts = advise("qwen2vl_2b_sft_auto", overrides, options)
    assert attempts[-1].fits and not any(a.fits for a in attempts[:-1]), [(a.change, a.total) for a in attempts]
    assert attempts[-1].change.startswith("context_parallel_degree 1 -> 2")
    replanned = build("qwen2vl_2b_sft_auto", overrides | attempts[-1].overrides, options)
    assert not replanned.problems and replanned.memory.total == attempts[-1].total <= 23.5 * 2**30


def test_plan_command_cp2(capsys):
    code = plan_main(["--config", "qwen2vl_2b_sft_auto", "--model_name_or_path", "qwen2-vl-2b",
                      "--sequence_parallel_size", "2", "--sharding_parallel_degree", "4", "--nproc_per_node", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sequence-split over cp (2)" in out and "Ulysses" in out and "all_to_all" in out


def test_context_parallel_degree_checks():
    config = tiny_config()  # 4 heads, 2 KV heads
    assert degree_problems(CP2, config, 2) == []
    assert degree_problems(ParallelDegrees(context_parallel_degree=4), config, 4) == []  # 2 KV heads repeated
    assert degree_problems(ParallelDegrees(context_parallel_degree=2, tensor_parallel_degree=2), config, 4) == []
    problems = degree_problems(ParallelDegrees(context_parallel_degree=2, tensor_parallel_degree=4), config, 8)
    assert problems == ["num_attention_heads=4 is not divisible by context_parallel_degree 2 x tensor_parallel_degree "
                        "4 = 8 (Ulysses attention splits the heads over both)",
                        "num_key_value_heads=2 is not divisible by tensor_parallel_degree=4, which "
                        "context_parallel_degree=2 needs"]
    six_heads = dataclasses.replace(config, hidden_size=192, num_attention_heads=6,  # head_dim 32, 2 KV heads
                                    vision_config=dataclasses.replace(config.vision_config, hidden_size=192))
    problems = degree_problems(ParallelDegrees(context_parallel_degree=3), six_heads, 3)
    assert problems == ["num_key_value_heads=2 / tensor_parallel_degree 1 = 2 KV heads per rank and "
                        "context_parallel_degree=3: one must divide the other (Ulysses splits them over cp, or "
                        "repeats them)"]
    assert any(p.startswith("world size 4 != ") and "context_parallel_degree 2" in p
               for p in degree_problems(CP2, config, 4))
    assert any("sequence_parallel=true is not supported" in p for p in degree_problems(
        ParallelDegrees(context_parallel_degree=2, tensor_parallel_degree=2, sequence_parallel=True), config, 4))
