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
from typing import Sequence, Union

import numpy as np

from network.image_processing import ImageLike, open_image, to_rgb

FRAME_FACTOR = 2
DEFAULT_VIDEO_FPS = 2.0  # qwen_vl_utils' sampling rate, also HF Qwen2_5_VLProcessor's default `fps`
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

VideoLike = Union[str, os.PathLike, Sequence[ImageLike]]


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


def _frame_files(directory: str) -> list[str]:
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"frame directory {directory!r} contains no image files")
    return [os.path.join(directory, n) for n in names]


def _load_frame_list(frames: Sequence[ImageLike], max_frames: int) -> list[np.ndarray]:
    if len(frames) == 0:
        raise ValueError("a video given as a frame list needs at least one frame")
    if len(frames) > max_frames:
        keep = max(FRAME_FACTOR, max_frames // FRAME_FACTOR * FRAME_FACTOR)
        frames = [frames[i] for i in np.round(np.linspace(0, len(frames) - 1, keep)).astype(np.int64)]
    out = [np.asarray(to_rgb(open_image(f))) for f in frames]
    if len(out) % FRAME_FACTOR:
        out.extend([out[-1]] * (FRAME_FACTOR - len(out) % FRAME_FACTOR))
    return out


def _count_packets(path: str) -> int:
    """Frame count from the container index without decoding (used when the stream header has none)."""
    import av

    with av.open(path) as container:
        return sum(1 for p in container.demux(video=0) if p.size > 0)


def _decode(path: str, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames at `indices`; also return how many frames the stream really has."""
    import av

    wanted = set(indices.tolist())
    got: dict[int, np.ndarray] = {}
    count = 0
    with av.open(path) as container:
        container.streams.video[0].thread_type = "AUTO"
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            count = i + 1
    return got, count


def _load_video_file(path: str, fps: float, min_frames: int, max_frames: int) -> list[np.ndarray]:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path!r} has no video stream")
            stream = container.streams.video[0]
            total = stream.frames
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else None
        if total <= 0:
            total = _count_packets(path)
        if video_fps is None:
            raise ValueError(f"{path!r}: the video stream declares no frame rate")
        indices = sample_frame_indices(total, video_fps, fps, min_frames, max_frames)
        frames, decoded = _decode(path, indices)
        if decoded != total:  # header frame count was wrong: resample on the real count
            indices = sample_frame_indices(decoded, video_fps, fps, min_frames, max_frames)
            frames, decoded = _decode(path, indices)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read video file {path!r}: {e}") from e
    return [frames[i] for i in indices.tolist()]


def load_video(
    video: VideoLike, fps: float = DEFAULT_VIDEO_FPS, min_frames: int = 4, max_frames: int = 768
) -> list[np.ndarray]:
    """Frames (HWC uint8 RGB, even count) of a video file, a directory of frame images or a list of frames."""
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isdir(path):
            return _load_frame_list(_frame_files(path), max_frames)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video file not found: {path!r}")
        return _load_video_file(path, fps, min_frames, max_frames)
    return _load_frame_list(list(video), max_frames)
