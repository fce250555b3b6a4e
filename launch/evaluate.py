"""`qwen2vl-ap eval`: did the fine-tune help? Generate answers for a dataset the trainer reads and score them.

    qwen2vl-ap eval --model DIR --meta_path meta_eval.json --output_dir eval_out --metrics exact_match,anls
    qwen2vl-ap eval --model out/checkpoint-200 --meta_path meta_eval.json --output_dir eval_out --nproc_per_node 2
    qwen2vl-ap eval --model BASE --lora ADAPTER_DIR --meta_path meta_eval.json --output_dir eval_out
    qwen2vl-ap eval --predictions other_tool.jsonl --output_dir eval_out --metrics relaxed_accuracy

`--model` is a model directory, a Hub id, or a training `checkpoint-N` read directly (no merge step). The reference
of each record is its last assistant turn; the prompt is everything before it, rendered as in training (the data
options are the trainer's: --max_pixels, --system_prompt, ...). `--output_dir` gets `predictions.jsonl` (id,
source, prompt, prediction, reference, scores) and `metrics.json` (metric -> value in [0, 1], "per_source" when
the meta file names several datasets). `--predictions FILE` scores an existing file of that format (only
`prediction` and `reference` are required; a reference may be a list of acceptable answers).

Data parallel: `--nproc_per_node N` starts N processes with `paddle.distributed.launch`; each generates its share
of the batches (every N-th) and writes it to the output directory, and this process gathers them in record order.
Tensor parallel: `--tensor_parallel_degree M` splits the model over M processes as `infer --tensor_parallel_degree`
does (each rank reads only its own slices: of the weight files, or of a checkpoint-N's rank files through
`dist.load_state_dict`); the M ranks of a group answer the same batches in lockstep and its first rank writes them.
With `--nproc_per_node N` (a multiple of M) the N / M groups are the data-parallel ranks."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from autoparallel.data.config import DataConfig
from autoparallel.engine.eval_metrics import MetricError, parse_metric_names
from autoparallel.engine.evaluation import (PREDICTIONS_FILE, eval_records, predict, prediction_rows, score_rows,
                                            write_results)
from launch.infer import (InferError, add_sampling_arguments, check_model_args, checkpoint_stop_ids,
                          generation_config_from_args)
from network.formats import CheckpointError, FormatError
from network.generation import CheckpointGenerationDefaults
from network.log import logger
from placements.degrees import ParallelDegrees

PARTS_DIR = ".eval-parts"  # in --output_dir: each data-parallel rank's predictions until they are gathered
# DataConfig fields that are not options here (the meta file is --meta_path; no loader workers run).
_NOT_DATA_OPTIONS = ("meta_path", "synthetic_data_dir", "dataloader_num_workers", "packing", "skip_bad_samples")


class EvalError(Exception):
    """A problem with the command's inputs (one line, exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen2vl-ap eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory, Hub id, or a training checkpoint-N directory")
    p.add_argument("--lora", help="adapter directory folded into --model at load")
    p.add_argument("--meta_path", help="PaddleMIX meta JSON naming the annotation files (as for training)")
    p.add_argument("--predictions", help="score this JSONL of {prediction, reference} instead of generating")
    p.add_argument("--output_dir", required=True, help="where predictions.jsonl and metrics.json go")
    p.add_argument("--metrics", default="exact_match", help="comma-separated: exact_match, relaxed_accuracy, anls, "
                                                            "mc_accuracy, bleu, rouge_l, edit_distance")
    p.add_argument("--max_samples", type=int, help="evaluate the first N samples only")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=128)
    add_sampling_arguments(p)  # unset: the checkpoint's generation_config.json, else greedy
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--nproc_per_node", type=int, default=1,
                   help="processes: data parallel over groups of --tensor_parallel_degree")
    p.add_argument("--tensor_parallel_degree", type=int, default=1,
                   help="split the model over this many processes (a model one device cannot hold)")
    p.add_argument("--log_dir", help="several processes: launcher and worker logs (default: a temp directory)")
    data = p.add_argument_group("data options (the trainer's keys)")
    for f in dataclasses.fields(DataConfig):
        if f.name not in _NOT_DATA_OPTIONS:
            kind = type(f.default) if f.default is not None else int  # the Optional ones are pixel counts
            data.add_argument(f"--{f.name}", type=kind, default=f.default)
    return p


