"""The simulated GPU: every CUDA-only branch of the project, run on the CPU build and checked.

Switched on by `QWEN2VL_AP_SIMULATE_GPU=1` for every command (the CLI entry, training workers and launched
infer/serve ranks call `launch.launcher.simulate_gpu_if_requested`; launched ranks inherit the variable). While it is on:

- the device gates (network/device.py) report a bf16-capable sm90 GPU, so every CUDA-only branch is taken
  (bf16 O2 training, `--dtype bfloat16` inference, the flash-attention kernels);
- the CPU has no bf16 matmul, so fp32 stands in for bf16: a model built "in bf16" allocates fp32 weights
  (`device.allocation_dtype`) and fp32 q/k/v take the half-precision kernel branches (`device.kernel_dtypes`).
  Casts, branch choices and kernel contracts are checked on the dtypes the code passes; the arithmetic is fp32,
  so a simulated run computes what the plain CPU run computes;
- the GPU kernels the project calls are replaced by CPU reference implementations (the exact fp32 math of
  network/attention.py) that first enforce the real kernel's input contract, as Paddle 3.3.1's source defines it
  (python/paddle/nn/functional/flash_attention.py and sdpa.py; paddle/phi/kernels/gpu/flash_attn_kernel.cu and
  flash_attn_utils.h; the ops.yaml `spmd_rule` entries): one dtype for q/k/v, an additive mask in q's dtype,
  [batch, seq, heads, head_dim] layout, int32 cu_seqlens, max_seqlen a host int, heads divisible by kv heads
  (native GQA), and distributed tensors only into ops with an SPMD rule (flash_attn: FlashAttInferSpmd,
  flashmask_attention: FlashMaskInferSpmd; flash_attn_unpadded and repeat_interleave have none, so their
  generated dist branch would replicate the inputs on every rank);
- a weight created in host memory (DLPack zero-copy of a numpy array, which a GPU build leaves on the CPU place)
  fails the load, naming the parameter (network/device.py `check_device_resident`);
- the run ends with one console line counting the kernels called (summed over launched ranks).

It cannot show bf16 rounding, TF32, kernel speed or memory, NCCL behaviour, or anything a real GPU kernel does
beyond its documented input contract.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import paddle.nn.functional.flash_attention as flash_module

from network import attention as attention_mod
from network import device

COUNTS_DIR_ENV = "QWEN2VL_AP_SIMULATED_KERNELS_DIR"
calls: Counter = Counter()  # kernel name -> calls in this process
_originals: dict[tuple[object, str], object] = {}


class KernelContractError(RuntimeError):
    """A simulated GPU kernel got inputs the real kernel rejects (or handles only by replicating them)."""


def _require(op: str, condition: bool, message: str) -> None:
    if not condition:
        raise KernelContractError(f"simulated GPU: {op}: {message}")


def _no_spmd_rule(op: str, **tensors: paddle.Tensor) -> None:
    for name, t in tensors.items():
        _require(op, not t.is_dist(), f"distributed tensor '{name}' passed, but {op} has no SPMD rule in Paddle "
                                      f"3.3.1: every rank would all-gather it and compute on the whole tensor")


def _half_inputs(op: str, **tensors: paddle.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    _require(op, len(set(dtypes.values())) == 1, f"q/k/v dtypes differ: {dtypes}")
    dtype = next(iter(dtypes.values()))
    _require(op, dtype in device.kernel_dtypes(), f"dtype {dtype} (the kernel takes float16/bfloat16)")


def _heads(op: str, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, head_axis: int) -> None:
    _require(op, list(k.shape) == list(v.shape), f"key {k.shape} and value {v.shape} differ")
    _require(op, q.shape[-1] == k.shape[-1], f"head_dim of query {q.shape} and key {k.shape} differ")
    heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    _require(op, kv_heads > 0 and heads % kv_heads == 0,
             f"{heads} query heads are not a multiple of {kv_heads} key/value heads")


def _dense_4d(op: str, q, k, v) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        _require(op, len(t.shape) == 4, f"{name} must be [batch, seq, heads, head_dim], got shape {t.shape}")
    _require(op, q.shape[0] == k.shape[0], f"batch of query {q.shape} and key {k.shape} differ")


def _math(q, k, v, causal: bool, allowed: paddle.Tensor | None = None, additive: paddle.Tensor | None = None,
          scale: float | None = None) -> paddle.Tensor:
    """fp32 attention on [b, s, h, d] with native GQA; `allowed` a boolean map or `additive` a float mask, both
    broadcast to [b, h, q_len, kv_len]."""
    heads, head_dim = q.shape[2], q.shape[3]
    if allowed is None and additive is None and scale in (None, head_dim**-0.5):
        return attention_mod._math_attention(q, k, v, causal, None)
    k, v = (attention_mod._repeat_kv(x, heads) for x in (k, v))
    qt, kt, vt = (x.transpose([0, 2, 1, 3]).astype("float32") for x in (q, k, v))
    scores = paddle.matmul(qt * (head_dim**-0.5 if scale is None else scale), kt, transpose_y=True)
    low = paddle.full([], paddle.finfo(paddle.float32).min, "float32")
    if causal:
        allowed = _and(allowed, attention_mod._allowed(q.shape[1], k.shape[1], True, None))
    if allowed is not None:
        scores = paddle.where(allowed, scores, low)
    if additive is not None:
        scores = paddle.maximum(scores + additive.astype("float32"), low)
    out = paddle.matmul(F.softmax(scores, axis=-1).astype(v.dtype), vt)
    return out.transpose([0, 2, 1, 3])


def _and(a, b):
    return b if a is None else a if b is None else paddle.logical_and(a, b)


def flash_attention(query, key, value, dropout=0.0, causal=False, return_softmax=False, *, fixed_seed_offset=None,
                    rng_name="", training=True, name=None, softmax_scale=None):
    """paddle.nn.functional.flash_attention: [b, s, h, d] q/k/v of one half dtype, GQA native, FlashAttInferSpmd."""
    op = "flash_attention"
    calls[op] += 1
    _dense_4d(op, query, key, value)
    _half_inputs(op, query=query, key=key, value=value)
    _heads(op, query, key, value, 2)
    _require(op, not return_softmax, "return_softmax is not simulated")
    return _math(query, key, value, causal, scale=softmax_scale), None


def flash_attn_unpadded(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                        dropout=0.0, causal=False, return_softmax=False, fixed_seed_offset=None, rng_name="",
                        training=True, name=None):
    """Varlen flash attention: [total, h, d], int32 cu_seqlens, host-int max_seqlen, no SPMD rule."""
    op = "flash_attn_unpadded"
    calls[op] += 1
    _no_spmd_rule(op, query=query, key=key, value=value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    for label, t in (("query", query), ("key", key), ("value", value)):
        _require(op, len(t.shape) == 3, f"{label} must be [total_tokens, heads, head_dim], got shape {t.shape}")
    _half_inputs(op, query=query, key=key, value=value)
    _heads(op, query, key, value, 1)
    bounds = {}
    for label, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, query.shape[0], max_seqlen_q),
                                      ("cu_seqlens_k", cu_seqlens_k, key.shape[0], max_seqlen_k)):
        _require(op, cu.dtype == paddle.int32, f"{label} must be int32 (flash_attn_kernel.cu), got {cu.dtype}")
        _require(op, type(longest) is int, f"max_seqlen for {label} must be a host int, got {type(longest).__name__}")
        b = cu.numpy()
        _require(op, b.ndim == 1 and b[0] == 0 and b[-1] == total and (np.diff(b) >= 0).all(),
                 f"{label} {b.tolist()} does not cover the {total} tokens")
        _require(op, int(np.diff(b).max()) <= longest, f"max_seqlen {longest} < longest {label} segment")
        bounds[label] = b
    _require(op, isinstance(scale, float), f"scale must be a float, got {type(scale).__name__}")
    _require(op, len(bounds["cu_seqlens_q"]) == len(bounds["cu_seqlens_k"]), "cu_seqlens_q/k count differ")
    outs = [_math(query[None, a:b], key[None, c:d], value[None, c:d], causal, scale=scale)[0]
            for a, b, c, d in zip(bounds["cu_seqlens_q"][:-1], bounds["cu_seqlens_q"][1:],
                                  bounds["cu_seqlens_k"][:-1], bounds["cu_seqlens_k"][1:])]
    return paddle.concat(outs), None


def flashmask_attention(query, key, value, startend_row_indices=None, *, dropout=0.0, causal=False,
                        window_size=None, return_softmax_lse=False, return_seed_offset=False, fixed_seed_offset=None,
                        rng_name="", training=True, name=None, softmax_scale=None, block_mask=None):
    """FlashMask: column-wise row bounds `startend_row_indices` int32 [b, 1 or kv_heads, kv_len, n] (n = 1 or 2
    causal, 2 or 4 otherwise), FlashMaskInferSpmd."""
    op = "flashmask_attention"
    calls[op] += 1
    _dense_4d(op, query, key, value)
    _half_inputs(op, query=query, key=key, value=value)
    _heads(op, query, key, value, 2)
    _require(op, window_size is None and block_mask is None and not return_softmax_lse and not return_seed_offset,
             "only startend_row_indices masks are simulated")
    allowed = None
    if startend_row_indices is not None:
        rows = startend_row_indices
        _require(op, rows.dtype == paddle.int32, f"startend_row_indices must be int32, got {rows.dtype}")
        _require(op, len(rows.shape) == 4 and rows.shape[0] == key.shape[0] and rows.shape[2] == key.shape[1]
                 and rows.shape[1] in (1, key.shape[2]) and rows.shape[3] in ((1, 2) if causal else (2, 4)),
                 f"startend_row_indices shape {rows.shape} for key {key.shape}, causal={causal}")
        i = paddle.arange(query.shape[1], dtype="int32")[None, None, :, None]
        col = [rows[..., c][:, :, None, :] for c in range(rows.shape[3])]  # [b, h, 1, kv_len] each
        if causal:
            masked = i >= col[0] if len(col) == 1 else paddle.logical_and(i >= col[0], i < col[1])
        elif len(col) == 2:
            masked = paddle.logical_or(i >= col[0], i < col[1])
        else:
            masked = paddle.logical_or(paddle.logical_and(i >= col[0], i < col[1]),
                                       paddle.logical_and(i >= col[2], i < col[3]))
        allowed = paddle.logical_not(masked)
        if allowed.shape[1] not in (1, query.shape[2]):  # per kv head: the query heads of its group share it
            group = paddle.arange(query.shape[2]) // (query.shape[2] // allowed.shape[1])
            allowed = paddle.gather(allowed.astype("int32"), group, axis=1).astype("bool")
    return _math(query, key, value, causal, allowed=allowed, scale=softmax_scale)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, training=True,
                                 backend=None, scale=None, enable_gqa=True, name=None):
    """SDPA's flash backend (`_C_ops.flash_attn`, FlashAttInferSpmd): a bool mask is converted by sdpa.py, any
    other mask must have q's dtype (flash_attn_utils.h) and broadcast to [b, 1 or h, q_len, kv_len]."""
    op = "scaled_dot_product_attention"
    calls[op] += 1
    _dense_4d(op, query, key, value)
    _half_inputs(op, query=query, key=key, value=value)
    _heads(op, query, key, value, 2)
    _require(op, enable_gqa or query.shape[2] == key.shape[2], "GQA heads with enable_gqa=False")
    allowed = additive = None
    if attn_mask is not None:
        _require(op, attn_mask.dtype in (paddle.bool, query.dtype),
                 f"attn_mask dtype {attn_mask.dtype} differs from the query's {query.dtype}")
        _require(op, len(attn_mask.shape) == 4 and attn_mask.shape[0] in (1, query.shape[0])
                 and attn_mask.shape[1] in (1, query.shape[2]) and list(attn_mask.shape[2:]) == [query.shape[1],
                                                                                                 key.shape[1]],
                 f"attn_mask shape {attn_mask.shape} for query {query.shape} and key {key.shape}")
        allowed, additive = (attn_mask, None) if attn_mask.dtype == paddle.bool else (None, attn_mask)
    return _math(query, key, value, is_causal, allowed=allowed, additive=additive, scale=scale)


