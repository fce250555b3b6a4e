"""`qwen2vl-ap infer`: answer prompts about images and videos with a (fine-tuned) Qwen2-VL model.

    qwen2vl-ap infer --model DIR --image a.png --prompt "What colour is the shape?"
    qwen2vl-ap infer --model DIR --video clip.mp4 --prompt "What happens?" --temperature 0.7 --seed 0
    qwen2vl-ap infer --model DIR --input requests.jsonl --output answers.jsonl --batch_size 8
    qwen2vl-ap infer --model DIR --image a.png --prompt "..." --tensor_parallel_degree 2
    qwen2vl-ap infer --model DIR --lora ADAPTER_DIR --image a.png --prompt "..."

`--model` is any directory `Qwen2VLForConditionalGeneration.from_pretrained` reads (merged checkpoints, HF
safetensors, `model_state.pdparams`); tokenizer/processor files come from it, else the embedded tokenizer.
A prompt's `<image>` / `<video>` placeholders mark where each file goes; without them the media come first.

Tensor parallel: the command relaunches itself under `paddle.distributed.launch` with N processes, which load the
model, apply the training mp plan (`autoparallel.parallelize`) and decode the same tokens; rank 0 writes the
output. Its text goes through a file that this (parent) process relays to the terminal, so streaming still works
and the launcher's own logs stay in `--log_dir`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from autoparallel.engine.evaluation import TensorParallelModel, stop_token_ids
from launch.launcher import WorkerLaunch
from network.config import Qwen2VLConfig
from network.device import bf16_supported
from network.formats import CheckpointError, FormatError
from network.generation import SAMPLING_KEYS, CheckpointGenerationDefaults, GenerationConfig, GenerationOutput, generate
from network.hub import ModelNotFoundError, resolve_model_dir
from network.log import logger
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.processor import Qwen2VLProcessor

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
# Set for tensor-parallel workers: where rank 0 writes what a single process prints to stdout.
RANK0_STDOUT_ENV = "QWEN2VL_AP_INFER_STDOUT"


class InferError(Exception):
    """A problem with the command's inputs (reported without a traceback, exit code 2)."""


@dataclass
class Request:
    id: Any
    prompt: str
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)


@dataclass
class Answer:
    id: Any
    answer: str
    num_tokens: int


# ---- prompts and batches ------------------------------------------------------------------------------------------
def render_prompt(processor: Qwen2VLProcessor, prompt: str, num_images: int, num_videos: int,
                  system: str | None = None) -> str:
    """Chat-template text ending with the assistant turn, one vision span per image/video (the training format)."""
    counts = {IMAGE_PLACEHOLDER: num_images, VIDEO_PLACEHOLDER: num_videos}
    kinds = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}
    if any(p in prompt for p in kinds):
        for placeholder, n in counts.items():
            if prompt.count(placeholder) != n:
                raise InferError(f"prompt has {prompt.count(placeholder)} {placeholder} placeholders "
                                 f"but {n} files were given")
        pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", prompt)
    else:
        pieces = [IMAGE_PLACEHOLDER] * num_images + [VIDEO_PLACEHOLDER] * num_videos + [prompt]
    # vision spans as content items: the template writes their control tokens, the prompt text stays text (M4)
    content = [{"type": kinds[p]} if p in kinds else {"type": "text", "text": p} for p in pieces if p]
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": content})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def answer_batch(model, processor: Qwen2VLProcessor, requests: list[Request], generation_config: GenerationConfig,
                 system: str | None = None, streamer: Callable[[np.ndarray], None] | None = None
                 ) -> tuple[list[Answer], GenerationOutput]:
    """One left-padded batch through `generate`; answers are decoded without special tokens."""
    texts = [render_prompt(processor, r.prompt, len(r.images), len(r.videos), system) for r in requests]
    images = [p for r in requests for p in r.images]
    videos = [p for r in requests for p in r.videos]
    try:
        inputs = processor(texts, images=images or None, videos=videos or None, padding="longest",
                           padding_side="left")
    except (OSError, ValueError) as e:  # unreadable media, or placeholders that do not match the files
        raise InferError(f"cannot prepare request(s) {[r.id for r in requests]}: {e}") from e
    out = generate(model, **inputs, generation_config=generation_config, streamer=streamer)
    answers = [Answer(r.id, processor.decode(out.sequences[i, : out.num_tokens[i]], skip_special_tokens=True),
                      int(out.num_tokens[i])) for i, r in enumerate(requests)]
    return answers, out


