"""Parallel degrees as data: what a run asks for and every reason it cannot run, checked before any process
starts (no paddle import, so planning and the parent process stay light). `autoparallel.mesh` turns valid degrees
into a `ProcessMesh`.

- "dp" has size data_parallel_degree x sharding_parallel_degree: plain data parallel, or ZeRO sharding
  (stage 1/2/3) over the same dim — one of the two, not both (a 1-D dim cannot hold dp x sharding groups).
- "mp" is tensor parallel (Megatron column/row split, vocab-parallel embedding and head).
- "cp" is context parallel (autoparallel/context_parallel.py): each rank holds a contiguous slice of every
  sequence; attention trades sequence for heads (Ulysses), so heads and KV heads are split over cp x mp.
- "pp" indexes pipeline stages (autoparallel/pipeline.py).
Every problem found is reported at once, each message naming the offending numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from network.config import Qwen2VLConfig


class DegreeError(ValueError):
    """Parallel degrees that cannot run with this model, world size or batch."""


@dataclass(frozen=True)
class ParallelDegrees:
    data_parallel_degree: int = 1
    tensor_parallel_degree: int = 1
    sharding_parallel_degree: int = 1
    sharding_stage: int = 0  # 0: none; 1/2/3: ZeRO stage over the "dp" dim
    pipeline_parallel_degree: int = 1
    sequence_parallel: bool = False  # decoder activations sequence-sharded over "mp" (autoparallel/sequence_parallel.py)
    context_parallel_degree: int = 1  # the "cp" dim: every sequence split over it (autoparallel/context_parallel.py)

    @property
    def dp(self) -> int:
        return self.data_parallel_degree * self.sharding_parallel_degree

    @property
    def mp(self) -> int:
        return self.tensor_parallel_degree

    @property
    def cp(self) -> int:
        return self.context_parallel_degree

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.mp * self.pipeline_parallel_degree

    def kv_heads_sharded(self, config: Qwen2VLConfig) -> bool:
        """k/v projections are column-split when mp divides the KV heads; replicated when KV heads divide mp."""
        return config.num_key_value_heads % self.mp == 0


def degree_problems(
    degrees: ParallelDegrees,
    config: Qwen2VLConfig | None = None,
    world_size: int | None = None,
    *,
    per_device_batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
    global_batch_size: int | None = None,
    allow_pipeline: bool = False,
    cpu_build: bool = False,
) -> list[str]:
    """All reasons these degrees cannot run (empty when they can). `allow_pipeline`: the caller runs pipeline
    stages (autoparallel/pipeline.py); entry points that do not must keep rejecting pp > 1. `cpu_build`: also
    report what Paddle's CPU build cannot run."""
    d, problems = degrees, []
    named = {
        "data_parallel_degree": d.data_parallel_degree, "tensor_parallel_degree": d.tensor_parallel_degree,
        "sharding_parallel_degree": d.sharding_parallel_degree, "pipeline_parallel_degree": d.pipeline_parallel_degree,
        "context_parallel_degree": d.context_parallel_degree,
    }
    problems += [f"{k}={v} must be >= 1" for k, v in named.items() if v < 1]
    if problems:
        return problems
    if d.pipeline_parallel_degree > 1 and not allow_pipeline:
        problems.append(f"pipeline_parallel_degree={d.pipeline_parallel_degree}: this entry point does not "
                        "run pipeline stages (training does: autoparallel/pipeline.py)")
    if config is not None and d.pipeline_parallel_degree > config.num_hidden_layers:
        problems.append(f"pipeline_parallel_degree={d.pipeline_parallel_degree} > num_hidden_layers="
                        f"{config.num_hidden_layers}: every stage needs a decoder layer")
    if d.pipeline_parallel_degree > 1 and d.sharding_stage == 3:
        problems.append(f"pipeline_parallel_degree={d.pipeline_parallel_degree} with sharding_stage=3 is not "
                        "supported (stage-local ZeRO-3 is untested with the pipeline schedule); use stage 1/2")
    if d.sharding_stage not in (0, 1, 2, 3):
        problems.append(f"sharding_stage={d.sharding_stage} must be 0, 1, 2 or 3")
    if d.sharding_parallel_degree > 1 and d.sharding_stage == 0:
        problems.append(f"sharding_parallel_degree={d.sharding_parallel_degree} needs sharding_stage 1, 2 or 3")
    if d.sharding_stage > 0 and d.sharding_parallel_degree == 1:
        problems.append(f"sharding_stage={d.sharding_stage} needs sharding_parallel_degree > 1 "
                        "(the ranks the states are sharded over)")
    if d.data_parallel_degree > 1 and d.sharding_parallel_degree > 1:
        problems.append(f"data_parallel_degree={d.data_parallel_degree} and sharding_parallel_degree="
                        f"{d.sharding_parallel_degree} are both > 1: sharding runs over the whole dp dim, use "
                        f"sharding_parallel_degree={d.dp} alone")
    if world_size is not None and world_size != d.world_size:
        problems.append(f"world size {world_size} != data_parallel_degree {d.data_parallel_degree} x "
                        f"sharding_parallel_degree {d.sharding_parallel_degree} x context_parallel_degree {d.cp} x "
                        f"tensor_parallel_degree {d.mp} x pipeline_parallel_degree {d.pipeline_parallel_degree} = "
                        f"{d.world_size}")
    if d.sharding_stage == 3 and d.dp > 1 and d.mp > 1 and cpu_build:
        problems.append(f"sharding_stage=3 on a dp x mp mesh ({d.dp} x {d.mp}) fails in Paddle 3.3.1's CPU build; "
                        "use stage 1/2 with tensor parallel, or stage 3 without it")
    problems += context_parallel_problems(d, config)
    if config is not None:
        mp = d.mp
        if config.num_attention_heads % mp:
            problems.append(f"num_attention_heads={config.num_attention_heads} is not divisible by "
                            f"tensor_parallel_degree={mp}")
        kv = config.num_key_value_heads
        if kv % mp and mp % kv:
            problems.append(f"num_key_value_heads={kv} and tensor_parallel_degree={mp}: one must divide the other "
                            "(KV heads are split when mp divides them, replicated when they divide mp)")
        if config.vocab_size % mp:
            problems.append(f"vocab_size={config.vocab_size} is not divisible by tensor_parallel_degree={mp}")
        if config.intermediate_size % mp:
            problems.append(f"intermediate_size={config.intermediate_size} is not divisible by "
                            f"tensor_parallel_degree={mp}")
    if per_device_batch_size is not None and global_batch_size is not None:
        expected = per_device_batch_size * d.dp * gradient_accumulation_steps
        if expected != global_batch_size:
            problems.append(f"global batch {global_batch_size} != per_device_batch_size {per_device_batch_size} x "
                            f"dp {d.dp} x gradient_accumulation_steps {gradient_accumulation_steps} = {expected}")
    return problems


