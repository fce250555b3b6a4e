"""Padding-free packing: packed rows give every real token the logits, the loss and the gradients of the
same samples padded one per row (plain model, tiny preset with images and a video)."""
import numpy as np
import paddle
import pytest
from hf_oracle import Sample, build_batch, tiny_config

from autoparallel.data.collator import collate
from autoparallel.data.packing import PADDING_SEGMENT, collate_packed, first_fit_decreasing
from network.attention import packed_cu_seqlens
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.rope_index import get_rope_index_for_config

SAMPLES = [Sample(5, [("image", (1, 4, 6))], 7), Sample(9, [], 4), Sample(3, [("video", (2, 4, 4))], 5),
           Sample(4, [("image", (1, 4, 4)), ("image", (1, 8, 4))], 6), Sample(6, [], 3)]


def _sample(config, spec: Sample, index: int) -> dict:
    b = build_batch(config, [spec], seed=index)
    positions, _ = get_rope_index_for_config(config, b["input_ids"], b.get("image_grid_thw"),
                                             b.get("video_grid_thw"), b["attention_mask"])
    return dict(input_ids=b["input_ids"][0], labels=b["labels"][0], attention_mask=b["attention_mask"][0],
                position_ids=positions[:, 0], pixel_values=b.get("pixel_values"),
                image_grid_thw=b.get("image_grid_thw"), pixel_values_videos=b.get("pixel_values_videos"),
                video_grid_thw=b.get("video_grid_thw"), index=index)


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    paddle.seed(3)
    model = Qwen2VLForConditionalGeneration(config)
    samples = [_sample(config, s, i) for i, s in enumerate(SAMPLES)]
    return config, model, samples


def _run(model, batch: dict, normalizer: float):
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw", "labels", "segment_ids")
    inputs = {k: paddle.to_tensor(batch[k]) for k in keys if batch.get(k) is not None}
    model.clear_gradients()
    out = model(**inputs, loss_normalizer=normalizer)
    out.loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.numpy(), float(out.loss), grads


def test_packed_rows_equal_unpacked_samples(setup):
    config, model, samples = setup
    lengths = [len(s["input_ids"]) for s in samples]
    rows = first_fit_decreasing(lengths, capacity=max(lengths) + 40, window=len(samples))
    assert len(rows) < len(samples)  # something was packed
    packed = collate_packed([[samples[i] for i in row] for row in rows], pad_token_id=config.pad_token_id)
    padded = collate(samples, pad_token_id=config.pad_token_id)
    # The same supervised tokens: a sample's first label is never a target after the label shift.
    assert packed["num_labels"] - sum(int(s["labels"][0] != -100) for s in samples) == \
        int((padded["labels"][:, 1:] != -100).sum())
    normalizer = float((padded["labels"][:, 1:] != -100).sum())
    logits_p, loss_p, grads_p = _run(model, packed, normalizer)
    logits_u, loss_u, grads_u = _run(model, padded, normalizer)
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    worst = 0.0
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            worst = max(worst, float(np.abs(logits_p[r, start:start + n] - logits_u[i, :n]).max()))
            start += n
    assert worst <= 1e-5, worst
    for name, g in grads_u.items():
        np.testing.assert_allclose(grads_p[name], g, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(g).max()), err_msg=name)


def test_attention_never_crosses_samples(setup):
    """Changing one packed sample's tokens leaves every other sample's logits bit-for-bit unchanged."""
    config, model, samples = setup
    text = [s for s in samples if s["pixel_values"] is None and s["pixel_values_videos"] is None]
    batch = collate_packed([text], pad_token_id=config.pad_token_id)
    changed = {**batch, "input_ids": batch["input_ids"].copy()}
    first = len(text[0]["input_ids"])
    changed["input_ids"][0, :first] = (changed["input_ids"][0, :first] + 1) % 400
    with paddle.no_grad():
        a = model(**{k: paddle.to_tensor(batch[k]) for k in ("input_ids", "position_ids", "segment_ids")}).logits
        b = model(**{k: paddle.to_tensor(changed[k]) for k in ("input_ids", "position_ids", "segment_ids")}).logits
    np.testing.assert_array_equal(a.numpy()[0, first:], b.numpy()[0, first:])
    assert np.abs(a.numpy()[0, :first] - b.numpy()[0, :first]).max() > 0


def test_packed_rows_need_their_positions(setup):
    _, model, samples = setup
    batch = collate_packed([samples[1:2]])
    with pytest.raises(ValueError, match="position_ids"):
        model(paddle.to_tensor(batch["input_ids"]), segment_ids=paddle.to_tensor(batch["segment_ids"]))


def test_first_fit_decreasing_is_deterministic_and_windowed():
    lengths = [700, 300, 200, 900, 100, 500, 30, 1000, 640, 360]
    rows = first_fit_decreasing(lengths, capacity=1024, window=5)
    assert rows == first_fit_decreasing(lengths, capacity=1024, window=5)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert all(max(row) < 5 or min(row) >= 5 for row in rows)  # no row mixes windows
    assert rows[:3] == [[3, 4], [0, 1], [2]]  # 900+100, 700+300, 200 (decreasing, first fit)
    with pytest.raises(ValueError, match="sample 7 has 1000 tokens"):
        first_fit_decreasing(lengths, capacity=999, window=5)


