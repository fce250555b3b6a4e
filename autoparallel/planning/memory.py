"""Will it fit? Per-rank memory of a training run, from the plan data alone: no model, no workers.

State (exact, checked against `autoparallel.planning.memory_report.memory_report` after real engine steps in
tests/dist/test_planner.py): every parameter's local shape comes from `placements.layout` (LoRA adapters from
`placements.lora.adapter_layout`) over `parameter_shapes(config)`, the same rules `dist.parallelize` applies.

- parameters in the model dtype; the frozen ViT dense and whole on every rank (no gradient, no state); a
  trainable ViT (`Trainable.vit`) replicated on the mesh with gradients and AdamW state like any parameter the
  tensor-parallel plan does not split (ZeRO shards it); frozen parts inside the distributed model (the LLM under
  freeze_llm, LoRA base weights) keep their mp shard only.
- gradients in the model dtype, only for trainable tensors; ZeRO-2/3 shard them over "dp".
- AdamW: moment1 + moment2 in fp32, an fp32 master weight for bf16/fp16 parameters (O2), two [1] fp32
  beta-power accumulators per parameter (never sharded). ZeRO-1/2/3 shard moments and master weights.
- LoRA: only adapters train. Base weights stay in the model dtype on their mp shard and, since only
  optimizer parameters are ZeRO-sharded, are never split over "dp", not even at stage 3.

Activations: see `activation_estimate`, a sum of the tensors autograd keeps per op (counted from network/,
autoparallel/forward.py and Paddle's kernels) plus the largest transient of each phase of a step; the peak of
the step is the largest phase. Within 25% of Paddle's allocator peak on CPU (tests/dist/test_planner.py).

Pipeline parallel (pp > 1): a rank holds only its stage's parameters (`placements.parameter_stages`, the rules
of autoparallel/pipeline.py), so state and activations are planned per stage and the fullest stage is the
answer (`stage_memory_plans` has each). The schedule is FThenB: every micro-batch's forward runs before the
first backward, so all `gradient_accumulation_steps` micro-batches' saved activations of the stage are alive
at once. Sequence parallel: the decoder's RMSNorm activations (residual stream) are split over "mp".
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from network.config import Qwen2VLConfig
from network.loss_chunks import rows_per_chunk
from placements.degrees import ParallelDegrees
from placements.lora import adapter_layout, adapter_shapes
from placements.qwen2_vl import (FROZEN_VISION, ParamLayout, Trainable, layout, parameter_shapes, parameter_stages,
                                  pipeline_layer_split)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Ops bf16 O2 autocast runs in half precision beyond Paddle's lists (the trainer's autocast passes them, as
# PaddleMIX's trainer does): Paddle keeps the embedding lookup in fp32 (amp_lists EXTRA_BLACK_LIST), which
# would make the embedding output, and with it the whole residual stream, fp32.
O2_WHITE_LIST = frozenset({"lookup_table", "lookup_table_v2"})


def residual_dtype(param_dtype: str) -> str:
    """The decoder's residual stream (each layer's input: what recompute keeps, what a pipeline stage sends on):
    the embedding output, in the weights' dtype under O2 only while its lookup is on `O2_WHITE_LIST`."""
    return param_dtype if param_dtype == "float32" or "lookup_table_v2" in O2_WHITE_LIST else "float32"


GiB = 2**30


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    """What one rank processes per micro-step. Every sample is assumed to fill `seq_len` (the collator pads
    to the longest sample of the global batch) and to carry `images_per_sample` images of `image_grid`."""

    batch: int  # per_device_train_batch_size
    seq_len: int  # max_seq_length
    image_grid: tuple[int, int, int] = (1, 0, 0)  # (t, h, w) in patches per image
    images_per_sample: int = 1
    # Share of positions whose next token is supervised: the engine computes logits only there.
    supervised_fraction: float = 0.25
    recompute: bool = False
    gradient_accumulation_steps: int = 1
    vit_recompute: bool = False  # a trainable ViT's blocks recomputed in backward
    rank_patches: int | None = None  # this rank's patches as a step recorded them, instead of the image count

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def patches(self) -> int:
        if self.rank_patches is not None:
            return self.rank_patches
        t, h, w = self.image_grid
        return self.batch * self.images_per_sample * t * h * w

    @property
    def supervised(self) -> int:
        return max(1, math.ceil(self.supervised_fraction * self.tokens))


