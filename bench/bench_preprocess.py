"""Issue 10 item 5: image/video preprocessing, our `Qwen2VLImageProcessor` vs HF's slow `Qwen2VLImageProcessor`.

Inputs are decoded PIL images (file decoding is the same PIL call on both sides, so it is left out): 30 generated
pictures of mixed sizes from 20 px to 1500 px (RGB, plus a few RGBA and greyscale), one `preprocess` call per
image as a data loader makes it, and a 16-frame 640x360 video. Each round processes the whole set; rounds are
interleaved ours/HF, images/s (frames/s) from the median round. max |Δpixel_values| over the whole set.
HF's fast processor (`Qwen2VLImageProcessorFast`) needs torchvision, which is not installed here: not measured.
"""
import common  # noqa: I001  (first: pins BLAS threads)

import numpy as np
import transformers
from PIL import Image
from transformers import Qwen2VLImageProcessor as HFImageProcessor

from network.image_processing import Qwen2VLImageProcessor

BENCH = "preprocess"
IMAGE_ROUNDS, VIDEO_ROUNDS = 5, 5
N_IMAGES, N_FRAMES = 30, 16


def picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth gradients plus noise and a few blocks: resampling has real work to do, unlike a flat colour."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(x / (7 + 30 * c) + y / (11 + 20 * c)) for c in range(3)], axis=-1)
    base += rng.normal(0, 12, base.shape)
    for _ in range(4):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        base[y0:y0 + height // 5, x0:x0 + width // 5] = rng.integers(0, 256, 3)
    return np.clip(base, 0, 255).astype(np.uint8)


def image_set(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(20, 20), (1500, 1500), (300, 1500), (1500, 224)]
    sizes += [tuple(int(v) for v in rng.integers(32, 1501, 2)) for _ in range(N_IMAGES - len(sizes))]
    images = []
    for i, (h, w) in enumerate(sizes):
        img = Image.fromarray(picture(rng, h, w))
        images.append(img.convert("RGBA") if i % 10 == 5 else img.convert("L") if i % 10 == 7 else img)
    return images


def main() -> None:
    common.pin_threads()
    transformers.logging.set_verbosity_error()  # HF warns on every video call that the path is deprecated
    images = image_set()
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(picture(rng, 360, 640)) for _ in range(N_FRAMES)]
    ours = Qwen2VLImageProcessor()
    hf = HFImageProcessor()  # HF defaults = our defaults for images (min/max pixels, mean/std, bicubic)
    hf_video = HFImageProcessor(min_pixels=ours.video_min_pixels, max_pixels=ours.video_max_pixels)
    hf_name = f"HF transformers {transformers.__version__} Qwen2VLImageProcessor (slow, numpy/PIL)"

    ours_out = [ours.preprocess(img)["pixel_values"] for img in images]
    hf_out = [hf.preprocess(img, return_tensors="np")["pixel_values"] for img in images]
    d_images = max(float(np.abs(a - b).max()) for a, b in zip(ours_out, hf_out))
    ours_video = ours.preprocess_videos([frames])["pixel_values_videos"]
    hf_video_out = hf_video.preprocess(images=None, videos=[frames], return_tensors="np")["pixel_values_videos"]
    d_video = float(np.abs(ours_video - hf_video_out).max())
    patches = sum(len(p) for p in ours_out)

    times = common.interleave({
        "ours": lambda: [ours.preprocess(img) for img in images],
        "theirs": lambda: [hf.preprocess(img, return_tensors="np") for img in images],
    }, IMAGE_ROUNDS, warmup=0)  # the parity pass above was the warm-up
    video_times = common.interleave({
        "ours": lambda: ours.preprocess_videos([frames]),
        "theirs": lambda: hf_video.preprocess(images=None, videos=[frames], return_tensors="np"),
    }, VIDEO_ROUNDS, warmup=1)
    print(f"[preprocess] images s/round ours {times['ours']} HF {times['theirs']}; max|dpixel| {d_images:.3g}")
    print(f"[preprocess] video s/round ours {video_times['ours']} HF {video_times['theirs']}; "
          f"max|dpixel| {d_video:.3g}")

    common.emit(common.Record(
        BENCH, f"images/s, {N_IMAGES} mixed-size images (20-1500 px, {patches} patches)", "images/s",
        N_IMAGES / common.median(times["ours"]), N_IMAGES / common.median(times["theirs"]), hf_name,
        extra=dict(round_s_ours=times["ours"], round_s_theirs=times["theirs"],
                   sizes=[img.size for img in images]),
        note=f"max |Δpixel_values| over all images = {d_images:.3g}"))
    common.emit(common.Record(
        BENCH, "max |Δpixel_values| vs HF, images", "abs", d_images, better="lower"))
    common.emit(common.Record(
        BENCH, f"video frames/s, {N_FRAMES} frames 640x360", "frames/s",
        N_FRAMES / common.median(video_times["ours"]), N_FRAMES / common.median(video_times["theirs"]),
        hf_name + ", video path", extra=dict(round_s_ours=video_times["ours"], round_s_theirs=video_times["theirs"]),
        note=f"max |Δpixel_values_videos| = {d_video:.3g}"))


if __name__ == "__main__":
    main()