class TextStreamer:
    """Prints row 0's text as tokens arrive; re-decodes the whole answer each step, so a character split over
    several byte-level tokens is printed once it is complete."""

    def __init__(self, processor: Qwen2VLProcessor, out: IO[str]):
        self.processor, self.out = processor, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens: np.ndarray) -> None:
        self.ids.append(int(tokens[0]))
        text = self.processor.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


# ---- model ------------------------------------------------------------------------------------------------------
def load_model(model_dir: str, tensor_parallel_degree: int = 1, dtype: str = "float32", lora_dir: str | None = None,
               data_parallel_degree: int = 1):
    """The model for `generate` in `dtype`: plain, or (inside a launched job) split over `tensor_parallel_degree`
    ranks, each reading only its own slices of the weight files (the plan is applied to the lazy model first);
    `data_parallel_degree` such groups (`eval`: each group answers its own batches).
    `lora_dir`: an unmerged adapter (paddlenlp format), folded into the full weights before any split, so with an
    adapter every rank reads the whole model once."""
    model = None
    if lora_dir is not None:
        from network.lora import base_mismatch, fold_adapter

        model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype)
        try:
            mismatch = base_mismatch(lora_dir, model_dir)
            names = fold_adapter(model, lora_dir)
        except (OSError, ValueError) as e:
            raise InferError(f"--lora {lora_dir}: {e}") from None
        if mismatch:  # --model is the user's explicit choice: said, not refused
            logger.warning("--lora %s: %s; folding it into --model %s as asked", lora_dir, mismatch, model_dir)
        logger.info("folded the adapter in %s into %d weights", lora_dir, len(names))
    if tensor_parallel_degree == 1:
        return model or Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype)
    from autoparallel.mesh import build_mesh
    from autoparallel.parallelize import parallelize
    from autoparallel.sharded_load import load_sharded
    from placements.degrees import ParallelDegrees

    lazy = model is None
    if lazy:
        model = Qwen2VLForConditionalGeneration.lazy(Qwen2VLConfig.from_pretrained(model_dir), dtype)
    degrees = ParallelDegrees(data_parallel_degree, tensor_parallel_degree)
    model, _ = parallelize(model, None, build_mesh(degrees, model.config), degrees)
    if lazy:
        load_sharded(model, model_dir)
    model.eval()
    return TensorParallelModel(model)