@dataclass(frozen=True)
class PlanSetup:
    config: Qwen2VLConfig
    degrees: ParallelDegrees
    workload: Workload
    dtype: str = "float32"  # parameters and activations (bf16: O2 with fp32 master weights)
    trainable: Trainable = FROZEN_VISION
    lora: LoraSpec | None = None
    # Attention kernel: flash (CUDA, half precision) keeps O(S) per layer; the exact math path (CPU, fp32)
    # keeps the [b, heads, S, S] probabilities. network/attention.py picks the same way.
    flash_attention: bool = False
    layers_per_stage: tuple[int, ...] | None = None  # explicit pipeline split (None: the cost model's)

    @property
    def pp(self) -> int:
        return self.degrees.pipeline_parallel_degree

    def trained(self) -> Trainable:
        """What trains: `trainable`, or under LoRA the parts holding adapters (their base weights stay frozen)."""
        if not self.lora:
            return self.trainable
        return Trainable.holding(adapter_shapes(parameter_shapes(self.config), list(self.lora.targets),
                                                self.lora.rank))

    def stage_split(self) -> list[range]:
        """Decoder layers of each pipeline stage (one stage holding all when pp = 1)."""
        return pipeline_layer_split(self.config, self.pp, list(self.layers_per_stage) if self.layers_per_stage else None)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str = ""


@dataclass
class StateMemory:
    """Bytes one rank holds between steps. All ranks of a (stage's) dp x mp mesh hold the same; where a dim does
    not divide, shards are rounded up (rank 0 is the fullest)."""

    stage: int = 0  # pipeline stage these bytes are for
    param: int = 0
    grad: int = 0
    optimizer: int = 0
    largest_grad: int = 0  # one local gradient: the most the optimizer update allocates (measured under mp)
    # The first optimizer step creates each tensor's AdamW moments at its global shape and only then shards them
    # (Paddle 3.3.1 `_add_accumulator`, then `_shard_accumulator`): the largest such tensor's two whole moments
    # and one cut shard at once, less its own two shards the state already counts.
    moment_creation: int = 0
    terms: list[Term] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.param + self.grad + self.optimizer


def numel(shape) -> int:
    return int(np.prod(shape)) if shape else 1


MOMENT_BYTES = 2 * 4  # AdamW moment1 + moment2, fp32, per element
MASTER_BYTES = 4  # fp32 master weight per element, for bf16/fp16 parameters (O2)
BETA_POW_BYTES = 2 * 4  # beta1/beta2 power accumulators: two [1] fp32 tensors per parameter, never sharded


def optimizer_state_bytes(state_numel: int, param_dtype: str) -> tuple[int, int, int]:
    """The AdamW byte rule for one trainable tensor with `state_numel` local state elements:
    (moments, master weight, beta powers) bytes."""
    master = MASTER_BYTES if param_dtype != "float32" else 0
    return state_numel * MOMENT_BYTES, state_numel * master, BETA_POW_BYTES


@dataclass(frozen=True)
class ParamRow:
    """One folded parameter pattern (repeated layers share shapes and placements) and what one rank holds of it,
    summed over its `count` tensors."""

    pattern: str  # "model.layers.*.mlp.up_proj.weight"
    count: int
    layout: ParamLayout
    stages: tuple[int, ...]  # pipeline stages holding these tensors (each such rank holds the bytes)
    kind: str  # "vit" (frozen, dense), "base" (frozen in the dist model: LoRA base, freeze_llm), "trainable"
    param_bytes: int
    grad_bytes: int
    moment_bytes: int
    master_bytes: int
    beta_bytes: int

    @property
    def optimizer_bytes(self) -> int:
        return self.moment_bytes + self.master_bytes + self.beta_bytes