def test_segment_ids_and_varlen_boundaries(setup):
    _, _, samples = setup
    batch = collate_packed([samples[1:3], samples[4:5]], pad_to=64)
    seg = batch["segment_ids"]
    n1, n2, n4 = (len(samples[i]["input_ids"]) for i in (1, 2, 4))
    assert seg[0, :n1].tolist() == [0] * n1 and seg[0, n1:n1 + n2].tolist() == [1] * n2
    assert (seg[0, n1 + n2:] == PADDING_SEGMENT).all() and (seg[1, n4:] == PADDING_SEGMENT).all()
    assert batch["fill"] == pytest.approx((n1 + n2 + n4) / 128)
    cu, longest = packed_cu_seqlens(seg)
    assert cu.tolist() == [0, n1, n1 + n2, 64, 64 + n4, 128]  # padding runs are their own segments
    assert longest == max(n1, n2, 64 - n1 - n2, n4, 64 - n4)


@pytest.fixture(scope="module")
def synthetic_meta(tmp_path_factory):
    from autoparallel.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(str(tmp_path_factory.mktemp("syn")), n_train=46, n_eval=4, seed=1)


def _loaders(meta, packing: bool, world: int = 2, per_device: int = 2, capacity: int = 128):
    from autoparallel.data import DataConfig, SFTDataLoader, SFTDataset
    from network.processor import Qwen2VLProcessor

    dataset = SFTDataset(DataConfig(meta_path=meta, max_seq_length=capacity, packing=packing),
                         Qwen2VLProcessor.from_pretrained(None))
    return [SFTDataLoader(dataset, per_device, world, rank, num_workers=0) for rank in range(world)]


def _supervised(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("world,per_device", [(2, 2), (2, 4), (1, 4)])
def test_packed_loader_packs_each_global_batch_into_rows_shared_by_the_ranks(synthetic_meta, world, per_device):
    packed, plain = _loaders(synthetic_meta, True, world, per_device), _loaders(synthetic_meta, False, world,
                                                                               per_device)
    assert len(packed[0]) == len(plain[0])  # one global batch of samples per step, packed or not
    for step, (rows, padded) in enumerate(zip(zip(*packed), zip(*plain))):
        # the same samples and the same supervised tokens per step; the ranks' batches have one shape
        assert sorted(i for b in rows for i in b["indices"]) == sorted(i for b in padded for i in b["indices"])
        assert sum(map(_supervised, rows)) == sum(map(_supervised, padded))
        assert len({b["input_ids"].shape for b in rows}) == 1
        assert rows[0]["input_ids"].shape[0] <= per_device and rows[0]["input_ids"].shape[1] <= 128
        real = sum(b["num_tokens"] for b in rows)
        assert real == sum(b["num_tokens"] for b in padded)
        assert all(b["fill"] == pytest.approx(real / sum(b["input_ids"].size for b in rows)) for b in rows)
        for b in rows:
            assert ((b["segment_ids"] >= 0) == (b["attention_mask"] == 1)).all()
            grids = [np.asarray(g) for g in (b["image_grid_thw"],) if g is not None]
            patches = sum(int(np.prod(g, 1).sum()) for g in grids)
            assert (b["pixel_values"] is None and patches == 0) or b["pixel_values"].shape[0] == patches
        if step == 3:
            break


def test_packed_loader_resumes_with_the_next_batch(synthetic_meta):
    from autoparallel.data import SFTDataLoader

    reference = _loaders(synthetic_meta, True)[1]
    for _, _ in zip(range(3), reference):
        pass
    state = reference.state_dict()
    expected = next(iter(reference))
    resumed = SFTDataLoader(reference.dataset, 2, 2, 1, num_workers=0)
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert got["indices"] == expected["indices"] and got["fill"] == expected["fill"]
    for key in ("input_ids", "labels", "position_ids", "segment_ids", "pixel_values"):
        np.testing.assert_array_equal(got[key], expected[key])


def test_a_rank_without_a_packed_row_gets_padding_rows_only():
    from autoparallel.data.packing import PADDING_SEGMENT, collate_packed

    batch = collate_packed([], pad_to=16, num_rows=2)
    assert batch["input_ids"].shape == (2, 16) and batch["num_tokens"] == batch["num_labels"] == 0
    assert (batch["segment_ids"] == PADDING_SEGMENT).all() and batch["indices"] == [] and batch["fill"] == 0
    assert batch["pixel_values"] is None and batch["position_ids"].shape == (3, 2, 16)


def test_per_sample_attention_equals_the_masked_row():
    """The CPU path of packed text rows (each sample's own causal attention on its slice) gives the outputs and
    gradients of whole-row attention under the causal segment mask; GQA (4 query heads on 2 kv heads), rows of
    several samples, a padding run."""
    from network import attention as attn

    rng = np.random.default_rng(3)
    segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 2, PADDING_SEGMENT, PADDING_SEGMENT],
                            [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]])
    inputs = [rng.standard_normal([2, 10, heads, 8]).astype("float32") for heads in (4, 2, 2)]
    weights = paddle.to_tensor(rng.standard_normal([2, 10, 4, 8]).astype("float32"))  # a loss that reads every output
    results = []
    for path in ("per_sample", "masked"):
        q, k, v = (paddle.to_tensor(x, stop_gradient=False) for x in inputs)
        ids = paddle.to_tensor(segment_ids)
        if path == "per_sample":
            out = attn.attention(q, k, v, causal=True, packed=attn.PackedRows(ids))
        else:
            out = attn._math_attention(q, k, v, True, None, ids)
        (out * weights).sum().backward()
        results.append([out.numpy(), q.grad.numpy(), k.grad.numpy(), v.grad.numpy()])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