def context_parallel_problems(d: ParallelDegrees, config: Qwen2VLConfig | None) -> list[str]:
    """Ulysses splits each rank's heads over cp (after mp's split: cp x mp ways), each rank attending over the
    whole sequence for its heads (autoparallel/context_parallel.py). KV heads fewer than cp per mp rank are
    repeated, so their count per mp rank and cp must divide one another."""
    if d.cp == 1:
        return []
    problems = []
    if d.pipeline_parallel_degree > 1:
        problems.append(f"context_parallel_degree={d.cp} with pipeline_parallel_degree={d.pipeline_parallel_degree} "
                        "is not supported")
    if d.sequence_parallel:
        problems.append(f"context_parallel_degree={d.cp} with sequence_parallel=true is not supported: use one of them")
    if d.sharding_stage == 3:
        problems.append(f"context_parallel_degree={d.cp} with sharding_stage=3 is not supported; use stage 1/2")
    if config is not None:
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        if heads % (d.cp * d.mp):
            problems.append(f"num_attention_heads={heads} is not divisible by context_parallel_degree {d.cp} x "
                            f"tensor_parallel_degree {d.mp} = {d.cp * d.mp} (Ulysses attention splits the heads "
                            "over both)")
        if kv % d.mp:
            # Fewer KV heads than mp ranks are replicated over mp (no KV head per query-head group to exchange).
            problems.append(f"num_key_value_heads={kv} is not divisible by tensor_parallel_degree={d.mp}, which "
                            f"context_parallel_degree={d.cp} needs")
        elif (kv // d.mp) % d.cp and d.cp % (kv // d.mp):
            problems.append(f"num_key_value_heads={kv} / tensor_parallel_degree {d.mp} = {kv // d.mp} KV heads per "
                            f"rank and context_parallel_degree={d.cp}: one must divide the other (Ulysses splits "
                            "them over cp, or repeats them)")
    return problems


def validate_degrees(degrees: ParallelDegrees, config: Qwen2VLConfig | None = None,
                     world_size: int | None = None, **batch) -> None:
    """Raise `DegreeError` listing every problem; see `degree_problems` for the batch keywords."""
    problems = degree_problems(degrees, config, world_size, **batch)
    if problems:
        raise DegreeError("invalid parallel degrees:\n  - " + "\n  - ".join(problems))