def parameter_rows(setup: PlanSetup) -> list[ParamRow]:
    """Every parameter of the planned model (LoRA adapters included), folded by pattern, shape and stages, in
    model order, with its per-rank bytes: the one fold and byte rule behind `state_memory`, the plan table of
    plan.txt and the ideal column of `memory_report`."""
    config, d, split = setup.config, setup.degrees, setup.stage_split()
    size = DTYPE_BYTES[setup.dtype]
    shapes = parameter_shapes(config)
    adapters = adapter_shapes(shapes, list(setup.lora.targets), setup.lora.rank) if setup.lora else {}
    trainable = setup.trained()
    folded: dict[tuple[str, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for name, shape in [*shapes.items(), *adapters.items()]:
        key = (re.sub(r"\.\d+\.", ".*.", name), tuple(shape), parameter_stages(name, config, split))
        folded.setdefault(key, []).append(name)
    rows = []
    for (pattern, shape, stages), names in folded.items():
        name, n = names[0], len(names)
        if name in adapters:
            lay = adapter_layout(name, shape, config, d.dp, d.mp, d.sharding_stage)
        else:
            # Frozen LoRA base weights are outside the optimizer: ZeRO never shards them.
            zero = 0 if setup.lora else d.sharding_stage
            lay = layout(name, shape, config, d.dp, d.mp, zero, trainable)
        frozen = lay.state_local_shape is None or (setup.lora is not None and name not in adapters)
        kind = "vit" if lay.dense else "base" if frozen else "trainable"
        grad = moments = master = betas = 0
        if kind == "trainable":
            grad_shape = lay.grad_local_shape
            if d.sharding_stage == 1:  # N11: the train step reduce-scatters Partial gradients to the ZeRO-1 shard
                grad_shape = lay.state_local_shape
            grad = numel(grad_shape) * size
            moments, master, betas = optimizer_state_bytes(numel(lay.state_local_shape), setup.dtype)
        rows.append(ParamRow(pattern, n, lay, stages, kind, n * numel(lay.local_shape) * size, n * grad,
                             n * moments, n * master, n * betas))
    return rows


def state_memory(setup: PlanSetup, stage: int | None = None) -> StateMemory:
    """Parameters, gradients and optimizer states per rank of pipeline `stage` (default: the fullest stage;
    exact for the engine's layouts)."""
    if stage is None:
        return max((state_memory(setup, s) for s in range(setup.pp)), key=lambda m: m.total)
    d = setup.degrees
    rows = [r for r in parameter_rows(setup) if stage in r.stages]

    def total(attr: str, kind: str | None = None) -> int:
        return sum(getattr(r, attr) for r in rows if kind is None or r.kind == kind)

    largest = max((r.grad_bytes // r.count for r in rows if r.kind == "trainable"), default=0)
    creation = max((MOMENT_BYTES * numel(r.layout.shape) - MOMENT_BYTES // 2 * numel(r.layout.state_local_shape)
                    for r in rows if r.kind == "trainable"), default=0)
    mem = StateMemory(stage=stage, param=total("param_bytes"), grad=total("grad_bytes"),
                      optimizer=total("optimizer_bytes"), largest_grad=largest, moment_creation=creation)
    master = total("master_bytes")
    mem.terms = [
        *([Term("frozen ViT (dense, every rank)", total("param_bytes", "vit"), "no gradient, no optimizer state")]
          if total("param_bytes", "vit") else []),
        *([Term("frozen base weights (LoRA)" if setup.lora else "frozen weights (distributed model)",
                total("param_bytes", "base"), "mp shard, not ZeRO-sharded")] if total("param_bytes", "base") else []),
        Term("LoRA adapters" if setup.lora else f"trainable parameters ({setup.trained().names()})",
             total("param_bytes", "trainable"), setup.dtype),
        Term("gradients", mem.grad, setup.dtype + (", ZeRO-sharded" if d.sharding_stage >= 2 else "")),
        Term("AdamW moment1 + moment2", total("moment_bytes"), "fp32" + (", ZeRO-sharded" if d.sharding_stage else "")),
        *([Term("fp32 master weights", master, "O2")] if master else []),
        Term("beta1/beta2 powers", total("beta_bytes"), "2 x [1] fp32 per parameter"),
    ]
    return mem


# ---- activations ------------------------------------------------------------------------------------------
@dataclass
class ActivationEstimate:
    """Per-rank bytes above the state during one micro-step: `saved` are alive from the forward into the
    backward; each phase adds its own largest transient; `peak` is the largest phase."""

    saved: list[Term]
    phases: list[Term]
    stage: int = 0  # pipeline stage
    micro_batches_alive: int = 1  # FThenB under pp: every micro-batch's `saved` at once

    @property
    def peak(self) -> int:
        return max(p.bytes for p in self.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: p.bytes).name


@dataclass(frozen=True)
class LocalWidths:
    """Per-rank widths under tensor parallel (dist tensor shapes are global; these are the local pieces)."""

    h: int
    q: int  # local query heads x head_dim
    kv: int  # local key/value heads x head_dim (all of them when replicated, mp > KV heads)
    heads: int
    ffn: int
    vocab: int


def local_widths(config: Qwen2VLConfig, mp: int) -> LocalWidths:
    heads = config.num_attention_heads // mp
    kv_heads = config.num_key_value_heads // mp if config.num_key_value_heads % mp == 0 else \
        config.num_key_value_heads
    return LocalWidths(h=config.hidden_size, q=heads * config.head_dim, kv=kv_heads * config.head_dim, heads=heads,
                  ffn=config.intermediate_size // mp, vocab=config.vocab_size // mp)


def _decoder_layer_saved(setup: PlanSetup, w: LocalWidths) -> tuple[int, int, int]:
    """(bytes autograd keeps for one decoder layer's two RMSNorms, for the rest of the layer, bytes of its
    largest backward transient)."""
    wl, e, d = setup.workload, DTYPE_BYTES[setup.dtype], setup.degrees
    t, b, s = wl.tokens, wl.batch, wl.seq_len
    # RMSNorm x2: the fp32 input (a cast copy under bf16, the input itself in fp32), x*rsqrt, weight*x.
    # Sequence parallel: they run on S/mp tokens; the norm output all-gathered for the colwise projections
    # is then a separate full [b, S, H] tensor they keep (without SP it is weight*x itself).
    sp = d.sequence_parallel and d.mp > 1
    norms = 2 * t * w.h * (4 + 2 * e) // (d.mp if sp else 1)
    gathered = 2 * t * w.h * e if sp else 0
    # GQA: the math path repeats k and v to the query head count; the flash kernels take fewer KV heads natively
    # and only KV heads replicated over mp (mp > KV heads) are repeated to the local query heads.
    kv_replicated = setup.config.num_key_value_heads % d.mp != 0
    repeated = w.q != w.kv and (not setup.flash_attention or kv_replicated)
    # q, k: projection, rotate_half, rotated sum; v: projection (its repeat replaces it when GQA).
    qkv = t * e * (3 * w.q + 2 * w.kv + (2 * w.q if repeated else w.kv) + (w.q if repeated else w.kv))
    out = t * w.q * e  # attention output made contiguous for o_proj
    mlp = 4 * t * w.ffn * e  # gate, silu(gate), up, silu*up
    if setup.flash_attention:
        # Causal flash (training passes no mask, forward.py) or FlashMask over packed rows: q, k, v (counted),
        # out and the fp32 log-sum-exp; no [S, S] tensor.
        attn = b * w.heads * s * 4
        attn_workspace = 0
    else:
        # Exact math path: fp32 probabilities [b, heads, S, S] (+ a model-dtype copy under bf16) and the
        # boolean causal+padding map, built per layer.
        attn = b * w.heads * s * s * (4 + (e if e < 4 else 0)) + b * s * s
        attn_workspace = 2 * b * w.heads * s * s * 4  # gradients of probs and scores
    layer_weights = max(w.h * w.ffn, w.h * w.q) * e  # a weight gradient before it is accumulated
    workspace = max(attn_workspace, 3 * t * w.ffn * e) + layer_weights + 2 * t * w.h * e
    return norms, gathered + qkv + out + mlp + attn, workspace


def activation_estimate(setup: PlanSetup, stage: int | None = None) -> ActivationEstimate:
    """Bytes per rank of pipeline `stage` (default: the stage with the highest peak) above the state during a
    step (see the module docstring)."""
    if stage is None:
        return max((activation_estimate(setup, s) for s in range(setup.pp)), key=lambda a: a.peak)
    config, d, wl = setup.config, setup.degrees, setup.workload
    v, e = config.vision_config, DTYPE_BYTES[setup.dtype]
    w = local_widths(config, d.mp)
    # Context parallel: each rank's loss head takes an equal share of the supervised rows (forward.py).
    t, k, p = wl.tokens, math.ceil(wl.supervised / d.cp), wl.patches
    first, last, layers = stage == 0, stage == setup.pp - 1, len(setup.stage_split()[stage])
    alive = wl.gradient_accumulation_steps if setup.pp > 1 else 1
    sp = d.sequence_parallel and d.mp > 1
    residual = DTYPE_BYTES[residual_dtype(setup.dtype)]
    # Context parallel: decoder tensors hold S/cp tokens (attention: the whole sequence for heads/cp).
    norms, rest, layer_workspace = (x // d.cp for x in _decoder_layer_saved(setup, w))
    layer = norms + rest

    batch = t * 8 * 6 + 2 * t * config.head_dim * e  # ids, labels, mask, [3, B, S] positions (int64); M-RoPE cos/sin
    # Non-reentrant recompute keeps only each layer's input; the layer under backward is recomputed in full.
    recomputed = layer if wl.recompute else 0
    trained = setup.trained()
    merger = 0
    if first and (trained.merger or trained.vit):
        merger = 4 * p * v.embed_dim * e  # LayerNorm input, both Linear inputs, GELU input (run as dist ops)
    # Loss head on the K supervised positions only, vocab-split, fused with CE and chunked (network/loss.py;
    # chunks sized from this rank's shapes, as autoparallel/forward.py does). Its forward computes the gradients
    # too: what it keeps for backward is the hidden-state gradient [K, H] and, when the head trains (not under
    # LoRA), the weight gradient [V/mp, H]; no logits.
    head_trains = last and setup.trainable.llm and not setup.lora
    table = w.vocab * w.h * e  # one local [V/mp, H] weight gradient (head or embedding)
    rows = rows_per_chunk([1, k, w.h], [w.vocab, w.h], transpose_weight=True) if k else 0
    chunks = math.ceil(k / rows) if k else 0
    head_saved = k * w.h * e + (table if head_trains else 0) if last else 0
    # One chunk's [rows, V/mp] blocks at once (autoparallel/forward.py `_chunk_statistics`): fp32 logits, float
    # one-hot, shifted logits, exp and two gradient temporaries (+ the half-precision logits and gradient); the
    # weight gradient's fp32 copy (half precision) and fp32 accumulator (several chunks) beside the kept one.
    head_forward = min(k, rows) * w.vocab * (6 * 4 + (2 * e if e < 4 else 0))
    if head_trains:
        head_forward += w.vocab * w.h * ((4 if e < 4 else 0) + (4 if chunks > 1 else 0))
    head_backward = head_saved  # its backward scales both by the incoming (dist) gradient: copies
    # A tied head's weight gradient waits for the embedding lookup's (autoparallel.gradients.shared_uses adds
    # the lookup's into it): through the decoder's backward, and beside the lookup's [V/mp, H] at the end.
    tied_wait = table if head_trains and first and config.tie_word_embeddings else 0
    # A non-last stage keeps each micro-batch's output (sent on) until its gradient comes back.
    boundary = t * w.h * residual if setup.pp > 1 and not last else 0

    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    if setup.flash_attention:
        vit_attn = 6 * p * v.embed_dim * e  # varlen flash: q, k, v, out and fp32 rotary copies
        if trained.vit:  # padded rows through SDPA: the block-diagonal [P, P] additive mask (N6), one per forward
            vit_attn += p * p * e
    else:
        # The math path runs all of this rank's patches as one block-diagonal [heads, P, P] problem.
        vit_attn = 3 * v.num_heads * p * p * 4 + 2 * p * p
    # MLP intermediates: fc1 output and activation (Qwen2-VL); gate, up and their product (Qwen2.5-VL SwiGLU).
    mlp_tensors = 3 if config.model_type == "qwen2_5_vl" else 2
    vit_block = max(vit_attn, mlp_tensors * p * v.mlp_hidden_size * e) + 4 * p * v.embed_dim * e
    vision = p * patch_dim * 4 + vit_block + 3 * t * w.h * e if p else 3 * t * w.h * e
    # A trainable ViT (dist ops on this rank's padded patches) keeps per block: both LayerNorm inputs, the qkv
    # output, fp32 rotary copies of q and k, the attention output, the MLP input and intermediates;
    # on the math path also the fp32 [heads, P, P] probabilities and the boolean segment map.
    vit_saved = 0
    if first and trained.vit and p:
        vit_attn_saved = 0 if setup.flash_attention else v.num_heads * p * p * 4 + p * p
        mlp_saved = (mlp_tensors + 1) * p * v.mlp_hidden_size * e
        block_saved = p * v.embed_dim * (6 * e + 4 * 4) + mlp_saved + vit_attn_saved
        kept_blocks = v.depth * p * v.embed_dim * e if wl.vit_recompute else v.depth * block_saved
        vit_saved = p * patch_dim * 4 + kept_blocks + (p * p * e if setup.flash_attention else 0)
        vit_recomputed = block_saved if wl.vit_recompute else 0

    sharded = f", sequence-sharded over mp ({d.mp})" if sp else ""
    sharded += f", sequence-split over cp ({d.cp})" if d.cp > 1 else ""
    if wl.recompute:
        decoder = [Term(f"decoder x{layers} (recompute: layer inputs)",
                        layers * t * w.h * residual // (d.mp if sp else 1) // d.cp,
                        f"{layer / 2**20:.1f} MiB per layer recomputed{sharded}")]
    else:
        decoder = [Term(f"decoder RMSNorm activations x{layers}", layers * norms, f"2 norms per layer{sharded}"),
                   Term(f"decoder x{layers}, rest", layers * rest, f"{layer / 2**20:.1f} MiB per layer in all")]
    per_micro = [
        Term("batch tensors + M-RoPE cos/sin", batch),
        *decoder,
        *([Term("stage output, kept for its backward", boundary, "[b, S, H]")] if boundary else []),
        *([Term("trainable ViT" + (" (recompute: block inputs)" if wl.vit_recompute else ""), vit_saved,
                f"x{v.depth} blocks on {p} patches")] if vit_saved else []),
        *([Term("merger (dist ops)", merger)] if merger else []),
        *([Term(f"loss head on {k} supervised positions" + (f" (1/{d.cp} of them)" if d.cp > 1 else ""), head_saved,
                f"[{k}, {w.vocab}] fp32 x3")] if last else []),
    ]
    times = f"x{alive} micro-batches alive (FThenB)"
    saved = per_micro if alive == 1 else [Term(x.name, alive * x.bytes, f"{x.note}; {times}" if x.note else times)
                                          for x in per_micro]
    kept, one = sum(x.bytes for x in saved), sum(x.bytes for x in per_micro)
    phases = [
        *([Term("ViT backward", kept + vit_recomputed + vit_attn + vit_block,
                "one block's gradient workspace")] if vit_saved else []),
        *([Term("vision forward" if vit_saved else "vision (frozen ViT, no_grad)",
                kept - one + batch + vision + vit_saved,
                "pixels + one ViT block + embedding merge" + (f", {alive - 1} micro-batches kept" if alive > 1 else
                                                               ""))] if first else []),
        *([Term("loss forward", kept + head_forward), Term("loss backward", kept + head_backward)] if last else []),
        Term("decoder backward", kept - head_saved + tied_wait + recomputed + layer_workspace + boundary,
             "one layer's gradient workspace" + (", the received output gradient" if boundary else "")),
        *([Term("embedding backward", kept - one + batch + tied_wait + table + t * w.h * e,
                "the lookup's [V/mp, H] weight gradient" + (" beside the tied head's" if tied_wait else ""))]
          if first and setup.trainable.llm and not setup.lora else []),
    ]
    return ActivationEstimate(saved=saved, phases=phases, stage=stage, micro_batches_alive=alive)


# ---- start-up ---------------------------------------------------------------------------------------------
CHECKPOINT_DTYPE_BYTES = 2  # Hub checkpoints are bf16


@dataclass
class StartupMemory:
    """Bytes one rank holds while it starts from a checkpoint (autoparallel/sharded_load.py): the weights it keeps
    (its pieces; the whole model under ZeRO-3, which loads before it shards) plus the one stored tensor in flight."""

    weights: int
    in_flight: int
    in_flight_name: str
    dense_first: bool  # ZeRO-3: every weight is loaded whole before dist.parallelize shards it

    @property
    def peak(self) -> int:
        return self.weights + self.in_flight


def startup_memory(setup: PlanSetup, state: StateMemory) -> StartupMemory:
    """The start-up peak of `state`'s stage. A tensor in flight is its local piece as read from the file and (HF
    Linear weights) transposed: two stored-dtype buffers; an fp32 result takes over the widened buffer, a bf16
    one is one more copy. Random-init presets hold the same weights, without the buffers."""
    config, d = setup.config, setup.degrees
    split = setup.stage_split()
    dense_first = d.sharding_stage == 3  # LoRA too: the trainer loads densely under ZeRO-3 (needs_dense_load)
    extra = CHECKPOINT_DTYPE_BYTES if setup.dtype != "float32" else 0
    weights, largest, largest_name = state.param, 0, ""
    if dense_first:
        weights = sum(numel(shape) for name, shape in parameter_shapes(config).items()
                      if state.stage in parameter_stages(name, config, split)) * DTYPE_BYTES[setup.dtype]
    for name, shape in parameter_shapes(config).items():
        if state.stage not in parameter_stages(name, config, split):
            continue
        local = shape if dense_first else layout(name, shape, config, d.dp, d.mp, 0, setup.trainable).local_shape
        in_flight = numel(local) * (2 * CHECKPOINT_DTYPE_BYTES + extra)
        if in_flight > largest:
            largest, largest_name = in_flight, name
    return StartupMemory(weights, largest, largest_name, dense_first)


@dataclass
class MemoryPlan:
    setup: PlanSetup
    state: StateMemory
    activations: ActivationEstimate
    reserve: int = 0  # CUDA context, communication buffers, allocator slack (assumed, not modelled)
    startup: StartupMemory | None = None

    @property
    def stage(self) -> int:
        return self.state.stage

    @property
    def step_peak(self) -> int:
        """Largest increase above the state: a micro-step's activations, the optimizer update (measured on
        CPU: a few hundred bytes at mp 1, one local gradient-sized temporary under mp) or the first step's
        creation of the AdamW moments."""
        return max(self.activations.peak, self.state.largest_grad, self.state.moment_creation)

    @property
    def step_total(self) -> int:
        """Held during a training step: the state plus the step's peak."""
        return self.state.total + self.step_peak + self.reserve

    @property
    def startup_total(self) -> int:
        return (self.startup.peak if self.startup else 0) + self.reserve

    @property
    def peak_phase(self) -> str:
        return "start-up (build + load)" if self.startup_total > self.step_total else "training step"

    @property
    def total(self) -> int:
        """The peak of the run: the larger of start-up and a training step."""
        return max(self.step_total, self.startup_total)

    def fits(self, device_bytes: int) -> bool:
        return self.total <= device_bytes


def stage_memory_plans(setup: PlanSetup, reserve: int = 0) -> list[MemoryPlan]:
    """One plan per pipeline stage (a single one when pp = 1)."""
    plans = []
    for s in range(setup.pp):
        state = state_memory(setup, s)
        plans.append(MemoryPlan(setup, state, activation_estimate(setup, s), reserve, startup_memory(setup, state)))
    return plans


def memory_plan(setup: PlanSetup, reserve: int = 0) -> MemoryPlan:
    """The plan of the fullest pipeline stage (of every rank when pp = 1)."""
    return max(stage_memory_plans(setup, reserve), key=lambda m: m.total)
