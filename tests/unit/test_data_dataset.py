"""SFT sample building: template ids, label masks, vision-token expansion, truncation, media errors, video."""
import dataclasses
import json
import os
import re

import av
import numpy as np
import pytest
from PIL import Image

from autoparallel.data import IGNORE_INDEX, DataConfig, DataError, SFTDataset
from network.image_processing import image_hw
from network.processor import Qwen2VLProcessor
from network.rope_index import get_rope_index

IM_START, IM_END, VS, VE, IMG, VID = 151644, 151645, 151652, 151653, 151655, 151656


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLProcessor.from_pretrained(None)


def png(path, size=(56, 56), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def mp4(path, frames=10, size=(64, 48), fps=4):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def make_dataset(tmp_path, records, processor, **config):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"annotation": str(ann), "root": str(tmp_path)}}))
    return SFTDataset(DataConfig(meta_path=str(meta), **config), processor)


def user_assistant(*turns, system=None, images=(), videos=()):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for user, answer in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs, "images": list(images), "videos": list(videos)}


def test_label_mask_token_by_token(tmp_path, processor):
    png(tmp_path / "a.png")
    ds = make_dataset(tmp_path, [user_assistant(("<image>What colour?", "red"), ("Why?", "Because."),
                                                system="Be brief.", images=["a.png"])], processor)
    enc = lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, answer = IGNORE_INDEX, None  # label of a prompt token / "same as the id"
    expected = (
        [(IM_START, prompt)] + [(t, prompt) for t in enc("system\nBe brief.")] + [(IM_END, prompt)]
        + [(t, prompt) for t in enc("\n")] + [(IM_START, prompt)] + [(t, prompt) for t in enc("user\n")]
        + [(VS, prompt)] + [(IMG, prompt)] * 4 + [(VE, prompt)] + [(t, prompt) for t in enc("What colour?")]
        + [(IM_END, prompt)] + [(t, prompt) for t in enc("\n")] + [(IM_START, prompt)]
        + [(t, prompt) for t in enc("assistant\n")] + [(t, answer) for t in enc("red")] + [(IM_END, answer)]
        + [(t, prompt) for t in enc("\n")] + [(IM_START, prompt)] + [(t, prompt) for t in enc("user\nWhy?")]
        + [(IM_END, prompt)] + [(t, prompt) for t in enc("\n")] + [(IM_START, prompt)]
        + [(t, prompt) for t in enc("assistant\n")] + [(t, answer) for t in enc("Because.")] + [(IM_END, answer)]
        + [(t, prompt) for t in enc("\n")]
    )
    s = ds[0]
    assert s["input_ids"].tolist() == [t for t, _ in expected]
    assert s["labels"].tolist() == [t if lab is None else lab for t, lab in expected]
    assert s["num_labels"] == len(enc("red")) + len(enc("Because.")) + 2 and s["num_tokens"] == len(expected)
    assert s["attention_mask"].tolist() == [1] * len(expected)
    assert ds.probe(0) == (s["num_tokens"], s["num_labels"])


