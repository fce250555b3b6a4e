"""Issue 10 item 3: `merge_dist_checkpoint` vs Paddle's `load_merged_state_dict` + `paddle.save`, same checkpoint.

Input: every tensor of the Qwen2-VL-2B preset (LLM + ViT, tied head) as random bf16, saved under mp2 by
`dist.save_state_dict` from 2 processes — the layout a tensor-parallel run leaves behind. Sharded tensors are
built from their local pieces with `dtensor_from_local` (R->S slicing has no bf16 CPU kernel; even splits
only, an uneven one would corrupt the metadata, so such a tensor is saved replicated).
Each merge runs alone in a fresh child process that reports its own wall time (after imports) and peak RSS
(VmHWM: `ru_maxrss` of an exec'd child starts from its parent's). Paddle's route holds the whole model more
than once (~3.2x the model) and saving the input takes ~3.8x over its 2 ranks: when free RAM cannot cover that,
the decoder is cut to fewer layers (said in the note).
"""
import common  # noqa: I001  (first: pins BLAS threads)

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "helpers"))  # the multi-process harness

from ckpt_tools.merge import merge_dist_checkpoint  # noqa: E402
from network.process_memory import peak_rss_bytes  # noqa: E402
from network.config import Qwen2VLConfig  # noqa: E402
from placements.qwen2_vl import layout, parameter_shapes  # noqa: E402

BENCH = "merge_ckpt"
BENCH_TIMEOUT = 480  # read by run_all: ~4.4 GB saved once and merged three times on a shared disk
PADDLE_RSS_PER_MODEL = 3.2  # measured 3.1x (12.65 GiB for 4.11 GiB, shared notes) + a little
SAVE_RSS_PER_MODEL = 3.8  # measured: the two save_state_dict ranks peaked at 6.0 + 8.4 GiB for a 4.11 GiB model
HEADROOM = 2 * 2**30  # other engineers' jobs on the same machine
SAMPLED = ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.bias")
GiB = 2**30


def model_bytes(config: Qwen2VLConfig) -> int:
    return sum(math.prod(s) for s in parameter_shapes(config).values()) * 2  # bf16


def fitting_config(available: int) -> Qwen2VLConfig:
    """The 2B preset, with as many of its 28 decoder layers as the save and Paddle's merge fit in `available`."""
    full = Qwen2VLConfig.preset("qwen2-vl-2b")
    for layers in range(full.num_hidden_layers, 0, -1):
        config = dataclasses.replace(full, num_hidden_layers=layers)
        if max(PADDLE_RSS_PER_MODEL, SAVE_RSS_PER_MODEL) * model_bytes(config) + HEADROOM <= available:
            return config
    raise RuntimeError(f"only {available / GiB:.1f} GiB free: not even one decoder layer fits")


# ---- save worker (2 processes, launched by dist_utils.run_workers) --------------------------------------------
def save_worker(out: Path, layers: int) -> None:
    import paddle
    import paddle.distributed as dist

    from dist_utils import write_result

    dist.init_parallel_env()
    rank = dist.get_rank()
    config = dataclasses.replace(Qwen2VLConfig.preset("qwen2-vl-2b"), num_hidden_layers=layers)
    mesh = dist.ProcessMesh([0, 1], dim_names=["mp"])
    pool = np.random.default_rng(0).standard_normal(1 << 22, np.float32)  # tiled: fast to fill
    state, replicated = {}, []
    for name, shape in parameter_shapes(config).items():
        on_mp = layout(name, shape, config, 1, 2, 0).placements[1]
        dim = int(on_mp[2]) if on_mp.startswith("S") else None
        if dim is not None and shape[dim] % 2:
            dim = None
            replicated.append(name)
        local = list(shape)
        if dim is not None:
            local[dim] //= 2
        # Replicated pieces must be equal on both ranks (Paddle saves them once); shards differ by rank.
        piece = np.resize(pool[(rank * 7919 if dim is not None else 0):], local)
        tensor = paddle.to_tensor(piece).astype("bfloat16")
        del piece
        placement = dist.Shard(dim) if dim is not None else dist.Replicate()
        state[name] = dist.auto_parallel.api.dtensor_from_local(tensor, mesh, [placement])
    ckpt = out / "checkpoint-1"
    start = time.perf_counter()
    dist.save_state_dict(state, str(ckpt / "dist_ckpt"))
    seconds = time.perf_counter() - start
    if rank == 0:
        config.save_pretrained(str(ckpt))
    write_result(out, rank, {"save_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
                             "uneven_kept_replicated": replicated})
    dist.barrier()


# ---- merge children -----------------------------------------------------------------------------------------
def merge_child(side: str, ckpt: str, out: str) -> None:
    """Run one merge in this (fresh) process: "theirs", or ours to format "paddle"/"safetensors"; print
    {"seconds", "peak_rss_bytes"} as the last line."""
    if side == "theirs":
        import paddle
        import paddle.distributed as dist

        start = time.perf_counter()
        state = dist.load_merged_state_dict(os.path.join(ckpt, "dist_ckpt"))
        os.makedirs(out)
        paddle.save(state, os.path.join(out, "model_state.pdparams"))
        seconds = time.perf_counter() - start
    else:
        seconds = merge_dist_checkpoint(ckpt, out, format=side, progress=False)["seconds"]
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}))


