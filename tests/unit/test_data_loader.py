"""Global batches: dp disjointness, shared padded length, resumption, bad-sample replacement, workers."""
import json

import numpy as np
import pytest
from PIL import Image

from autoparallel.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    SFTDataLoader,
    SFTDataset,
    collate,
    padded_length,
)
from autoparallel.data.synthetic import make_synthetic_dataset
from network.processor import Qwen2VLProcessor


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLProcessor.from_pretrained(None)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, processor):
    meta = make_synthetic_dataset(str(tmp_path_factory.mktemp("syn")), n_train=46, n_eval=4, seed=1)
    return SFTDataset(DataConfig(meta_path=meta, max_seq_length=128), processor)


def loaders(dataset, world=2, batch=2, **kw):
    return [SFTDataLoader(dataset, batch, world, rank, num_workers=0, **kw) for rank in range(world)]


def test_dp_ranks_cover_an_epoch_disjointly_and_share_padded_shapes(synthetic):
    ranks = loaders(synthetic)  # g = 4, 46 samples → 11 steps, 2 dropped
    assert len(ranks[0]) == 11
    seen = [[], []]
    for b0, b1 in zip(*ranks):
        assert b0["input_ids"].shape == b1["input_ids"].shape and b0["input_ids"].shape[1] % 8 == 0
        lengths = [synthetic.probe(i)[0] for i in b0["indices"] + b1["indices"]]
        assert b0["input_ids"].shape[1] == padded_length(lengths) < 128
        assert b0["global_num_labels"] == b1["global_num_labels"] == b0["num_labels"] + b1["num_labels"]
        grids = np.concatenate([synthetic[i]["image_grid_thw"] for i in b1["indices"]])
        np.testing.assert_array_equal(b1["image_grid_thw"], grids)  # media concatenated in sample order
        assert b1["pixel_values"].shape == (int(np.prod(grids, 1).sum()), 1176)
        seen[0] += b0["indices"]
        seen[1] += b1["indices"]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == len(seen[0] + seen[1]) == 44
    epoch1 = [b["indices"] for b in ranks[0]]  # next epoch: another permutation
    assert ranks[0].state_dict()["epoch"] == 2 and epoch1 != [seen[0][i:i + 2] for i in range(0, 22, 2)]


def test_unshuffled_epoch_visits_samples_in_order(synthetic):
    ranks = loaders(synthetic, shuffle=False)
    assert [b["indices"] for b in ranks[1]][:2] == [[2, 3], [6, 7]]


def take(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("n", [3, 11, 14])  # mid-epoch, exactly an epoch, into the second epoch
def test_resume_and_fast_forward_continue_with_the_next_batch(synthetic, n):
    reference = SFTDataLoader(synthetic, 2, 2, 1, num_workers=0)
    first = take(reference, n)
    state = reference.state_dict()
    expected = take(reference, 3)
    resumed = SFTDataLoader(synthetic, 2, 2, 1, num_workers=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    forwarded = SFTDataLoader(synthetic, 2, 2, 1, num_workers=0)
    forwarded.fast_forward(n)
    assert forwarded.state_dict() == resumed.state_dict() or n == 11  # 11: (0, 11) ≡ (1, 0)
    for loader in (resumed, forwarded):
        for got, want in zip(take(loader, 3), expected):
            assert got["indices"] == want["indices"]
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
            np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
    assert len(first) == n


def test_collate_padding_conventions_and_text_only_batches():
    a = {"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 6, 7]), "attention_mask": np.ones(3, np.int64),
         "position_ids": np.tile(np.arange(3), (3, 1)), "index": 0}
    b = {**a, "input_ids": np.array([9]), "labels": np.array([9]), "attention_mask": np.ones(1, np.int64),
         "position_ids": np.zeros((3, 1), np.int64), "index": 1}
    batch = collate([a, b], pad_to=16)
    assert batch["input_ids"].shape == (2, 16) and batch["position_ids"].shape == (3, 2, 16)
    assert batch["input_ids"][1].tolist() == [9] + [151643] * 15
    assert batch["labels"][1].tolist() == [9] + [IGNORE_INDEX] * 15
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 13
    assert (batch["position_ids"][:, 0, 3:] == 1).all() and batch["position_ids"][:, 0, :3].tolist() == [[0, 1, 2]] * 3
    assert batch["pixel_values"] is None and batch["video_grid_thw"] is None
    assert (batch["num_tokens"], batch["num_labels"], batch["indices"]) == (4, 3, [0, 1])
    assert collate([a])["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="pad_to=2"):
        collate([a], pad_to=2)


def write_mixed(tmp_path, processor, skip):
    """12 records, of which 3 are bad in different ways; returns the dataset."""
    Image.new("RGB", (56, 56), (10, 200, 10)).save(tmp_path / "ok.png")
    Image.new("RGB", (200, 200), (10, 200, 10)).save(tmp_path / "trunc.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "trunc.png").read_bytes()[:120])  # header only
    good = lambda i: {"messages": [{"role": "user", "content": f"<image>q{i}"},  # noqa: E731
                                   {"role": "assistant", "content": "a"}], "images": ["ok.png"]}
    records = [good(i) for i in range(12)]
    records[2]["images"] = ["missing.png"]
    records[5]["messages"][0]["content"] = "<image>" + "very long " * 100  # too long, cannot truncate
    records[7]["images"] = ["trunc.png"]  # found only when decoding
    (tmp_path / "ann.json").write_text(json.dumps(records))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "ann.json", "root": "."}}))
    config = DataConfig(meta_path=str(tmp_path / "meta.json"), max_seq_length=96, skip_bad_samples=skip)
    return SFTDataset(config, processor)