# ---- command line -----------------------------------------------------------------------------------------------
def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--temperature/--top_p/--top_k/--repetition_penalty/--seed (read by `generation_config_from_args`)."""
    # Sampling settings left unset take the checkpoint's generation_config.json, else greedy decoding.
    p.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json, else 0)")
    p.add_argument("--top_p", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--repetition_penalty", type=float)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen2vl-ap infer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (merged, HF safetensors or model_state.pdparams) "
                                                  "or a Hub id such as Qwen/Qwen2-VL-2B-Instruct (Hub cache)")
    p.add_argument("--lora", help="adapter directory (lora_config.json + lora_model_state.pdparams), folded at load")
    p.add_argument("--prompt", help="the question (single request)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file or frame directory (repeatable)")
    p.add_argument("--system", help="system prompt (default: the chat template's)")
    p.add_argument("--input", help="batch mode: JSONL of {prompt, images?, videos?, id?}; relative paths are "
                                   "resolved against the file's directory")
    p.add_argument("--output", help="batch mode: JSONL of {id, answer, num_tokens}")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=256)
    add_sampling_arguments(p)
    p.add_argument("--min_pixels", type=int, help="image resize bounds (override the model's preprocessor config)")
    p.add_argument("--max_pixels", type=int)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are generated (default: on for a single request)")
    p.add_argument("--tensor_parallel_degree", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations (bfloat16 needs a GPU of compute capability >= 8.0)")
    p.add_argument("--log_dir", help="tensor parallel: launcher and worker logs (default: a temp directory)")
    return p


def _requests(args: argparse.Namespace) -> list[Request]:
    """The requests to answer, with every media path checked."""
    if args.input:
        if args.prompt or args.image or args.video:
            raise InferError("--input (batch mode) cannot be combined with --prompt/--image/--video")
        if not args.output:
            raise InferError("--input needs --output")
        if not os.path.isfile(args.input):
            raise InferError(f"input file not found: {args.input}")
        root = os.path.dirname(os.path.abspath(args.input))
        requests = []
        with open(args.input, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    media = {kind: record.get(kind, []) for kind in ("images", "videos")}
                    media = {k: [v] if isinstance(v, str) else v for k, v in media.items()}  # one path as a str
                    requests.append(Request(record.get("id", len(requests)), record["prompt"],
                                            [os.path.join(root, p) for p in media["images"]],
                                            [os.path.join(root, p) for p in media["videos"]]))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise InferError(f"{args.input} line {n}: expected a JSON object with a \"prompt\" ({e})")
    else:
        if args.prompt is None:
            raise InferError("give --prompt (single request) or --input/--output (batch mode)")
        if args.output:
            raise InferError("--output is for batch mode (--input)")
        requests = [Request(0, args.prompt, list(args.image), list(args.video))]
    for r in requests:
        for kind, paths in (("image", r.images), ("video", r.videos)):
            for path in paths:
                if not os.path.exists(path):
                    raise InferError(f"{kind} file not found: {path}" + (f" (request {r.id!r})" if args.input else ""))
    return requests


def check_model_args(model: str, tensor_parallel_degree: int, lora_dir: str | None = None,
                     dtype: str = "float32", processes: int | None = None) -> str:
    """The model directory `model` names (a directory, or a Hub id through the Hub cache); problems with the
    model options as one `InferError`, before any process starts or weight loads. `processes`: how many the
    command runs on (default `tensor_parallel_degree`; `eval` adds data-parallel ones)."""
    try:
        model_dir = resolve_model_dir(model)
    except ModelNotFoundError as exc:
        raise InferError(str(exc)) from None
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise InferError(f"{model_dir} has no config.json: not a model directory")
    if lora_dir is not None:
        from network.lora import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME

        missing = [n for n in (LORA_CONFIG_NAME, LORA_WEIGHTS_NAME) if not os.path.isfile(os.path.join(lora_dir, n))]
        if missing:
            raise InferError(f"--lora {lora_dir}: not an adapter directory (no {', '.join(missing)})")
    if tensor_parallel_degree < 1:
        raise InferError("--tensor_parallel_degree must be >= 1")
    # The parent of a tensor-parallel run only starts the ranks, which run this check themselves: reading the
    # device here would create a CUDA context on GPU 0 beside rank 0's.
    if dtype == "bfloat16" and not is_launcher_parent(processes or tensor_parallel_degree) and not bf16_supported():
        raise InferError("--dtype bfloat16 needs a GPU with bf16 kernels (compute capability >= 8.0); "
                         "this device has none: use --dtype float32")
    if tensor_parallel_degree > 1:
        from placements.degrees import ParallelDegrees, degree_problems

        degrees = ParallelDegrees(tensor_parallel_degree=tensor_parallel_degree)
        problems = degree_problems(degrees, Qwen2VLConfig.from_pretrained(model_dir))
        if problems:
            raise InferError("; ".join(problems))
    return model_dir


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise InferError("--batch_size must be >= 1")
    args.model = check_model_args(args.model, args.tensor_parallel_degree, args.lora, args.dtype)


def generation_config_from_args(args: argparse.Namespace, defaults: CheckpointGenerationDefaults) -> GenerationConfig:
    """Validated settings: the command line, else the checkpoint's generation_config.json, else greedy. The stop
    tokens are filled in once the processor and model are loaded."""
    given = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k) is not None}
    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, seed=args.seed, **{**defaults.sampling, **given})
    except ValueError as e:
        raise InferError(str(e)) from None


def _relaunch(argv: list[str], args: argparse.Namespace) -> int:
    """Run this command on N local processes; relay rank 0's output file to stdout while they run."""
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="qwen2vl-ap-infer-")).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    rank0_stdout = log_dir / "rank0_stdout.txt"
    rank0_stdout.write_text("")
    logger.info("tensor parallel inference on %d processes, logs in %s", args.tensor_parallel_degree, log_dir)
    job = WorkerLaunch(Path(__file__).resolve(), argv, args.tensor_parallel_degree, log_dir,
                       env={RANK0_STDOUT_ENV: str(rank0_stdout)})
    with open(log_dir / "launcher.log", "w") as launcher_log, open(rank0_stdout) as relay:
        def forward() -> None:
            sys.stdout.write(relay.read())
            sys.stdout.flush()

        code = job.run(stdout=launcher_log, poll=forward)
    if code not in (0, 130):
        print(f"qwen2vl-ap infer: tensor-parallel workers failed (exit code {code}); "
              f"see {log_dir}/workerlog.*", file=sys.stderr)
    return code


def is_launcher_parent(processes: int) -> bool:
    """True in the process that starts the ranks of a `processes`-process command (it runs no model)."""
    return processes > 1 and "PADDLE_TRAINERS_NUM" not in os.environ


