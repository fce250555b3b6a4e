"""Processor parity against HF transformers 4.55 (slow Qwen2VLImageProcessor, Qwen2VLProcessor, fast tokenizer).

Run with `pytest -s` to see the measured deltas and tokenizer speed."""
import json
import time

import numpy as np
import pytest
from PIL import Image

from network.image_processing import Qwen2VLImageProcessor, smart_resize
from network.processor import QWEN2_VL_CHAT_TEMPLATE, Qwen2VLProcessor
from network.tokenizer import SPECIAL_TOKEN_IDS, embedded_tokenizer_dir, load_tokenizer

hf_ip = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLProcessor.from_pretrained()


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import Qwen2TokenizerFast, Qwen2VLProcessor as HFProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    class NoVideoProcessor(HFProcessor):
        """Qwen2VLVideoProcessor needs torchvision (not installed): accept a placeholder; videos are checked
        against the slow image processor's video path instead."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                super().check_argument_for_proper_class(argument_name, argument)

    tok = Qwen2TokenizerFast.from_pretrained(embedded_tokenizer_dir())
    return NoVideoProcessor(
        image_processor=hf_ip.Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=BaseVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _rand_image(h, w, mode="RGB", seed=0):
    shape = {"RGB": (h, w, 3), "RGBA": (h, w, 4), "L": (h, w)}[mode]
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def _compare(ours, hf, images, **hf_kwargs):
    a = ours.preprocess(images)
    b = hf.preprocess(images=images, return_tensors="np", **hf_kwargs)
    np.testing.assert_array_equal(a["image_grid_thw"], b["image_grid_thw"])
    assert a["pixel_values"].dtype == np.float32 and a["image_grid_thw"].dtype == np.int64
    return float(np.abs(a["pixel_values"] - b["pixel_values"]).max())


@pytest.mark.parametrize(
    "h,w", [(20, 20), (30, 1500), (2000, 60), (2000, 1500), (224, 336), (57, 113), (1, 150), (28, 28)]
)
def test_image_sizes_match_hf(h, w):
    # HF guesses the channel axis from the shape (a 1- or 3-pixel-high image looks channels-first): tell it.
    image = _rand_image(h, w, seed=h * w)
    delta = _compare(Qwen2VLImageProcessor(), hf_ip.Qwen2VLImageProcessor(), [image], input_data_format="channels_last")
    print(f"\n[pixels] {h}x{w}: max|dpixel|={delta:.3g}")
    assert delta <= 1e-5


def test_modes_and_custom_pixels_match_hf():
    rgba = _rand_image(90, 130, "RGBA", 1)
    gray = _rand_image(77, 201, "L", 2)
    palette = _rand_image(120, 64, "RGB", 3).convert("P", palette=Image.Palette.ADAPTIVE)
    cmyk = _rand_image(50, 80, "RGB", 4).convert("CMYK")
    la = _rand_image(60, 60, "RGBA", 5).convert("LA")
    images = [rgba, gray, palette, cmyk, la]
    delta = _compare(Qwen2VLImageProcessor(), hf_ip.Qwen2VLImageProcessor(), images)
    custom = dict(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)
    big = [_rand_image(900, 700, seed=6), _rand_image(40, 50, seed=7)]
    delta_custom = _compare(Qwen2VLImageProcessor(**custom), hf_ip.Qwen2VLImageProcessor(**custom), big)
    arr = np.asarray(_rand_image(64, 96, seed=8))  # numpy HWC uint8 input
    delta_np = _compare(Qwen2VLImageProcessor(), hf_ip.Qwen2VLImageProcessor(), [arr])
    print(f"\n[pixels] RGBA/L/P/CMYK/LA: {delta:.3g}; custom min/max: {delta_custom:.3g}; numpy: {delta_np:.3g}")
    assert max(delta, delta_custom, delta_np) <= 1e-5


def test_smart_resize_edge_cases():
    for h, w in [(20, 20), (1, 1), (3000, 4000), (28, 5600), (100, 100)]:
        assert smart_resize(h, w) == hf_ip.smart_resize(h, w)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


def test_sixteen_bit_is_scaled_not_saturated():
    img = Image.fromarray(np.full((56, 56), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    rgb = Qwen2VLImageProcessor()._prepare(img)
    assert rgb.mode == "RGB" and abs(int(np.asarray(rgb)[0, 0, 0]) - 128) <= 1


def test_exif_orientation_is_opt_in(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    _rand_image(60, 200).save(path, exif=exif)
    assert Qwen2VLImageProcessor()._prepare(str(path)).size == (200, 60)  # HF parity: EXIF ignored
    assert Qwen2VLImageProcessor(exif_transpose=True)._prepare(str(path)).size == (60, 200)


def test_image_resolution_and_token_count(tmp_path):
    ip = Qwen2VLImageProcessor(image_resolution=512)
    path = tmp_path / "x.png"
    _rand_image(1000, 600).save(path)
    out = ip.preprocess([str(path)])
    t, h, w = out["image_grid_thw"][0]
    assert max(h, w) * 14 <= 512 + 28 and ip.num_image_tokens(1000, 600) == t * h * w // 4
    proc_ip = Qwen2VLImageProcessor()
    for h, w in [(20, 20), (2000, 1500), (333, 777)]:
        grid = proc_ip.preprocess([_rand_image(h, w)])["image_grid_thw"][0]
        assert proc_ip.num_image_tokens(h, w) == int(np.prod(grid)) // 4


def _frames(n, h=90, w=120, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("n", [4, 5])
def test_video_frames_match_hf(n):
    ip = Qwen2VLImageProcessor()
    frames = _frames(n, seed=n)
    ours = ip.preprocess_videos([frames])
    # HF's video processor needs torchvision; the slow image processor's video path is the same algorithm.
    hf = hf_ip.Qwen2VLImageProcessor(min_pixels=ip.video_min_pixels, max_pixels=ip.video_max_pixels)
    ref = hf.preprocess(images=None, videos=[[Image.fromarray(f) for f in frames]], return_tensors="np")
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
    delta = float(np.abs(ours["pixel_values_videos"] - ref["pixel_values_videos"]).max())
    print(f"\n[video] {n} frames: grid={ours['video_grid_thw'].tolist()} max|dpixel|={delta:.3g}")
    assert delta <= 1e-5 and ours["video_grid_thw"][0, 0] == (n + 1) // 2


def _write_mp4(path, n=30, fps=10, h=48, w=64):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(n):
            img = np.zeros((h, w, 3), dtype=np.uint8)
            img[..., 0] = i * 8
            img[..., 2] = 255 - i * 8
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_file_sampling(tmp_path):
    from network.video import load_video, sample_frame_indices

    path = tmp_path / "clip.mp4"
    _write_mp4(path)
    frames = load_video(str(path), fps=2.0)
    expected = [0, 6, 12, 17, 23, 29]  # 30 frames at 10 fps → 6 frames, round(linspace(0, 29, 6))
    assert sample_frame_indices(30, 10.0, 2.0).tolist() == expected
    assert len(frames) == 6 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    red = [float(f[..., 0].mean()) for f in frames]
    assert np.allclose(red, [i * 8 for i in expected], atol=6), red
    assert len(load_video(str(path), fps=0.1)) == 4  # min_frames
    assert len(load_video(str(path), fps=10, max_frames=9)) == 8  # even, capped

    frame_dir = tmp_path / "frames"
    frame_dir.mkdir()
    for i, f in enumerate(_frames(5, 30, 40)):
        Image.fromarray(f).save(frame_dir / f"{i:03d}.png")
    listed = load_video(str(frame_dir))
    assert len(listed) == 6 and np.array_equal(listed[-1], listed[-2])  # odd count padded with last frame

    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        load_video(str(bad))


def test_tokenizer_ids_and_speed():
    tok = load_tokenizer()
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    for token, idx in SPECIAL_TOKEN_IDS.items():
        assert tok(token)["input_ids"] == [idx]
    text = " ".join(f"word{i} is, perhaps, {i * 7} apples." for i in range(120))
    n = len(tok(text)["input_ids"])
    start = time.perf_counter()
    for _ in range(10):
        tok(text)
    ms = (time.perf_counter() - start) / 10 * 1000 / n * 1000
    print(f"\n[tokenizer] paddlenlp Qwen2TokenizerFast: {ms:.2f} ms per 1k tokens ({n}-token text)")


def _conversation():
    return [
        {"role": "system", "content": "You are a careful visual assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?\n"}]},
        {"role": "assistant", "content": "A random  texture."},
        {"role": "user", "content": [{"type": "text", "text": "And this one? "}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Another one, wider."}]},
    ]


def test_chat_template_and_ids_match_hf(processor, hf_processor):
    for msgs in (_conversation(), _conversation()[1:], [{"role": "user", "content": "hi"}]):
        for gen in (False, True):
            ours = processor.apply_chat_template(msgs, add_generation_prompt=gen)
            assert ours == hf_processor.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    text = processor.apply_chat_template(_conversation())
    images = [_rand_image(100, 150, seed=1), _rand_image(300, 80, "RGBA", seed=2)]
    ours = processor(text=text, images=images)
    ref = hf_processor(text=[text], images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    delta = float(np.abs(ours["pixel_values"] - ref["pixel_values"]).max())
    print(f"\n[processor] {ours['input_ids'].shape[1]} tokens equal to HF; max|dpixel|={delta:.3g}")
    assert delta <= 1e-5 and "pixel_values_videos" not in ours
    n_img = int((ours["input_ids"] == processor.image_token_id).sum())
    assert n_img == sum(processor.image_token_count(im.height, im.width) for im in images)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding_matches_hf(processor, hf_processor, side):
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A?"}]}]
    text_only = [{"role": "user", "content": "A much longer question without any image, and some more words."}]
    texts = [processor.apply_chat_template(with_image), processor.apply_chat_template(text_only)]
    images = [_rand_image(64, 64)]
    ours = processor(text=texts, images=images, padding="longest", padding_side=side)
    hf_processor.tokenizer.padding_side = side
    ref = hf_processor(text=texts, images=images, padding="longest", return_tensors="np")
    hf_processor.tokenizer.padding_side = "right"
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    with pytest.raises(ValueError, match="padding"):
        processor(text=texts, images=images)


def test_video_tokens_expand(processor):
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(msgs)
    out = processor(text=text, videos=[_frames(4, 56, 84)])
    grid = out["video_grid_thw"][0]
    assert int((out["input_ids"] == processor.video_token_id).sum()) == processor.num_vision_tokens(grid)
    assert processor.video_token_count(4, 56, 84) == processor.num_vision_tokens(grid)
    with pytest.raises(ValueError, match="placeholders"):
        processor.expand_vision_tokens(text, video_grid_thw=np.zeros((0, 3), dtype=np.int64))


def test_save_pretrained_roundtrip_and_hf_loadable(processor, tmp_path):
    proc = Qwen2VLProcessor.from_pretrained(None, min_pixels=64 * 28 * 28, image_resolution=448)
    proc.save_pretrained(str(tmp_path))
    again = Qwen2VLProcessor.from_pretrained(str(tmp_path))
    assert again.image_processor == proc.image_processor
    msgs = _conversation()
    text = processor.apply_chat_template(msgs)
    ids = processor.tokenizer(text)["input_ids"]
    assert again.tokenizer(text)["input_ids"] == ids

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    hf_img = hf_ip.Qwen2VLImageProcessor.from_pretrained(str(tmp_path))
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.apply_chat_template(msgs, tokenize=False) == text
    assert (hf_img.min_pixels, hf_img.max_pixels) == (64 * 28 * 28, proc.image_processor.max_pixels)
    assert (tmp_path / "chat_template.jinja").read_text() == QWEN2_VL_CHAT_TEMPLATE

    # Hub checkpoints ship an HF-style chat_template.json, which paddlenlp alone cannot parse.
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    assert Qwen2VLProcessor.from_pretrained(str(tmp_path)).tokenizer(text)["input_ids"] == ids


@pytest.mark.parametrize("fps", [2.0, [1.0, 4.0]])
def test_qwen2_5_vl_video_inputs_match_hf(processor, fps):
    """Token expansion and `second_per_grid_ts` equal HF's Qwen2_5_VLProcessor (its video processor needs
    torchvision, so a stand-in returns the slow image processor's video output, the same algorithm)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast
    from transformers.video_processing_utils import BaseVideoProcessor

    ip = processor.image_processor
    slow = hf_ip.Qwen2VLImageProcessor(min_pixels=ip.video_min_pixels, max_pixels=ip.video_max_pixels)

    class SlowVideoProcessor(BaseVideoProcessor):
        temporal_patch_size, merge_size = ip.temporal_patch_size, ip.merge_size

        def __call__(self, videos, **kwargs):
            clips = [[Image.fromarray(f) for f in v] for v in videos]
            return dict(slow.preprocess(images=None, videos=clips, return_tensors="np"))

    class HFProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                super().check_argument_for_proper_class(argument_name, argument)

    hf = HFProcessor(image_processor=hf_ip.Qwen2VLImageProcessor(), video_processor=SlowVideoProcessor(),
                     tokenizer=Qwen2TokenizerFast.from_pretrained(embedded_tokenizer_dir()),
                     chat_template=QWEN2_VL_CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "and"}, {"type": "video"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    videos = [_frames(4, 56, 84, seed=1), _frames(6, 84, 56, seed=2)]
    ours = processor(text=text, videos=videos, fps=fps)
    ref = hf(text=[text], videos=videos, fps=fps, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
    np.testing.assert_allclose(ours["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-5)
    np.testing.assert_array_equal(ours["second_per_grid_ts"], np.asarray(ref["second_per_grid_ts"], np.float32))
    with pytest.raises(ValueError, match="fps has 3 values for 2 videos"):
        processor(text=text, videos=videos, fps=[1.0, 2.0, 3.0])