def test_bad_samples_raise_without_skip_mode(tmp_path, processor):
    (loader,) = loaders(write_mixed(tmp_path, processor, skip=False), world=1, batch=12, shuffle=False)
    with pytest.raises(DataError, match=r"ann\.json, record 2: media file not found: .*missing\.png"):
        next(iter(loader))


def test_too_long_samples_are_dropped_and_counted_even_without_skip_mode(tmp_path, processor):
    dataset = write_mixed(tmp_path, processor, skip=False)
    (loader,) = loaders(dataset, world=1, batch=3, shuffle=False)
    loader.fast_forward(1)  # batch [3, 4, 5]: 5 is too long
    assert next(iter(loader))["indices"] == [3, 4, 6]
    assert loader.skipped_report()["by_kind"] == {"too long": 1}


def test_skip_mode_replaces_bad_samples_deterministically_and_counts_them(tmp_path, processor):
    dataset = write_mixed(tmp_path, processor, skip=True)
    # g = 6: global batches [0..5], [6..11]; first each rank with its own dataset (as in separate processes)
    ranks = [SFTDataLoader(write_mixed(tmp_path, processor, True), 3, 2, r, num_workers=0, shuffle=False)
             for r in range(2)]
    epoch = [list(zip(*ranks)), list(zip(*loaders(dataset, world=2, batch=3, shuffle=False)))]
    for run in epoch:
        (a0, a1), (b0, b1) = run
        # Probe failures (2: missing, 5: too long) are replaced on every rank by the next valid sample after them
        # that is not in the global batch: 2 → 6, 5 → 7. Sample 7 only fails when decoded, so the rank holding it
        # replaces it alone: step 0 rank 1: 7 → 8; step 1 rank 0: 7 → (wrapping around) 0.
        assert a0["indices"] == [0, 1, 6] and a1["indices"] == [3, 4, 8]
        assert b0["indices"] == [6, 0, 8] and b1["indices"] == [9, 10, 11]
        assert a0["input_ids"].shape == a1["input_ids"].shape and len(a0["indices"]) == 3
    for rank in ranks:  # probe failures are seen by every rank, the decode failure by each rank decoding it
        report = rank.skipped_report()
        assert report["by_kind"] == {"missing media": 1, "too long": 1, "unreadable media": 1}
        assert report["total"] == 3 and any("record 7" in m for m in report["examples"]["unreadable media"])
    list(ranks[0])  # a second epoch counts nothing new
    assert ranks[0].skipped_report()["total"] == 3


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_background_workers_match_in_process_decoding(synthetic, worker_type):
    reference = take(SFTDataLoader(synthetic, 2, 2, 0, num_workers=0), 4)
    loader = SFTDataLoader(synthetic, 2, 2, 0, num_workers=2, worker_type=worker_type)
    try:
        for got, want in zip(take(loader, 4), reference):
            assert got["indices"] == want["indices"]
            for key in ("input_ids", "labels", "position_ids", "pixel_values", "image_grid_thw"):
                np.testing.assert_array_equal(got[key], want[key])
        assert loader.state_dict()["step"] == 4  # prefetched batches are not counted as consumed
    finally:
        loader.close()


def test_a_loader_whose_constructor_failed_is_collected_silently(synthetic, monkeypatch):
    import gc
    import sys

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SFTDataLoader(synthetic, 64, 2, 0, num_workers=0)  # fails before any executor exists
    gc.collect()
    assert unraisable == []  # no "AttributeError: _executor" from __del__
