"""Qwen2-VL parallel plan, as data.

`TP_PLAN` maps sublayer-name patterns to a tensor-parallel style, the way PaddleNLP's `auto_dist_config` and
torchtitan's plans do. Keys are the regexes `dist.parallelize` matches against full sublayer names
(`re.match` over the whole name), so "model.layers.*.mlp.up_proj" reads like a glob. Paddle `nn.Linear`
weights are [in, out]:

- colwise (q/k/v/gate/up): weight Shard(1), bias Shard(0) on "mp": each rank owns whole heads / FFN columns.
- rowwise (o/down): weight Shard(0) on "mp"; the output is Partial and summed where it meets the residual.
- embed_tokens rowwise = vocab-parallel embedding: weight [V, H] Shard(0); each rank looks up its own rows
  (autoparallel/embedding.py: Paddle's embedding rule would all-gather the table). (ColWise on the embedding
  would need a reduce_scatter in C++ at the residual add, which the CPU build lacks.)
- lm_head colwise = vocab-parallel head (untied models): weight [H, V] Shard(1), logits Shard(2). A tied head
  multiplies by `embed_tokens.weight^T`, already vocab-split, so it is vocab-parallel with no entry.
  The loss on vocab-split logits is `autoparallel.forward.vocab_parallel_chunk` (no [B, S, V] gather).
- k/v are dropped from the plan (replicated) when mp > num_key_value_heads: each rank then reads the KV
  heads its query heads need after `repeat_kv`.
- The vision tower is not in the tensor-parallel plan. Frozen (by default all of it) it stays dense per rank,
  out of the distributed model and the optimizer, and runs on that rank's own images. A trainable part
  (`Trainable.vit` / `.merger`) is replicated on the mesh (dist tensors) so its gradients are summed over dp,
  and everything after it in the tower runs as dist ops too (a frozen merger behind a trainable ViT is
  replicated, without gradient or optimizer state).

`dp_config` shards optimizer states (stage 1), + gradients (2), + parameters (3) over "dp" on the first
tensor dim not already split by "mp" (Paddle's rule, mirrored in `layout`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from network.config import Qwen2VLConfig

COLWISE, ROWWISE = "colwise", "rowwise"

TP_PLAN: dict[str, str] = {
    "model.embed_tokens": ROWWISE,
    "model.layers.*.self_attn.q_proj": COLWISE,
    "model.layers.*.self_attn.k_proj": COLWISE,
    "model.layers.*.self_attn.v_proj": COLWISE,
    "model.layers.*.self_attn.o_proj": ROWWISE,
    "model.layers.*.mlp.gate_proj": COLWISE,
    "model.layers.*.mlp.up_proj": COLWISE,
    "model.layers.*.mlp.down_proj": ROWWISE,
    "lm_head": COLWISE,
}
_KV_KEYS = ("model.layers.*.self_attn.k_proj", "model.layers.*.self_attn.v_proj")

VISION_PREFIX = "visual."
MERGER_PREFIX = "visual.merger."

# Sequence parallel inside the mp regions (`sequence_parallel: true`, mp > 1). Between the attention and MLP
# blocks the residual stream and the RMSNorm inputs are Shard(1) (sequence) on "mp"; the entries say where
# activations change layout (applied as forward hooks by autoparallel/sequence_parallel.py):
# - SP_SCATTER_INPUT: the layer's first input goes Replicate/Partial -> Shard(1) (the decoder's embeddings).
# - SP_GATHER_REGION: all-gather the input to Replicate (it feeds colwise q/k/v or gate/up), and take the
#   rowwise output (Partial) to Shard(1) — a reduce-scatter (all-reduce + local slice on CPU).
# - SP_GATHER_OUTPUT: the layer's output is gathered to Replicate (final norm -> head at supervised positions).
# Layers not listed (the RMSNorms, the residual adds) run on the sequence shard as they are. Paddle's own
# SequenceParallelBegin/End plan entries assume [s, b, h] activations (they transpose); ours are [b, s, h].
SP_SCATTER_INPUT, SP_GATHER_REGION, SP_GATHER_OUTPUT = "scatter_input", "gather_region", "gather_output"
SP_PLAN: dict[str, str] = {
    "model": SP_SCATTER_INPUT,
    "model.layers.*.self_attn": SP_GATHER_REGION,
    "model.layers.*.mlp": SP_GATHER_REGION,
    "model.norm": SP_GATHER_OUTPUT,
}
SEQUENCE_DIM = 1  # activations are [batch, sequence, hidden]

# Pipeline parallel: what lives on which stage (autoparallel/pipeline.py deletes the rest on each rank).
# Decoder layers are split into contiguous runs, explicitly or by `pipeline_layer_split`'s cost model.
# A tied head (tie_word_embeddings) needs `model.embed_tokens.weight` on the first AND the last stage: the last
# stage keeps a copy, and the two copies' gradients are all-reduced before the optimizer step (same init, same
# summed gradient, same AdamW update: the copies stay identical, and count once in the global grad norm).
PP_FIRST_STAGE = ("visual", "model.embed_tokens")
PP_LAST_STAGE = ("model.norm", "lm_head")
PP_TIED_HEAD = "model.embed_tokens"  # kept on the last stage too when the head is tied
# Head cost relative to its parameter count: it runs only at supervised positions (a typical SFT fraction).
HEAD_TOKEN_FRACTION = 0.25


def _decoder_layer_cost(config: Qwen2VLConfig) -> float:
    """Matmul parameters of one decoder layer (FLOPs per token are proportional)."""
    h, hd = config.hidden_size, config.head_dim
    return h * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 3 * h * config.intermediate_size


def pipeline_layer_split(config: Qwen2VLConfig, pp: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """Decoder layers of each stage: `layers_per_stage` if given, else contiguous runs (>= 1 layer each) that
    minimise the costliest stage, the last stage also paying for the head. The frozen ViT (forward only, on the
    first stage) is not counted: give an explicit split when images dominate."""
    n = config.num_hidden_layers
    if layers_per_stage is not None:
        if len(layers_per_stage) != pp or sum(layers_per_stage) != n or min(layers_per_stage) < 1:
            raise ValueError(f"layers_per_stage={layers_per_stage}: need {pp} entries >= 1 summing to {n} layers")
        sizes = list(layers_per_stage)
    else:
        if not 1 <= pp <= n:
            raise ValueError(f"pipeline_parallel_degree={pp} needs 1..{n} stages (one decoder layer at least each)")
        head = config.hidden_size * config.vocab_size * HEAD_TOKEN_FRACTION / _decoder_layer_cost(config)
        # best[s][k]: (max stage cost, sizes) placing the first k layers on s stages; O(pp * n^2), n <= ~100.
        best = {(0, 0): (0.0, [])}
        for s in range(1, pp + 1):
            for k in range(s, n - (pp - s) + 1):
                options = []
                for j in range(s - 1, k):
                    if (s - 1, j) in best:
                        cost = (k - j) + (head if s == pp else 0.0)
                        prev, sizes_ = best[(s - 1, j)]
                        options.append((max(prev, cost), sizes_ + [k - j]))
                best[(s, k)] = min(options)
        sizes = best[(pp, n)][1]
    starts = [sum(sizes[:i]) for i in range(pp)]
    return [range(a, a + size) for a, size in zip(starts, sizes)]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def parameter_stages(name: str, config: Qwen2VLConfig, split: list[range]) -> tuple[int, ...]:
    """Pipeline stages holding parameter `name` under `split` (`pipeline_layer_split`): the rules
    autoparallel/pipeline.py's `build_stage_model` applies. Two stages only for the tied head's embedding."""
    last = len(split) - 1
    if _under(name, "model.layers"):
        layer = int(name.split(".")[2])
        return (next(i for i, run in enumerate(split) if layer in run),)
    if config.tie_word_embeddings and last and _under(name, PP_TIED_HEAD):
        return (0, last)
    if any(_under(name, p) for p in PP_FIRST_STAGE):
        return (0,)
    if any(_under(name, p) for p in PP_LAST_STAGE):
        return (last,)
    raise ValueError(f"{name}: not placed on any pipeline stage (PP_FIRST_STAGE / PP_LAST_STAGE / decoder layers)")


def tensor_parallel_plan(config: Qwen2VLConfig, mp: int) -> dict[str, str]:
    """`TP_PLAN` for this model and mp degree (k/v replicated when mp > KV heads; lm_head only if untied)."""
    if mp == 1:
        return {}
    plan = dict(TP_PLAN)
    if config.num_key_value_heads % mp:
        for key in _KV_KEYS:
            plan.pop(key)
    if config.tie_word_embeddings:
        plan.pop("lm_head")
    return plan


def model_part(name: str) -> str:
    """"vit", "merger" or "llm": the part of Qwen2-VL a parameter (or sublayer) name belongs to."""
    if name.startswith(MERGER_PREFIX):
        return "merger"
    return "vit" if name.startswith(VISION_PREFIX) else "llm"


@dataclass(frozen=True)
class Trainable:
    """Which parts of Qwen2-VL train: the ViT (patch embedding + blocks), the merger (aligner), the LLM
    (embeddings, decoder, head). The default is the usual SFT recipe: LLM only."""

    vit: bool = False
    merger: bool = False
    llm: bool = True

    @classmethod
    def holding(cls, names) -> "Trainable":
        """The parts these parameter (or layer) names belong to: what trains under LoRA with adapters there."""
        parts = {model_part(n) for n in names}
        return cls(vit="vit" in parts, merger="merger" in parts, llm="llm" in parts)

    def names(self) -> str:
        """The parts that train, e.g. "vit+merger+llm"."""
        return "+".join(p for p in ("vit", "merger", "llm") if getattr(self, p)) or "nothing"

    def trains(self, name: str) -> bool:
        return getattr(self, model_part(name))

    def dense(self, name: str) -> bool:
        """Kept out of the distributed model (dense, per rank, no optimizer): the frozen vision tower up to its
        first trainable part — the merger runs as dist ops once the ViT before it does."""
        part = model_part(name)
        return part == "vit" and not self.vit or part == "merger" and not (self.vit or self.merger)


FROZEN_VISION = Trainable()


def trainable_problem(config: Qwen2VLConfig, trainable: Trainable) -> str | None:
    """Why `trainable` cannot train on this model, or None. The trainable ViT runs as dist ops on padded patches
    with attention per image/frame (autoparallel/forward.py); Qwen2.5-VL's windowed blocks and patch reordering
    have no such path yet."""
    if trainable.vit and config.model_type == "qwen2_5_vl":
        return ("training the Qwen2.5-VL vision tower (freeze_vit: false, or LoRA on visual.blocks) is not supported "
                "yet; its merger and the LLM can train (freeze_merger / freeze_llm)")
    return None


def is_trainable(name: str, trainable: Trainable = FROZEN_VISION) -> bool:
    return trainable.trains(name)


def is_dense_vision(name: str, trainable: Trainable = FROZEN_VISION) -> bool:
    return trainable.dense(name)


def parameter_shapes(config: Qwen2VLConfig) -> dict[str, tuple[int, ...]]:
    """Paddle parameter name -> shape of `Qwen2VLForConditionalGeneration(config)`, without building it
    (so 72B plans render on a laptop). tests check it against the real model."""
    v, h, e = config.vision_config, config.hidden_size, config.vision_config.embed_dim
    mlp, merged, hd = v.mlp_hidden_size, e * v.spatial_merge_size**2, config.head_dim
    # Qwen2.5-VL: RMSNorm (no bias) and a SwiGLU MLP with biases; Qwen2-VL: LayerNorm and fc1/fc2.
    rms = config.model_type == "qwen2_5_vl"
    norm = (lambda p: {p + "weight": (e,)}) if rms else (lambda p: {p + "weight": (e,), p + "bias": (e,)})
    mlp_names = (("gate_proj", "up_proj"), "down_proj") if rms else (("fc1",), "fc2")
    shapes = {"visual.patch_embed.proj.weight": (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)}
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        shapes |= norm(p + "norm1.") | norm(p + "norm2.")
        shapes |= {p + "attn.qkv.weight": (e, 3 * e), p + "attn.qkv.bias": (3 * e,),
                   p + "attn.proj.weight": (e, e), p + "attn.proj.bias": (e,)}
        for up in mlp_names[0]:
            shapes |= {p + f"mlp.{up}.weight": (e, mlp), p + f"mlp.{up}.bias": (mlp,)}
        shapes |= {p + f"mlp.{mlp_names[1]}.weight": (mlp, e), p + f"mlp.{mlp_names[1]}.bias": (e,)}
    shapes |= norm("visual.merger.ln_q.")
    shapes |= {"visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
               "visual.merger.mlp.2.weight": (merged, v.hidden_size), "visual.merger.mlp.2.bias": (v.hidden_size,),
               "model.embed_tokens.weight": (config.vocab_size, h)}
    q, kv, ffn = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, q), p + "self_attn.q_proj.bias": (q,),
                   p + "self_attn.k_proj.weight": (h, kv), p + "self_attn.k_proj.bias": (kv,),
                   p + "self_attn.v_proj.weight": (h, kv), p + "self_attn.v_proj.bias": (kv,),
                   p + "self_attn.o_proj.weight": (q, h),
                   p + "mlp.gate_proj.weight": (h, ffn), p + "mlp.up_proj.weight": (h, ffn),
                   p + "mlp.down_proj.weight": (ffn, h),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (h, config.vocab_size)
    return shapes


@dataclass(frozen=True)
class ParamLayout:
    """Where one parameter lives on a ["dp", "mp"] mesh, and what one rank holds of it (ideal, by the plan)."""

    name: str
    shape: tuple[int, ...]
    placements: tuple[str, str]  # ("R" | "S(d)") on dp, on mp, for the parameter itself
    local_shape: tuple[int, ...]  # parameter on one rank
    grad_local_shape: tuple[int, ...] | None  # None: frozen, no gradient
    state_local_shape: tuple[int, ...] | None  # each AdamW moment; None: frozen, no optimizer state
    dense: bool  # kept out of the dist model (frozen vision tower)


def style_for(name: str, plan: dict[str, str]) -> str | None:
    layer, _, attr = name.rpartition(".")
    for key, style in plan.items():
        if re.fullmatch(key, layer) and (attr == "weight" or (attr == "bias" and style == COLWISE)):
            return style
    return None


def split_shape(shape: tuple[int, ...], dim: int | None, ways: int) -> tuple[int, ...]:
    if dim is None or ways == 1:
        return shape
    return tuple(-(-n // ways) if i == dim else n for i, n in enumerate(shape))


def layout(name: str, shape: tuple[int, ...], config: Qwen2VLConfig, dp: int, mp: int, sharding_stage: int,
           trainable: Trainable = FROZEN_VISION) -> ParamLayout:
    """The plan's placement of one parameter (same rules as `dist.parallelize` + `shard_optimizer`)."""
    shape = tuple(shape)
    dense, trains = trainable.dense(name), trainable.trains(name)
    style = None if dense else style_for(name, tensor_parallel_plan(config, mp))
    mp_dim = None if style is None else (1 if style == COLWISE and len(shape) == 2 else 0)
    # ZeRO shards what the optimizer holds over dp, on the first tensor dim mp does not split; dim-0 size 1
    # stays whole. Frozen parameters (LLM under freeze_llm, a frozen merger behind a trainable ViT) stay whole.
    dp_dim = None
    if sharding_stage and trains and shape[0] != 1:
        dp_dim = next((d for d in range(len(shape)) if d != mp_dim), None)
    mp_local = split_shape(shape, mp_dim, mp)
    zero_local = split_shape(mp_local, dp_dim, dp)
    on_dp = f"S({dp_dim})" if sharding_stage == 3 and dp_dim is not None else "R"
    on_mp = "R" if mp_dim is None else f"S({mp_dim})"
    return ParamLayout(
        name=name, shape=shape, placements=(on_dp, on_mp),
        local_shape=zero_local if sharding_stage == 3 else mp_local,
        grad_local_shape=(zero_local if sharding_stage >= 2 else mp_local) if trains else None,
        state_local_shape=(zero_local if sharding_stage >= 1 else mp_local) if trains else None,
        dense=dense,
    )