# ---- scoring an existing file ---------------------------------------------------------------------------------
def read_prediction_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a predictions JSONL; a row without a string `prediction` or a usable `reference` is one error line."""
    if not os.path.isfile(path):
        raise EvalError(f"--predictions: file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path} line {n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path} line {n}: expected a JSON object")
            if not isinstance(row.get("prediction"), str):
                raise EvalError(f"{path} line {n}: field \"prediction\" must be a string")
            ref = row.get("reference")
            if not (isinstance(ref, str) or (isinstance(ref, list) and ref and all(isinstance(r, str) for r in ref))):
                raise EvalError(f"{path} line {n}: field \"reference\" must be a string or a non-empty list of strings")
            rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no predictions")
    return rows


# ---- generating -----------------------------------------------------------------------------------------------
def _model_dir(args: argparse.Namespace) -> tuple[str, bool]:
    """(directory with config.json and tokenizer files, whether --model is a training checkpoint-N)."""
    from ckpt_tools.distckpt import is_dist_checkpoint
    from ckpt_tools.merge import model_dir_of

    if os.path.isdir(args.model) and is_dist_checkpoint(args.model):
        if args.lora:
            raise EvalError("--lora goes with a base model directory, not a checkpoint-N --model")
        model_dir = model_dir_of(args.model)
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise EvalError(f"{model_dir} has no config.json: not a training checkpoint")
        return model_dir, True
    try:
        return check_model_args(args.model, 1, args.lora, args.dtype, processes=_processes(args)), False
    except InferError as e:
        raise EvalError(str(e)) from None


def _check_parallel_model(args: argparse.Namespace) -> None:
    """Model options, and whether the model splits over --tensor_parallel_degree, checked in the parent."""
    model_dir, _ = _model_dir(args)
    if args.tensor_parallel_degree > 1:
        try:
            check_model_args(model_dir, args.tensor_parallel_degree, None, args.dtype, processes=_processes(args))
        except InferError as e:
            raise EvalError(str(e)) from None


def load_checkpoint_model(ckpt: str, model_dir: str, dtype: str):
    """The model of a training `checkpoint-N`, read tensor by tensor from its rank files (no merged copy)."""
    from ckpt_tools.distckpt import DistCheckpoint
    from network.config import Qwen2VLConfig
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
    from network.weights import assign, to_paddle

    model = Qwen2VLForConditionalGeneration.lazy(Qwen2VLConfig.from_pretrained(model_dir), dtype)
    params = model.state_dict()
    with DistCheckpoint(ckpt) as ck:
        ck.check()
        keys, _ = ck.split_keys()
        _check_model_keys(ckpt, params, keys)
        for key in keys:
            if key in params:
                assign(params[key], to_paddle(ck.read(key), params[key].dtype))
    model.eval()
    return model


def load_checkpoint_model_sharded(ckpt: str, model_dir: str, dtype: str, degrees: ParallelDegrees):
    """The model of a training `checkpoint-N` split over this launched job's ranks as `degrees` say: the lazy
    model is parallelized first, then `dist.load_state_dict` reads, from the rank files, only the pieces
    that overlap this rank's slices (resharding from whatever layout training saved)."""
    import paddle.distributed as dist

    from autoparallel.engine.checkpoint import check_dist_files
    from autoparallel.engine.evaluation import TensorParallelModel
    from autoparallel.mesh import build_mesh
    from autoparallel.parallelize import parallelize
    from autoparallel.sharded_load import allocate_for_resume
    from ckpt_tools.distckpt import DistCheckpoint, resolve_dist_dir
    from network.config import Qwen2VLConfig
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    dist_dir = Path(resolve_dist_dir(ckpt))
    model = Qwen2VLForConditionalGeneration.lazy(Qwen2VLConfig.from_pretrained(model_dir), dtype)
    with DistCheckpoint(str(dist_dir)) as ck:
        ck.check()
        keys, _ = ck.split_keys()
    _check_model_keys(ckpt, model.state_dict(), keys)
    model, _ = parallelize(model, None, build_mesh(degrees, model.config), degrees)
    allocate_for_resume(model)
    check_dist_files(dist_dir)  # safetensors rank files only: Paddle never unpickles tensors here
    state = model.state_dict()
    dist.load_state_dict(state, str(dist_dir), safetensors=True)
    held = sum(int(t._local_value().numel() if t.is_dist() else t.numel()) * t.element_size() for t in state.values())
    total = sum(int(t.numel()) * t.element_size() for t in state.values())
    logger.info("rank %d holds %d of the model's %d bytes (%s)", dist.get_rank(), held, total, dist_dir)
    model.eval()
    return TensorParallelModel(model)


