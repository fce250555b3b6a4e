"""Video loading for Qwen2-VL: decode with PyAV and sample frames like `qwen_vl_utils` (fps-based, even count).

Sampling (qwen_vl_utils `smart_nframes` + its decord/torchvision readers):
  n = total / video_fps * fps, clamped to [ceil2(min_frames), floor2(min(max_frames, total))] and to total,
  then floored to a multiple of 2; indices = round(linspace(0, total - 1, n)) (numpy float64, round half to even).
Frame lists / frame directories: all frames are used (uniformly subsampled when there are more than max_frames),
and an odd count is padded by repeating the last frame, as qwen_vl_utils does for image-list videos.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import BinaryIO, Sequence, TypeVar, Union

import numpy as np

from network.image_processing import ImageLike, open_image, to_rgb

FRAME_FACTOR = 2
DEFAULT_VIDEO_FPS = 2.0  # qwen_vl_utils' sampling rate, also HF Qwen2_5_VLProcessor's default `fps`
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# FFmpeg demuxers a video file may be read with (others, e.g. hls, concat, image2, sdp, rtsp, open further files or
# connections named inside the file).
ALLOWED_VIDEO_FORMATS = ("mov", "matroska", "avi", "mpegts")

VideoLike = Union[str, os.PathLike, Sequence[ImageLike]]
VideoSource = Union[str, BinaryIO]
T = TypeVar("T")


def sample_frame_indices(
    total_frames: int, video_fps: float, fps: float = DEFAULT_VIDEO_FPS, min_frames: int = 4, max_frames: int = 768
) -> np.ndarray:
    """Indices (int64) of the frames to keep from a video of `total_frames` frames at `video_fps`."""
    if total_frames < FRAME_FACTOR:
        raise ValueError(f"a video needs at least {FRAME_FACTOR} frames, got {total_frames}")
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"cannot sample frames: n={n} with total_frames={total_frames}, max_frames={max_frames}")
    return np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def frame_files(directory: str) -> list[str]:
    """The image files of a frame directory, in name order."""
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"frame directory {directory!r} contains no image files")
    return [os.path.join(directory, n) for n in names]


def subsample_frames(frames: Sequence[T], max_frames: int) -> list[T]:
    """The frames a frame list keeps: all, or `max_frames` (even) uniformly spaced ones. Taken before any frame
    is decoded, so the frames dropped cost nothing."""
    if len(frames) <= max_frames:
        return list(frames)
    keep = max(FRAME_FACTOR, max_frames // FRAME_FACTOR * FRAME_FACTOR)
    return [frames[i] for i in np.round(np.linspace(0, len(frames) - 1, keep)).astype(np.int64)]


def _load_frame_list(frames: Sequence[ImageLike], max_frames: int) -> list[np.ndarray]:
    if len(frames) == 0:
        raise ValueError("a video given as a frame list needs at least one frame")
    out = [np.asarray(to_rgb(open_image(f))) for f in subsample_frames(frames, max_frames)]
    if len(out) % FRAME_FACTOR:
        out.extend([out[-1]] * (FRAME_FACTOR - len(out) % FRAME_FACTOR))
    return out


@dataclass
class VideoHeader:
    """What a video file's container says, read without decoding a frame."""
    total_frames: int
    fps: float
    height: int
    width: int


def _open_container(source: VideoSource):
    """The container, opened only by a demuxer of ALLOWED_VIDEO_FORMATS: each is forced in turn, so FFmpeg never
    probes for (and never runs) playlist, concat, image-sequence or network demuxers, which open other files."""
    import av

    for name in ALLOWED_VIDEO_FORMATS:
        if not isinstance(source, str):
            source.seek(0)
        try:
            return av.open(source, format=name)
        except av.error.FFmpegError:
            continue
    raise ValueError(f"not a video container of the supported formats ({', '.join(ALLOWED_VIDEO_FORMATS)})")


def probe_video(source: VideoSource) -> VideoHeader:
    """Frame count, frame rate and frame size of a video file (a path or a seekable binary file object)."""
    import av

    try:
        with _open_container(source) as container:
            if not container.streams.video:
                raise ValueError("the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            total = stream.frames
            if total <= 0:  # no frame count in the header: count packets (no decoding)
                total = sum(1 for p in container.demux(video=0) if p.size > 0)
            header = VideoHeader(total, float(rate) if rate else 0.0, stream.codec_context.height,
                                 stream.codec_context.width)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read the video: {e}") from e
    if not header.fps:
        raise ValueError("the video stream declares no frame rate")
    return header


def _decode(source: VideoSource, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Frames at `indices` (only those are converted and kept); also how many frames the stream really has."""
    wanted = set(indices.tolist())
    got: dict[int, np.ndarray] = {}
    count = 0
    with _open_container(source) as container:
        container.streams.video[0].thread_type = "AUTO"
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            count = i + 1
    return got, count


def decode_video(source: VideoSource, header: VideoHeader, fps: float = DEFAULT_VIDEO_FPS, min_frames: int = 4,
                 max_frames: int = 768) -> list[np.ndarray]:
    """The sampled frames (HWC uint8 RGB) of a probed video file."""
    import av

    indices = sample_frame_indices(header.total_frames, header.fps, fps, min_frames, max_frames)
    try:
        frames, decoded = _decode(source, indices)
        if decoded != header.total_frames:  # header frame count was wrong: resample on the real count
            indices = sample_frame_indices(decoded, header.fps, fps, min_frames, max_frames)
            frames, decoded = _decode(source, indices)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read the video: {e}") from e
    return [frames[i] for i in indices.tolist()]


def _load_video_file(path: str, fps: float, min_frames: int, max_frames: int) -> list[np.ndarray]:
    try:
        return decode_video(path, probe_video(path), fps, min_frames, max_frames)
    except ValueError as e:
        raise ValueError(f"video file {path!r}: {e}") from e


def load_video(
    video: VideoLike, fps: float = DEFAULT_VIDEO_FPS, min_frames: int = 4, max_frames: int = 768
) -> list[np.ndarray]:
    """Frames (HWC uint8 RGB, even count) of a video file, a directory of frame images or a list of frames."""
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isdir(path):
            return _load_frame_list(frame_files(path), max_frames)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video file not found: {path!r}")
        return _load_video_file(path, fps, min_frames, max_frames)
    return _load_frame_list(list(video), max_frames)