def repeat_interleave(x, repeats, axis=None, name=None):
    """No SPMD rule in Paddle 3.3.1: a distributed input is replicated (all-gathered) on every rank."""
    _no_spmd_rule("repeat_interleave", x=x)
    return _originals[(paddle, "repeat_interleave")](x, repeats, axis=axis, name=name)


_REPLACEMENTS = [
    (flash_module, "flash_attention", flash_attention),
    (flash_module, "flash_attn_unpadded", flash_attn_unpadded),
    (flash_module, "flashmask_attention", flashmask_attention),
    (F, "flashmask_attention", flashmask_attention),
    (F, "scaled_dot_product_attention", scaled_dot_product_attention),
    (paddle, "repeat_interleave", repeat_interleave),
]


def activate() -> None:
    """Install the simulated device and kernels in this process (idempotent)."""
    if not _originals:
        for module, attr, replacement in _REPLACEMENTS:
            _originals[(module, attr)] = getattr(module, attr)
            setattr(module, attr, replacement)
    device.simulate(True)


def deactivate() -> None:
    for (module, attr), original in _originals.items():
        setattr(module, attr, original)
    _originals.clear()
    calls.clear()
    device.simulate(False)


def report_line(counts: Counter) -> str:
    listed = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"simulated GPU kernels: {listed or 'none'}"


def write_counts() -> None:
    """A launched rank: add this process's kernel counts to the run's directory (read by the command's process)."""
    directory = os.environ.get(COUNTS_DIR_ENV)
    if directory and os.path.isdir(directory):
        (Path(directory) / f"kernels.{os.getpid()}.json").write_text(json.dumps(dict(calls)))


def _total_counts(directory: str) -> Counter:
    total = Counter(calls)
    for path in Path(directory).glob("kernels.*.json"):
        total.update(json.loads(path.read_text()))
    return total


def _print_total(directory: str) -> None:
    print(report_line(_total_counts(directory)), file=sys.stderr, flush=True)
    shutil.rmtree(directory, ignore_errors=True)


def start() -> None:
    """Process start of a simulated command or launched rank (launch.launcher.simulate_gpu_if_requested). The
    first process of a run prints the summed kernel counts at exit; the processes it launches write theirs."""
    activate()
    if os.environ.get(COUNTS_DIR_ENV):
        atexit.register(write_counts)
        return
    directory = tempfile.mkdtemp(prefix="qwen2vl-ap-simulated-")
    os.environ[COUNTS_DIR_ENV] = directory
    atexit.register(_print_total, directory)