def run_child(side: str, ckpt: Path, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, str(ckpt), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=BENCH_TIMEOUT,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"{side} merge failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    return result


def read_sampled(path: Path) -> dict[str, bytes]:
    """Raw bytes of the SAMPLED tensors from a .pdparams, read lazily (no full load)."""
    from network.formats import index_pickle, read_ref

    refs = index_pickle(str(path))
    return {n: np.ascontiguousarray(read_ref(refs[n])).tobytes() for n in SAMPLED}


def read_cache(directory: Path) -> None:
    """Read every input file once, so each side starts from the same (warm) page cache."""
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def main() -> None:
    from dist_utils import run_workers

    available = psutil.virtual_memory().available
    config = fitting_config(available)
    full_layers = Qwen2VLConfig.preset("qwen2-vl-2b").num_hidden_layers
    size = model_bytes(config)
    print(f"free RAM {available / GiB:.1f} GiB -> {config.num_hidden_layers}/{full_layers} decoder layers, "
          f"{size / GiB:.2f} GiB bf16", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_merge_ckpt.") as tmp:
        root = Path(tmp)
        run = run_workers(Path(__file__).resolve(), 2, root / "save", ["--layers", str(config.num_hidden_layers)],
                          timeout=BENCH_TIMEOUT)
        if run.returncode != 0 or len(run.results) != 2:
            raise RuntimeError(f"save workers failed ({run.returncode}):\n{run.logs()}")
        ckpt = root / "save" / "checkpoint-1"
        ckpt_bytes = sum(f.stat().st_size for f in (ckpt / "dist_ckpt").iterdir())
        results, sampled = {}, {}
        for side in ("paddle", "theirs", "safetensors"):  # ours -> pdparams, Paddle's, ours -> safetensors
            read_cache(ckpt)
            out = root / side
            results[side] = run_child(side, ckpt, out)
            if side != "safetensors":
                sampled[side] = read_sampled(out / "model_state.pdparams")
            shutil.rmtree(out)  # multi-GB: one output on disk at a time
            print(side, results[side], flush=True)
    identical = sampled["paddle"] == sampled["theirs"]
    scaled = "" if config.num_hidden_layers == full_layers else (
        f" Scaled down to {config.num_hidden_layers}/{full_layers} decoder layers: only {available / GiB:.1f} GiB "
        f"free RAM; saving it (2 ranks) needs ~{SAVE_RSS_PER_MODEL}x the model, Paddle's merge "
        f"~{PADDLE_RSS_PER_MODEL}x.")
    shape = (f"Qwen2-VL-2B shapes{'' if not scaled else f' ({config.num_hidden_layers} layers)'}, "
             f"bf16 {size / 1e9:.1f} GB, mp2 dist ckpt")
    extra = {"model_bytes": size, "checkpoint_bytes": ckpt_bytes, "layers": config.num_hidden_layers,
             "available_ram_bytes": available, "save": run.results, "merges": results,
             "sampled_tensors_identical": identical}
    theirs_name = "Paddle load_merged_state_dict + paddle.save"
    base = (f"same input, each in a fresh process, page cache warmed before each; {len(SAMPLED)} sampled tensors "
            f"(vocab-, row- and column-split) bit-identical between our pdparams and Paddle's: {identical}.{scaled}")
    for side, fmt in (("paddle", "pdparams"), ("safetensors", "safetensors")):
        ours, theirs = results[side], results["theirs"]
        common.emit(common.Record(
            bench=BENCH, metric=f"merge-ckpt wall time -> {fmt} ({shape})", unit="s", better="lower",
            ours=round(ours["seconds"], 2), theirs=round(theirs["seconds"], 2), theirs_name=theirs_name,
            extra=extra, note=f"{fmt}: {base}"))
        common.emit(common.Record(
            bench=BENCH, metric=f"merge-ckpt peak RSS -> {fmt} ({shape})", unit="GiB", better="lower",
            ours=round(ours["peak_rss_bytes"] / GiB, 3), theirs=round(theirs["peak_rss_bytes"] / GiB, 3),
            theirs_name=theirs_name, extra=extra,
            note=f"{fmt}: ours streams one tensor at a time (peak = imports + largest tensor + 64 MiB chunk); "
                 f"Paddle's holds the rank files and the merged model: {theirs['peak_rss_bytes'] / size:.1f}x "
                 f"the model"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")  # save-worker mode (dist_utils.run_workers)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "CKPT", "OUT"))
    args = parser.parse_args()
    if args.child:
        merge_child(*args.child)
    elif args.out:
        save_worker(Path(args.out), args.layers)
    else:
        main()