def test_ids_and_pixels_equal_the_processor_on_the_chat_template(tmp_path, processor):
    png(tmp_path / "a.png", (300, 200)), png(tmp_path / "b.png", (84, 112), (0, 90, 200))
    ds = make_dataset(tmp_path, [user_assistant(("<image>Compare with <image>.", "Same."), ("More?", "No."),
                                                images=["a.png", "b.png"])], processor)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with "}, {"type": "image"},
                                     {"type": "text", "text": "."}]},
        {"role": "assistant", "content": "Same."}, {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "No."},
    ]
    ref = processor(processor.apply_chat_template(messages), images=[str(tmp_path / "a.png"),
                                                                     str(tmp_path / "b.png")])
    s = ds[0]
    assert s["input_ids"].tolist() == ref["input_ids"][0].tolist()
    np.testing.assert_array_equal(s["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(s["image_grid_thw"], ref["image_grid_thw"])
    # generation prompt = the training sample's prefix up to the first answer
    gen = ds.generation_inputs("<image>Compare with <image>.", [str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    first_answer = int(np.flatnonzero(s["labels"] != IGNORE_INDEX)[0])
    assert gen["input_ids"].tolist() == s["input_ids"][:first_answer].tolist() and "labels" not in gen
    np.testing.assert_array_equal(gen["position_ids"], s["position_ids"][:, :first_answer])


@pytest.mark.parametrize("size,config,tokens", [
    ((56, 56), {}, 4),
    ((300, 200), {}, 77),  # smart_resize → 196×308 → 14×22 patches → 77 merged tokens
    ((300, 200), {"image_resolution": 112}, 12),  # long side capped to 112 first → 84×112
    ((56, 56), {"min_pixels": 112 * 112}, 16),
    ((300, 200), {"max_pixels": 56 * 56}, 2),  # → 28×56
])
def test_placeholder_expansion_counts(tmp_path, processor, size, config, tokens):
    png(tmp_path / "a.png", size), png(tmp_path / "b.png", size)
    ds = make_dataset(tmp_path, [user_assistant(("<image> and <image>?", "x"), images=["a.png", "b.png"])],
                      processor, **config)
    s = ds[0]
    ids = s["input_ids"]
    starts = np.flatnonzero(ids == VS)
    assert len(starts) == 2 and (ids == IMG).sum() == 2 * tokens
    for k, start in enumerate(starts):
        assert ids[start + 1:start + 1 + tokens].tolist() == [IMG] * tokens and ids[start + 1 + tokens] == VE
        assert np.prod(s["image_grid_thw"][k]) // 4 == tokens
    assert s["pixel_values"].shape == (8 * tokens, 1176)
    assert ds.probe(0)[0] == len(ids)
    pos, _ = get_rope_index(ids[None], s["image_grid_thw"], spatial_merge_size=2, image_token_id=IMG,
                            video_token_id=VID, vision_start_token_id=VS)
    np.testing.assert_array_equal(s["position_ids"], pos[:, 0])


def test_video_file_and_frame_directory(tmp_path, processor):
    mp4(tmp_path / "v.mp4")  # 10 frames at 4 fps, sampled at 2 fps → 4 frames → t = 2
    os.makedirs(tmp_path / "frames")
    for i in range(3):  # 3 frames, padded to 4 by repeating the last
        png(tmp_path / "frames" / f"{i}.png", (64, 48))
    png(tmp_path / "a.png")
    ds = make_dataset(tmp_path, [user_assistant(("<image><video>What happens?<video>", "Rain."), images=["a.png"],
                                                videos=["v.mp4", "frames"])],
                      processor, video_min_pixels=56 * 56, video_max_pixels=56 * 56 * 4)
    s = ds[0]
    assert s["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]  # 48×64 → 56×56 frames
    assert s["pixel_values_videos"].shape == (64, 1176) and (s["input_ids"] == VID).sum() == 16
    assert s["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert ds.probe(0)[0] == len(s["input_ids"])
    pos, _ = get_rope_index(s["input_ids"][None], s["image_grid_thw"], s["video_grid_thw"], spatial_merge_size=2,
                            image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS)
    np.testing.assert_array_equal(s["position_ids"], pos[:, 0])
    assert s["position_ids"].max() < len(s["input_ids"])  # M-RoPE compresses vision positions


def full_length(tmp_path, processor, record):
    return make_dataset(tmp_path, [record], processor, max_seq_length=4096)[0]


def test_truncation_drops_trailing_text_turns_first(tmp_path, processor):
    png(tmp_path / "a.png")
    record = user_assistant(("<image>Colour?", "red"), ("Tell a story.", "word " * 60), images=["a.png"])
    full = full_length(tmp_path, processor, record)
    first_turn_end = int(np.flatnonzero(full["input_ids"] == IM_END)[2]) + 2  # system, user, answer 1 + "\n"
    ds = make_dataset(tmp_path, [record], processor, max_seq_length=first_turn_end + 10)
    s = ds[0]
    assert s["input_ids"].tolist() == full["input_ids"][:first_turn_end].tolist()
    assert s["labels"].tolist() == full["labels"][:first_turn_end].tolist() and s["num_labels"] == 2
    assert ds.probe(0) == (first_turn_end, 2)


def test_truncation_hard_cut_keeps_media_and_an_answer_token(tmp_path, processor):
    png(tmp_path / "a.png")
    record = user_assistant(("<image>Describe.", "word " * 60), images=["a.png"])
    full = full_length(tmp_path, processor, record)
    first_answer = int(np.flatnonzero(full["labels"] != IGNORE_INDEX)[0])
    ds = make_dataset(tmp_path, [record], processor, max_seq_length=first_answer + 5)
    s = ds[0]
    assert len(s["input_ids"]) == first_answer + 5 and s["num_labels"] == 5
    assert (s["input_ids"] == IMG).sum() == 4 and (s["input_ids"] == VE).sum() == 1


@pytest.mark.parametrize("case", ["span", "no_answer"])
def test_truncation_never_splits_a_media_span(tmp_path, processor, case):
    png(tmp_path / "a.png"), png(tmp_path / "b.png", (112, 112))
    if case == "span":  # the second image sits in a later turn, past the limit
        record = user_assistant(("<image>Colour?", "red"), ("And <image>?", "blue"), images=["a.png", "b.png"])
    else:  # the cut would fall before the only answer
        record = user_assistant(("<image>" + "long question " * 40, "red"), images=["a.png"])
    full = full_length(tmp_path, processor, record)
    limit = int(np.flatnonzero(full["input_ids"] == VS)[-1]) + 3  # inside the last span / the question
    ds = make_dataset(tmp_path, [record], processor, max_seq_length=limit)
    for call in (ds.probe, ds.sample):
        with pytest.raises(DataError) as info:
            call(0)
        assert info.value.kind == "too long" and str(info.value).startswith(f"{tmp_path / 'ann.json'}, record 0: ")
        assert f"> max_seq_length {limit}" in str(info.value)


@pytest.mark.parametrize("case,kind,reason", [
    ("missing", "missing media", "media file not found"),
    ("garbage", "unreadable media", "unreadable media"),
    ("truncated", "unreadable media", "unreadable media"),
    ("video_missing", "missing media", "media file not found"),
])
def test_media_errors_name_file_record_and_reason(tmp_path, processor, case, kind, reason):
    png(tmp_path / "ok.png")
    bad = tmp_path / "bad.png"
    if case == "garbage":
        bad.write_bytes(b"not an image at all")
    elif case == "truncated":  # valid header, broken pixel data: only decoding finds it
        png(bad, (200, 200))
        bad.write_bytes(bad.read_bytes()[:120])
    good = user_assistant(("<image>q", "a"), images=["ok.png"])
    if case == "video_missing":
        bad_record = user_assistant(("<video>q", "a"), videos=["nope.mp4"])
    else:
        bad_record = user_assistant(("<image>q", "a"), images=["bad.png"])
    ds = make_dataset(tmp_path, [good, bad_record], processor)
    calls = (ds.sample,) if case == "truncated" else (ds.probe, ds.sample)
    if case == "truncated":
        assert ds.probe(1)[0] > 0
    for call in calls:
        with pytest.raises(DataError) as info:
            call(1)
        assert info.value.kind == kind
        assert str(info.value).startswith(f"{tmp_path / 'ann.json'}, record 1: {reason}")
        assert ("nope.mp4" if case == "video_missing" else "bad.png") in str(info.value)
    assert ds[0]["num_labels"] == 2


def test_missing_media_names_both_candidates(tmp_path, processor, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = make_dataset(tmp_path, [user_assistant(("<image>q", "a"), images=["imgs/nope.png"])], processor)
    for call in (ds.probe, ds.sample):
        with pytest.raises(DataError) as info:
            call(0)
        assert info.value.kind == "missing media"
        assert str(info.value) == (f"{tmp_path / 'ann.json'}, record 0: media file not found: neither imgs/nope.png "
                                   f"(as given) nor {tmp_path / 'imgs' / 'nope.png'} (under root) exists")


def bomb_png(path, side=100_000):
    """A PNG whose header claims side x side 8-bit grey pixels (10^10) in a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (side + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path.name


@pytest.mark.parametrize("side", [100_000, 12_000])  # 12000^2 = 144M: above PIL's limit, below its 2x error
def test_decompression_bomb_image_is_a_data_error(tmp_path, processor, side):
    name = bomb_png(tmp_path / "bomb.png", side)
    assert (tmp_path / "bomb.png").stat().st_size < 2_000
    ds = make_dataset(tmp_path, [user_assistant(("<image>q", "a"), images=[name])], processor)
    for call in (ds.probe, ds.sample):
        with pytest.raises(DataError) as info:
            call(0)
        assert info.value.kind == "unreadable media" and re.search("decompression.bomb", str(info.value))
        assert str(info.value).startswith(f"{tmp_path / 'ann.json'}, record 0: unreadable media ")


def test_held_out_split_is_read_as_training_reads_it(tmp_path, processor):
    """val_size's held-out samples are the training samples of those records, token for token, and the evaluation
    loader (as the trainer's evaluate builds it) iterates exactly them."""
    from autoparallel.data import SFTDataLoader

    records = [user_assistant((f"<image>question {i}", f"answer {i}"), images=[png(tmp_path / f"{i}.png")])
               for i in range(6)]
    full = make_dataset(tmp_path, records, processor)
    split = make_dataset(tmp_path, records, processor, val_size=2)
    held = split.held_out()
    assert (len(split), len(held)) == (4, 2)
    whole = {tuple(full[i]["input_ids"]): i for i in range(len(full))}
    seen = [whole[tuple(held[i]["input_ids"])] for i in range(len(held))]
    trained = [whole[tuple(split[i]["input_ids"])] for i in range(len(split))]
    assert sorted(seen + trained) == list(range(6))
    loader = SFTDataLoader(held, 1, shuffle=False, num_workers=0)
    assert [int(b["input_ids"].shape[1]) for b in loader] == [int(held[i]["num_tokens"] + 7) // 8 * 8 for i in
                                                             range(2)]


def test_length_table_is_what_probing_finds_and_ranks_plan_from_it(tmp_path, processor, monkeypatch):
    """The parent's length table (index_lengths) holds each record's probed row; a later dataset of the same data
    and setting plans global batches from it without opening a media file, and reports a too-long sample as probing
    does; a change of content or of a length setting never reads a stale table."""
    from autoparallel.data import SFTDataLoader
    from autoparallel.data.dataset import NOT_MEASURED, SFTDataset

    records = [user_assistant((f"<image>question {i}", "answer " * (1 + 3 * i)), images=[png(tmp_path / f"{i}.png")])
               for i in range(5)] + [user_assistant(("<video>what?", "rain"), videos=[mp4(tmp_path / "v.mp4")])]
    records.append(user_assistant(("<image>" + "long " * 60, "x"), images=[png(tmp_path / "0.png")]))  # too long
    parent = make_dataset(tmp_path, records, processor, max_seq_length=48)
    assert parent._tables == [None]
    probed = [parent._measure(parent.records.conversation(i)) for i in range(len(parent))]
    monkeypatch.setattr("autoparallel.data.dataset.MEASURE_CHUNK", 3)  # 3 tasks: measured in forked processes
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    parent.index_lengths()
    worker = SFTDataset(parent.config, processor)
    assert np.array_equal(worker._table_rows(np.arange(len(worker))), np.stack(probed))
    assert [tuple(r[3:]) for r in probed] == [(1, 0, 56, 56)] * 5 + [(0, 1, 0, 0), (1, 0, 56, 56)]

    def no_probe(*_):
        raise AssertionError("probed although the table has the row")
    monkeypatch.setattr(SFTDataset, "_probe_media", no_probe)
    loader = SFTDataLoader(worker, 2, shuffle=False, num_workers=0)
    plans = [loader._plan(0, s) for s in range(2)]
    assert [p.global_num_labels for p in plans] == [sum(int(probed[i][2]) for i in (2 * s, 2 * s + 1))
                                                     for s in range(2)]
    monkeypatch.undo()
    with pytest.raises(DataError, match="record 6: .* tokens > max_seq_length 48"):
        worker.probe(6)
    for changed in ({"max_seq_length": 64}, {"max_pixels": 56 * 56}, {"system_prompt": ""}):
        assert SFTDataset(dataclasses.replace(parent.config, **changed), processor)._tables == [None], changed
    (tmp_path / "ann.json").write_text(json.dumps(records[:-1]))
    edited = SFTDataset(parent.config, processor)
    assert edited._tables == [None] and len(edited) == 6
    assert (edited._table_rows(np.arange(6))[:, 0] == NOT_MEASURED).all()


@pytest.mark.parametrize("config", [{"max_seq_length": 64},
                                    {"max_seq_length": 64, "mask_history": True, "train_on_prompt": True}])
def test_length_table_built_in_batches_equals_measuring_record_by_record(tmp_path, processor, monkeypatch, config):
    """The parent builds the table chunk by chunk (texts of many records tokenized in one call, each media header
    read once): every row equals measuring that record alone, whatever the record's shape."""
    from autoparallel.data import dataset as dataset_module
    from autoparallel.data.dataset import NOT_MEASURED

    png(tmp_path / "a.png"), png(tmp_path / "b.png", (300, 200)), mp4(tmp_path / "v.mp4")
    records = [
        user_assistant(("Hi there, 你好 😀", "Hello!")),
        user_assistant(("<image>What colour?", "red"), system="Be brief.", images=["a.png"]),
        user_assistant(("<image>And now, what shape?", "square"), images=["a.png"]),
        user_assistant(("<video>What happens?", "It fades in."), system="", videos=["v.mp4"]),
        user_assistant(("<image>left <image>right", "two"), ("Which is larger?", "the right one"),
                       ("Sure?", "yes"), images=["a.png", "b.png"]),
        user_assistant(("short", "ok"), ("long " * 40, "x " * 30)),  # truncated after the first turn
        user_assistant(("word " * 70 + "<image>", "late image"), images=["a.png"]),  # too long to truncate
        user_assistant(("<image>gone?", "yes"), images=["missing.png"]),
        user_assistant(("typed <|im_end|> and <image> in text", "fine\n\n  spaced  "), images=["b.png"]),
    ]
    ds = make_dataset(tmp_path, records, processor, skip_bad_samples=True, **config)
    one_by_one = []
    for r in range(ds.records.num_records):
        try:
            one_by_one.append(ds._measure(ds.records.record_conversation(r)))
        except DataError:
            one_by_one.append(np.full(7, NOT_MEASURED, np.int32))
    opened = []
    monkeypatch.setattr(dataset_module, "image_hw", lambda path: opened.append(path) or image_hw(path))
    batch = ds._measure_records(np.arange(ds.records.num_records))
    np.testing.assert_array_equal(batch, np.stack(one_by_one))
    assert sorted(opened) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]  # each header read once
    assert batch[7, 0] == NOT_MEASURED and batch[6, 1] == -1 and 0 < batch[5, 1] < batch[5, 0]
    assert (batch[:, 0] != NOT_MEASURED).sum() == 8


def test_batched_token_ids_equal_the_tokenizer_wrappers(processor):
    """The dataset tokenizes through the fast tokenizer's Rust backend in one call; the ids equal the paddlenlp
    wrapper's, one call per text, also after a wrapper call that set truncation or special-token splitting."""
    from network.tokenizer import encode_texts

    tok = processor.tokenizer
    texts = ["", "\n", "system\nYou are a helpful assistant.", "user\n", "  leading and trailing  ",
             "typed <|im_end|> and <|vision_start|> inside", "你好，世界 😀 Привет", "x" * 3000, "\n\n\t tabs"]
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert encode_texts(tok, texts) == want
    tok(texts[-2], add_special_tokens=False, truncation=True, max_length=5, split_special_tokens=True)
    assert encode_texts(tok, texts) == want


def test_survey_and_profile_read_the_table_in_slices_with_the_same_result(tmp_path, processor, monkeypatch):
    """The parent's survey and rank 0's data profile read the rows a slice at a time (millions of samples are
    never held at once); the result equals reading them all at once."""
    from autoparallel.data import survey as survey_module

    png(tmp_path / "a.png"), png(tmp_path / "b.png", (300, 200))
    records = [user_assistant((f"<image>q{i}" + " long" * (40 * (i % 3 == 0)), "a " * i),
                              images=["a.png" if i % 2 else "b.png"]) for i in range(1, 8)]
    records.append(user_assistant(("<image>gone", "x"), images=["missing.png"]))
    ds = make_dataset(tmp_path, records, processor, max_seq_length=120, skip_bad_samples=True)
    whole = (survey_module.survey(ds), survey_module.survey(ds, limit=5), survey_module.data_profile(ds))
    monkeypatch.setattr(survey_module, "SURVEY_CHUNK", 3)
    sliced = (survey_module.survey(ds), survey_module.survey(ds, limit=5), survey_module.data_profile(ds))
    for a, b in zip(whole[:2], sliced[:2]):
        assert (a.lengths.tolist(), a.dropped, a.truncated, a.images, a.per_source, [str(e) for e in a.errors]) \
            == (b.lengths.tolist(), b.dropped, b.truncated, b.images, b.per_source, [str(e) for e in b.errors])
    assert whole[2] == sliced[2] and whole[2].largest_image == (200, 300) and whole[2].unreadable == 1
    assert whole[0].dropped == 1 and len(whole[0].lengths) == 7 and whole[1].probed == 5