def relaunch_needed(tensor_parallel_degree: int) -> bool:
    """True in the parent process of a tensor-parallel command (it starts the ranks); inside a launched job,
    checks that the job has that many ranks."""
    launched = os.environ.get("PADDLE_TRAINERS_NUM")
    if launched is None:
        return tensor_parallel_degree > 1
    if int(launched) != tensor_parallel_degree:
        raise InferError(f"launched with {launched} processes but --tensor_parallel_degree {tensor_parallel_degree}")
    return False


def load_for_rank(args: argparse.Namespace) -> tuple[Qwen2VLProcessor, Any, int]:
    """(processor, model, rank) from `--model/--lora/--min_pixels/--max_pixels/--tensor_parallel_degree`; joins
    the tensor-parallel job first when there is one."""
    rank = 0
    if args.tensor_parallel_degree > 1:
        import paddle.distributed as dist

        dist.init_parallel_env()
        rank = dist.get_rank()
    overrides = {k: getattr(args, k) for k in ("min_pixels", "max_pixels") if getattr(args, k) is not None}
    try:
        processor = Qwen2VLProcessor.from_pretrained(args.model, **overrides)
    except ValueError as e:  # e.g. --min_pixels above the max
        raise InferError(str(e)) from None
    return processor, load_model(args.model, args.tensor_parallel_degree, args.dtype, args.lora), rank


def checkpoint_stop_ids(processor: Qwen2VLProcessor, model, model_dir: str) -> tuple[int, ...]:
    """`stop_token_ids` with the eos ids of the checkpoint's generation_config.json."""
    try:
        eos = CheckpointGenerationDefaults.read(model_dir).eos_token_ids
    except ValueError as e:
        raise InferError(str(e)) from None
    return stop_token_ids(processor, model.config, eos)


def _run(args: argparse.Namespace, requests: list[Request], generation_config: GenerationConfig) -> int:
    """Load, answer, write (rank 0). Every tensor-parallel rank runs this with the same inputs."""
    tp = args.tensor_parallel_degree
    processor, model, rank = load_for_rank(args)
    generation_config = dataclasses.replace(generation_config,
                                            stop_token_ids=checkpoint_stop_ids(processor, model, args.model))
    rank0_path = os.environ.get(RANK0_STDOUT_ENV)
    out = open(rank0_path, "a", encoding="utf-8") if rank0_path and rank == 0 else sys.stdout
    single = not args.input
    stream = (args.stream if args.stream is not None else single) and single and rank == 0
    try:
        answers, generated, seconds = [], 0, 0.0
        for start in range(0, len(requests), args.batch_size):
            batch = requests[start: start + args.batch_size]
            streamer = TextStreamer(processor, out) if stream else None
            batch_answers, result = answer_batch(model, processor, batch, generation_config, args.system, streamer)
            answers += batch_answers
            generated += int(result.num_tokens.sum())
            seconds += result.prefill_seconds + result.decode_seconds
            logger.info("batch of %d: prefill %.2fs, %d new tokens, decode %.1f tokens/s", len(batch),
                        result.prefill_seconds, int(result.num_tokens.sum()),
                        (result.sequences.size - len(batch)) / max(result.decode_seconds, 1e-9))
        if rank == 0:
            if args.output:
                with open(args.output, "w", encoding="utf-8") as f:
                    for a in answers:
                        f.write(json.dumps(dataclasses.asdict(a), ensure_ascii=False) + "\n")
                logger.info("wrote %d answers to %s", len(answers), args.output)
            else:
                out.write("\n" if stream else answers[0].answer + "\n")
                out.flush()
        logger.info("%d tokens in %.2fs (%d requests)", generated, seconds, len(requests))
    finally:
        if out is not sys.stdout:
            out.close()
        if tp > 1:
            import paddle.distributed as dist

            dist.barrier()  # ranks that exit early can kill peers still in gloo
    return 0


def infer_main(argv: list[str]) -> int:
    """Entry point of `qwen2vl-ap infer`; returns the exit code (2 for bad inputs)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help or a usage error
        return int(e.code or 0)
    try:
        _check_args(args)
        requests = _requests(args)
        try:
            defaults = CheckpointGenerationDefaults.read(args.model)
        except ValueError as e:
            raise InferError(str(e)) from None
        generation_config = generation_config_from_args(args, defaults)
        if relaunch_needed(args.tensor_parallel_degree):
            return _relaunch(argv, args)
        return _run(args, requests, generation_config)
    except (InferError, FormatError, CheckpointError) as e:  # bad inputs, refused or corrupt weight files
        print(f"qwen2vl-ap infer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # a rank of a tensor-parallel job (`_relaunch`)
    from launch.launcher import run_launched

    run_launched(infer_main)
