"""`qwen2vl-ap serve`: an OpenAI-compatible chat-completions server for a (fine-tuned) Qwen2-VL model.

    qwen2vl-ap serve --model DIR [--host 127.0.0.1 --port 8000] [--lora ADAPTER_DIR] [--tensor_parallel_degree 2]

Routes: `POST /v1/chat/completions` (text, images, videos; `stream: true` for SSE), `GET /v1/models`,
`GET /health`. Requests that arrive together run as one batch (see launch/serving/batcher.py); greedy answers
are the same alone or batched, and equal `qwen2vl-ap infer`'s for the same prompt. Sampling settings a request
leaves out come from `--temperature` etc. (default greedy, like `infer`).

SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight, then exits.

Access and abuse bounds (see launch/serving/app.py): loopback by default, `--api_key` for `/v1/` routes (a warning
when another machine can connect without one), Host and content-type checks, a server-side `--max_tokens_limit`,
a CPU context of at most CPU_MAX_MODEL_LEN tokens, a body-read deadline, uvicorn connection limits, and a bounded
media pool with a per-request deadline.

Tensor parallel: the command relaunches itself under `paddle.distributed.launch`; every rank loads its shard of
the model, rank 0 also runs the HTTP server and sends every call on its running batch (start, join, step, which
rows leave) to the others.
A signal to this parent process goes to rank 0, which drains and then releases the other ranks.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.infer import InferError, check_model_args, checkpoint_stop_ids, load_for_rank, relaunch_needed
from launch.launcher import WorkerLaunch, stop
from network.log import logger

# Set for tensor-parallel ranks: the file rank 0 writes its pid to (signals from the parent go there).
RANK0_PID_ENV = "QWEN2VL_AP_SERVE_PID_FILE"
API_KEY_ENV = "QWEN2VL_AP_API_KEY"  # the key from the environment keeps it out of `ps` listings
# CPU prefill compute grows with the square of the prompt length (attention is blocked, so memory does not), and
# the KV cache and activations with its length: the checkpoint's context (often 32k tokens) would let one short
# request hold the one model thread for minutes. --max_model_len raises it explicitly.
CPU_MAX_MODEL_LEN = 8192


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen2vl-ap serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (merged, HF safetensors or model_state.pdparams) "
                                                  "or a Hub id such as Qwen/Qwen2-VL-2B-Instruct (Hub cache)")
    p.add_argument("--lora", help="adapter directory (lora_config.json + lora_model_state.pdparams), folded at load")
    p.add_argument("--served_model_name", help="the `model` name clients use (default: the model folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tensor_parallel_degree", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations (bfloat16 needs a GPU of compute capability >= 8.0)")
    p.add_argument("--log_dir", help="tensor parallel: launcher and rank logs (default: a temp directory)")
    g = p.add_argument_group("batching")
    g.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together")
    g.add_argument("--batch_wait_ms", type=float, default=10.0, help="how long the first request waits for others")
    g.add_argument("--max_batch_tokens", type=int, help="padded prompt tokens (rows x longest prompt) one prefill "
                                                        "may hold; more wait for the next (default: 16384)")
    g.add_argument("--static_batching", action="store_true",
                   help="new requests wait until the running batch is done (default: they join it between steps)")
    g = p.add_argument_group("defaults for requests that leave a setting out")
    g.add_argument("--max_tokens", type=int,
                   help="completion tokens (default: --max_tokens_limit, or the room left in the context)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g = p.add_argument_group("access")
    g.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"clients must send `Authorization: Bearer KEY` to /v1/ routes (default: ${API_KEY_ENV})")
    g.add_argument("--allowed_hosts", nargs="+", default=[], metavar="NAME",
                   help="Host header names accepted besides loopback names and --host ('*': any)")
    g = p.add_argument_group("limits (a request over one gets a 4xx naming the field)")
    g.add_argument("--max_model_len", type=int,
                   help=f"prompt + completion tokens (default: the model's context; on CPU at most "
                        f"{CPU_MAX_MODEL_LEN})")
    g.add_argument("--max_tokens_limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    g.add_argument("--max_body_mb", type=float, default=32.0, help="request body size")
    g.add_argument("--body_timeout", type=float, default=30.0, help="seconds to receive a request body")
    g.add_argument("--max_connections", type=int, default=256,
                   help="open connections and requests in flight; beyond it new ones get 503")
    g.add_argument("--keep_alive_timeout", type=int, default=5, help="seconds an idle connection stays open")
    g.add_argument("--media_workers", type=int, default=4, help="threads reading and decoding images and videos")
    g.add_argument("--media_queue", type=int, default=16,
                   help="requests with media that may wait for a media thread; beyond it new ones get 503")
    g.add_argument("--media_timeout", type=float, default=60.0,
                   help="seconds for all images and videos of one request (504 beyond)")
    g.add_argument("--max_images", type=int, default=8, help="images per request")
    g.add_argument("--max_videos", type=int, default=2, help="videos per request")
    g.add_argument("--max_image_pixels", type=int, default=4096 * 4096,
                   help="decoded pixels of one image or video frame, checked before decoding")
    g.add_argument("--max_video_frames", type=int, default=64, help="frames sampled from one video")
    g.add_argument("--min_pixels", type=int, help="image resize bounds (override the model's preprocessor config)")
    g.add_argument("--max_pixels", type=int)
    g.add_argument("--allow_remote_media", action="store_true",
                   help="fetch http(s) image/video URLs (public addresses only; redirects re-checked)")
    g.add_argument("--media_dir", help="local image/video paths are read only below this directory (relative ones "
                                       "resolve against it); without it no local file is read")
    g.add_argument("--drain_timeout", type=float, help="seconds SIGTERM waits for requests in flight (default: all)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    args.model = check_model_args(args.model, args.tensor_parallel_degree, args.lora, args.dtype)
    positive = ("max_batch_size", "max_images", "max_image_pixels", "max_video_frames",
                "max_tokens_limit", "body_timeout", "max_connections", "keep_alive_timeout", "media_workers",
                "media_timeout")
    bad = [f"--{k}" for k in positive if getattr(args, k) <= 0]
    bad += [f"--{k}" for k in ("max_tokens", "max_batch_tokens")
            if getattr(args, k) is not None and getattr(args, k) < 1]
    bad += [f"--{k}" for k in ("max_videos", "media_queue") if getattr(args, k) < 0]
    if bad:
        raise InferError(f"{', '.join(bad)} must be > 0 (--max_videos, --media_queue >= 0)")
    if args.media_dir and not os.path.isdir(args.media_dir):
        raise InferError(f"--media_dir {args.media_dir}: not a directory")


def startup_warnings(host: str, api_key: str | None, allowed_hosts: list[str]) -> list[str]:
    """Warnings for a server other machines can use without a key, or cannot use at all (Host check)."""
    from launch.serving.app import is_loopback

    warnings = []
    if not api_key and not is_loopback(host):
        warnings.append(f"--host {host} is reachable from other machines and no --api_key is set: anyone who can "
                        "reach the port can use the model")
    if host in ("0.0.0.0", "::") and not allowed_hosts:
        warnings.append(f"--host {host}: requests must name this server in their Host header; add the names "
                        "clients use with --allowed_hosts (others get 400)")
    return warnings


def _max_model_len(args: argparse.Namespace, model) -> int:
    from network.device import on_gpu

    if args.max_model_len:
        return args.max_model_len
    context = model.config.max_position_embeddings
    return context if on_gpu() else min(context, CPU_MAX_MODEL_LEN)


def _relaunch(argv: list[str], args: argparse.Namespace) -> int:
    """Serve from N local processes; SIGTERM/Ctrl-C here is passed to rank 0, which drains then exits."""
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="qwen2vl-ap-serve-")).resolve()
    pid_file = log_dir / "rank0.pid"
    job = WorkerLaunch(Path(__file__).resolve(), argv, args.tensor_parallel_degree, log_dir,
                       env={RANK0_PID_ENV: str(pid_file)})
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "launcher.log", "w") as launcher_log:
        proc = job.start(stdout=launcher_log, stderr=subprocess.STDOUT)
    logger.info("tensor-parallel server on %d processes (http://%s:%d), logs in %s", args.tensor_parallel_degree,
                args.host, args.port, log_dir)

    def to_rank0(signum, _frame) -> None:
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):  # rank 0 not up yet: stop the whole job
            os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, to_rank0)
    signal.signal(signal.SIGINT, to_rank0)
    try:
        code = proc.wait()
    finally:
        stop(proc)  # nothing of the job outlives this command
    if code != 0:
        print(f"qwen2vl-ap serve: tensor-parallel ranks failed (exit code {code}); see {log_dir}/workerlog.*",
              file=sys.stderr)
    return code


def _serve(args: argparse.Namespace) -> int:
    """Load the model and serve (rank 0), or follow rank 0's batches (other tensor-parallel ranks)."""
    import uvicorn

    from launch.serving.app import ServerSettings, create_app
    from launch.serving.batcher import DEFAULT_MAX_BATCH_TOKENS, Batcher, RankSync, follow_rank0
    from launch.serving.messages import MediaLimits
    from network.generation import GenerationConfig

    try:
        defaults = GenerationConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                    repetition_penalty=args.repetition_penalty)
    except ValueError as e:
        raise InferError(str(e)) from None
    processor, model, rank = load_for_rank(args)
    if rank > 0:
        follow_rank0(model)
        return 0
    if os.environ.get(RANK0_PID_ENV):
        Path(os.environ[RANK0_PID_ENV]).write_text(str(os.getpid()))
    limits = MediaLimits(max_images=args.max_images, max_videos=args.max_videos,
                         max_image_pixels=args.max_image_pixels, max_video_frames=args.max_video_frames,
                         allow_remote=args.allow_remote_media, media_dir=args.media_dir)
    settings = ServerSettings(
        model_name=args.served_model_name or Path(args.model.rstrip("/")).name,
        max_model_len=_max_model_len(args, model), limits=limits, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        body_timeout=args.body_timeout, default_max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
        api_key=args.api_key or None,
        allowed_hosts=(args.host.lower(), *(h.lower() for h in args.allowed_hosts)),
        media_workers=args.media_workers, media_queue=args.media_queue, media_timeout=args.media_timeout,
        defaults=defaults)
    limits.context_tokens = settings.max_model_len  # over-long prompts are refused from media headers
    batcher = Batcher(model, processor, checkpoint_stop_ids(processor, model, args.model), args.max_batch_size,
                      args.batch_wait_ms / 1000, RankSync() if args.tensor_parallel_degree > 1 else None,
                      args.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS, not args.static_batching)
    app = create_app(batcher, processor, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=args.drain_timeout, limit_concurrency=args.max_connections,
                            timeout_keep_alive=args.keep_alive_timeout)
    logger.info("serving %r on http://%s:%d/v1 (batches of up to %d, context %d tokens)", settings.model_name,
                args.host, args.port, args.max_batch_size, settings.max_model_len)
    for warning in startup_warnings(args.host, settings.api_key, args.allowed_hosts):
        logger.warning(warning)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was installed before it:
    # these record it, so the drained server exits normally.
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: received.append(signum))
    uvicorn.Server(config).run()
    logger.info("server stopped%s", f" ({signal.Signals(received[0]).name})" if received else "")
    return 130 if signal.SIGINT in received else 0


def serve_main(argv: list[str]) -> int:
    """Entry point of `qwen2vl-ap serve`; returns the exit code (2 for bad options)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help or a usage error
        return int(e.code or 0)
    from network.formats import CheckpointError, FormatError

    try:
        _check_args(args)
        if relaunch_needed(args.tensor_parallel_degree):
            return _relaunch(argv, args)
        return _serve(args)
    except (InferError, FormatError, CheckpointError) as e:  # bad inputs, refused or corrupt weight files
        print(f"qwen2vl-ap serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # a rank of a tensor-parallel job (`_relaunch`)
    from launch.launcher import run_launched

    run_launched(serve_main)