def _check_model_keys(ckpt: str, params: dict[str, Any], keys: list[str]) -> None:
    missing = sorted(set(params) - set(keys))
    if missing:
        raise EvalError(f"{ckpt}: {len(missing)} model weights are not in the checkpoint (e.g. {missing[0]}); a "
                        f"LoRA checkpoint goes as --model BASE --lora {ckpt}")


def _load(args: argparse.Namespace, degrees: ParallelDegrees):
    from launch.infer import load_model

    model_dir, is_checkpoint = _model_dir(args)
    if is_checkpoint:
        if degrees.mp > 1:
            return load_checkpoint_model_sharded(args.model, model_dir, args.dtype, degrees), model_dir
        return load_checkpoint_model(args.model, model_dir, args.dtype), model_dir
    return load_model(model_dir, degrees.mp, args.dtype, args.lora, degrees.dp), model_dir


def _dataset(args: argparse.Namespace, model_dir: str):
    from autoparallel.data.dataset import SFTDataset
    from autoparallel.data.records import DataError
    from network.processor import Qwen2VLProcessor

    if not args.meta_path:
        raise EvalError("give --meta_path (the data to evaluate) or --predictions FILE")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig) if f.name not in _NOT_DATA_OPTIONS}
    try:
        config = DataConfig(meta_path=args.meta_path, dataloader_num_workers=0, **values)
        return SFTDataset(config, processor=Qwen2VLProcessor.from_pretrained(model_dir, **config.pixel_overrides))
    except (DataError, ValueError, OSError) as e:
        raise EvalError(str(e)) from None


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("PADDLE_TRAINER_ID", 0)), int(os.environ.get("PADDLE_TRAINERS_NUM", 1))


def _processes(args: argparse.Namespace) -> int:
    """Processes of the job: --nproc_per_node (at least one tensor-parallel group), in groups of
    --tensor_parallel_degree; each group is one data-parallel rank."""
    tp, nproc = args.tensor_parallel_degree, args.nproc_per_node
    if nproc > 1 and nproc % tp:
        raise EvalError(f"--nproc_per_node {nproc} is not a multiple of --tensor_parallel_degree {tp}")
    return max(nproc, tp)


def _generate(args: argparse.Namespace) -> dict[int, str] | None:
    """This rank's predictions; on a launched rank they are written to PARTS_DIR instead (None returned)."""
    from autoparallel.data.records import DataError

    rank, world = _rank_world()
    tp = args.tensor_parallel_degree
    if tp > 1:
        import paddle.distributed as dist

        dist.init_parallel_env()
    model, model_dir = _load(args, ParallelDegrees(world // tp, tp))
    dataset = _dataset(args, model_dir)
    try:
        defaults = CheckpointGenerationDefaults.read(model_dir)
        config = generation_config_from_args(args, defaults)
        config = dataclasses.replace(config, stop_token_ids=checkpoint_stop_ids(dataset.processor, model, model_dir))
        records = eval_records(dataset, args.max_samples)
        # the tensor-parallel ranks form one data-parallel rank: they answer the same batches in lockstep
        predictions = predict(model, dataset, records, config, args.batch_size, rank // tp, world // tp,
                              progress=rank == 0)
    except (InferError, DataError, ValueError) as e:
        raise EvalError(str(e)) from None
    finally:
        if tp > 1:
            import paddle.distributed as dist

            dist.barrier()  # ranks that exit early can kill peers still in gloo
    if world == 1:
        return predictions
    if rank % tp == 0:
        parts = Path(args.output_dir) / PARTS_DIR
        (parts / f"rank{rank // tp}.json").write_text(json.dumps({str(k): v for k, v in predictions.items()}))
    return None


def _gather(output_dir: str, world: int) -> dict[int, str]:
    parts = Path(output_dir) / PARTS_DIR
    out: dict[int, str] = {}
    for rank in range(world):
        out.update({int(k): v for k, v in json.loads((parts / f"rank{rank}.json").read_text()).items()})
    shutil.rmtree(parts)
    return out


def _relaunch(argv: list[str], args: argparse.Namespace, processes: int) -> int:
    from launch.launcher import WorkerLaunch, last_line

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="qwen2vl-ap-eval-")).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    parts = Path(args.output_dir) / PARTS_DIR
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    tp = args.tensor_parallel_degree
    logger.info("evaluating on %d processes (data parallel %d x tensor parallel %d), logs in %s", processes,
                processes // tp, tp, log_dir)
    job = WorkerLaunch(Path(__file__).resolve(), argv, processes, log_dir)
    shown = [""]

    def progress() -> None:  # rank 0's progress bar, relayed
        line = last_line(log_dir / "workerlog.0")
        if line.startswith("eval") and line != shown[0]:
            sys.stderr.write("\r" + line)
            shown[0] = line

    with open(log_dir / "launcher.log", "w") as launcher_log:
        code = job.run(stdout=launcher_log, poll=progress)
    sys.stderr.write("\n" if shown[0] else "")
    if code != 0:
        print(f"qwen2vl-ap eval: workers failed (exit code {code}); see {log_dir}/workerlog.*", file=sys.stderr)
    return code


def _finish(args: argparse.Namespace, names: list[str], rows: list[dict[str, Any]]) -> None:
    metrics = score_rows(rows, names)
    write_results(args.output_dir, rows, metrics)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "per_source")
    logger.info("%d samples: %s (%s)", len(rows), summary, os.path.join(args.output_dir, PREDICTIONS_FILE))
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_source"}))


def eval_main(argv: list[str]) -> int:
    """Entry point of `qwen2vl-ap eval`; returns the exit code (2 for bad inputs)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        names = parse_metric_names(args.metrics)
        if args.predictions:
            if args.model or args.meta_path:
                raise EvalError("--predictions scores a file: it cannot be combined with --model/--meta_path")
            _finish(args, names, read_prediction_rows(args.predictions))
            return 0
        if not args.model:
            raise EvalError("give --model (and --meta_path), or --predictions FILE")
        counts = (args.batch_size, args.nproc_per_node, args.tensor_parallel_degree, args.max_samples)
        if any(n is not None and n < 1 for n in counts):
            raise EvalError("--batch_size, --nproc_per_node, --tensor_parallel_degree and --max_samples must be >= 1")
        _rank, world = _rank_world()
        processes = _processes(args)
        if "PADDLE_TRAINERS_NUM" not in os.environ and processes > 1:
            _check_parallel_model(args)  # bad model options fail here, before any process starts
            code = _relaunch(argv, args, processes)
            if code != 0:
                return code
            predictions = _gather(args.output_dir, processes // args.tensor_parallel_degree)
        else:
            if world != processes:
                raise EvalError(f"launched with {world} processes but the options need {processes}")
            predictions = _generate(args)
            if predictions is None:  # a launched rank: the parent gathers
                return 0
        # The parent re-reads the records (cheap: no pixels) to pair predictions with prompts and references.
        dataset = _dataset(args, _model_dir(args)[0])
        records = eval_records(dataset, args.max_samples)
        _finish(args, names, prediction_rows(records, predictions))
        return 0
    except (EvalError, MetricError, FormatError, CheckpointError, InferError) as e:
        print(f"qwen2vl-ap eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # a rank of a data-parallel job (`_relaunch`)
    from launch.launcher import run_launched

    run_launched(eval_main)

