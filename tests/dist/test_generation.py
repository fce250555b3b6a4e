"""Generation: greedy tokens equal HF transformers 4.55 `generate`, KV-cache decoding equals full recomputation,
per-row stopping, sampling settings, and tensor-parallel (mp2) decoding equal to one process."""
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
from dist_utils import run_workers
from hf_oracle import Sample, build_batch, hf_model, tiny_config
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import network.generation as generation
from network.generation import GenerationConfig, RunningBatch, _process_logits, _select, generate, left_pad_prompts
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
NEW_TOKENS = 24
LOGITS_TOL = 1e-4
SINGLE = {
    "one_image": Sample(4, [("image", (1, 4, 6))], 0),
    "two_images": Sample(3, [("image", (1, 4, 6)), ("image", (1, 8, 4))], 0),
    "video": Sample(3, [("video", (2, 4, 4))], 0),
}
# Different lengths (left padding 0 / 6 / 1 tokens): image, text-only and video rows.
BATCH = [Sample(5, [("image", (1, 4, 6))], 0), Sample(9, [], 0), Sample(2, [("video", (2, 4, 4))], 0)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = tiny_config(tied=False)
    hf = hf_model(config, seed=1)
    path = tmp_path_factory.mktemp("tiny_hf")
    hf.save_pretrained(str(path))
    return config, hf, Qwen2VLForConditionalGeneration.from_pretrained(str(path)), path


def _prompt(config, sample, seed) -> dict:
    batch = build_batch(config, [sample], seed=seed)
    batch.pop("labels")
    return batch


def _left_pad(config, prompts: list[dict]) -> dict:
    """Rows of single-prompt batches, left-padded into one batch (media concatenated in row order)."""
    return left_pad_prompts(prompts, config.pad_token_id)


def _hf_generate(hf, batch: dict, **kwargs) -> np.ndarray:
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs}
    with torch.no_grad():
        out = hf.generate(**inputs, pad_token_id=hf.config.pad_token_id, **kwargs)
    return out[:, batch["input_ids"].shape[1]:].numpy()


def _greedy(**kwargs) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_greedy_matches_hf(models, case):
    config, hf, ours, _ = models
    batch = _prompt(config, SINGLE[case], seed=sorted(SINGLE).index(case))
    expected = _hf_generate(hf, batch)
    out = generate(ours, **batch, generation_config=_greedy())
    steps = out.sequences.shape[1] - 1
    print(f"[generate] {case}: {out.sequences.shape[1]} tokens ({len(np.unique(out.sequences))} distinct), "
          f"equal to HF: {np.array_equal(out.sequences, expected)}, "
          f"decode {steps / out.decode_seconds:.1f} tokens/s")
    assert out.sequences.shape == (1, NEW_TOKENS)
    np.testing.assert_array_equal(out.sequences, expected)


def _batch_prompts(config) -> list[dict]:
    return [_prompt(config, s, seed=10 + i) for i, s in enumerate(BATCH)]


def test_left_padded_batch_matches_each_prompt_alone(models, monkeypatch):
    """Left-padded batch == HF generating each prompt alone. HF 4.55's own batched generate differs on padded
    rows only, by its decode positions (rope_deltas + non-padding count): with that formula swapped in, we
    reproduce its batched tokens exactly."""
    config, hf, ours, _ = models
    prompts = _batch_prompts(config)
    batch = _left_pad(config, prompts)
    padding = (batch["attention_mask"] == 0).sum(axis=1)
    assert len(set(padding)) == 3, padding
    alone = np.concatenate([_hf_generate(hf, p) for p in prompts])
    out = generate(ours, **batch, generation_config=_greedy())
    steps = out.sequences.shape[1] - 1
    np.testing.assert_array_equal(out.sequences, alone)

    hf_batched = _hf_generate(hf, batch)
    same_as_alone = [bool(np.array_equal(hf_batched[i], alone[i])) for i in range(3)]
    monkeypatch.setattr(generation, "decode_position_ids", lambda mask, deltas: np.broadcast_to(
        mask.sum(axis=1, keepdims=True) - 1 + deltas, (3, mask.shape[0], 1)).copy())
    hf_positions = generate(ours, **batch, generation_config=_greedy()).sequences
    print(f"[generate] batch of 3, left padding {padding.tolist()}: equal to HF per prompt: True; "
          f"HF batched == HF alone per row: {same_as_alone}; with HF 4.55 decode positions equal to HF batched: "
          f"{np.array_equal(hf_positions, hf_batched)}; decode {3 * steps / out.decode_seconds:.1f} tokens/s")
    np.testing.assert_array_equal(hf_positions, hf_batched)
    assert same_as_alone[int(np.argmin(padding))]


class _Recorder:
    """Calls the model like `generate` does and keeps the last-position logits of every call."""

    def __init__(self, model):
        self.model, self.config, self.logits = model, model.config, []

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.logits.append(out.logits[:, -1].numpy())
        return out


def test_kv_cache_matches_full_recomputation(models):
    config, _, ours, _ = models
    batch = _left_pad(config, _batch_prompts(config))
    recorder = _Recorder(ours)
    out = generate(recorder, **batch, generation_config=_greedy())
    assert len(recorder.logits) == NEW_TOKENS
    worst = []
    with paddle.no_grad():
        for step, cached in enumerate(recorder.logits):
            ids = np.concatenate([batch["input_ids"], out.sequences[:, :step]], axis=1)
            mask = np.concatenate([batch["attention_mask"], np.ones_like(out.sequences[:, :step])], axis=1)
            full = ours(**{**batch, "input_ids": ids, "attention_mask": mask}).logits[:, -1].numpy()
            worst.append(float(np.abs(full - cached).max()))
    print(f"[generate] KV cache vs full recomputation, {NEW_TOKENS} steps x 3 rows: max|dlogits|={max(worst):.2e} "
          f"(logit scale {np.abs(recorder.logits[0]).max():.1f})")
    assert max(worst) <= LOGITS_TOL


def test_stop_tokens_end_rows_independently(models):
    config, _, ours, _ = models
    batch = _left_pad(config, _batch_prompts(config))
    free = generate(ours, **batch, generation_config=GenerationConfig(max_new_tokens=NEW_TOKENS)).sequences
    # A token of row 0's first steps that the most rows produce: rows stop at different steps (or never).
    stop = int(max(free[0, :6], key=lambda t: ((free == t).any(axis=1).sum(), -np.argmax(free[0] == t))))
    out = generate(ours, **batch, generation_config=GenerationConfig(
        max_new_tokens=NEW_TOKENS, stop_token_ids=(config.eos_token_id, stop)))
    for row in range(3):
        hits = np.flatnonzero(np.isin(free[row], [config.eos_token_id, stop]))
        n = int(hits[0]) + 1 if hits.size else free.shape[1]
        assert out.num_tokens[row] == n
        np.testing.assert_array_equal(out.sequences[row, :n], free[row, :n])
        assert (out.sequences[row, n:] == config.pad_token_id).all()
    assert out.sequences.shape[1] == out.num_tokens.max()
    print(f"[generate] stop token {stop}: tokens per row {out.num_tokens.tolist()} (of {NEW_TOKENS})")


def test_streamer_stops_rows_and_the_others_continue_unchanged(models):
    """Rows the streamer stops leave the batch (their cache rows are dropped); the rest decode exactly as before."""
    config, _, ours, _ = models
    batch = _left_pad(config, _batch_prompts(config))
    free = generate(ours, **batch, generation_config=_greedy()).sequences
    stop_at = {1: 3, 0: 7}  # row -> its last step
    seen_steps = []

    def streamer(tokens):
        seen_steps.append(tokens.copy())
        step = len(seen_steps) - 1
        return np.array([stop_at.get(row) == step for row in range(len(tokens))])

    out = generate(ours, **batch, generation_config=_greedy(), streamer=streamer)
    assert out.num_tokens.tolist() == [8, 4, NEW_TOKENS]
    np.testing.assert_array_equal(out.sequences[2], free[2])
    for row, last in stop_at.items():
        np.testing.assert_array_equal(out.sequences[row, : last + 1], free[row, : last + 1])
        assert (out.sequences[row, last + 1:] == config.pad_token_id).all()
    assert (np.stack(seen_steps) == out.sequences.T).all()


def test_h4_rows_joining_a_running_batch_generate_as_alone(models):
    """H4 (security review 2), continuous batching: an image row starts; a short text row joins after 2 steps
    (it is left-padded to the running cache); the first row leaves after 6 tokens (the columns only it read are
    dropped); a long image row joins later (the running cache is left-padded to its length). Every row's greedy
    tokens equal the row generated alone; budgets and min_new_tokens follow each row's own step count."""
    config, _, ours, _ = models
    prompts = [_prompt(config, s, seed=20 + i) for i, s in enumerate(
        [Sample(9, [("image", (1, 4, 6))], 0), Sample(2, [], 0), Sample(30, [("image", (1, 8, 8))], 0)])]
    budgets, joins_at = [6, NEW_TOKENS, 12], {2: 1, 8: 2}
    alone = [generate(ours, **p, generation_config=_greedy()).sequences[0, :n] for p, n in zip(prompts, budgets)]
    running = RunningBatch(ours, _greedy())
    got: list[list[int]] = [[] for _ in prompts]
    rows = [0]  # request index of each running row
    got[0] = running.join(**prompts[0], max_new_tokens=budgets[0]).tolist()
    widths = {}
    for step in range(40):
        if step in joins_at:
            i = joins_at[step]
            assert (prompts[i]["input_ids"].shape[1] < running.mask.shape[1]) == (i == 1)
            got[i].extend(running.join(**prompts[i], max_new_tokens=budgets[i]).tolist())
            rows.append(i)
        done = running.finished()
        running.keep(~done)
        rows = [r for r, d in zip(rows, done) if not d]
        widths[step] = (running.mask.shape[1], list(rows), len(got[1]))
        if not rows:
            break
        for r, t in zip(rows, running.step()):
            got[r].append(int(t))
    for i in range(3):
        np.testing.assert_array_equal(np.array(got[i]), alone[i], err_msg=f"request {i}")
    # Right after request 0 left, the cache holds only request 1's prompt and the tokens it has fed back.
    width, rows_then, tokens_1 = widths[5]
    assert rows_then == [1] and width == prompts[1]["input_ids"].shape[1] + tokens_1 - 1, widths


def test_repetition_penalty_matches_hf(models):
    config, hf, ours, _ = models
    batch = _prompt(config, SINGLE["one_image"], seed=0)
    expected = _hf_generate(hf, batch, repetition_penalty=1.8)
    out = generate(ours, **batch, generation_config=_greedy(repetition_penalty=1.8))
    plain = generate(ours, **batch, generation_config=_greedy()).sequences
    assert not np.array_equal(out.sequences, plain)  # the penalty changes something here
    np.testing.assert_array_equal(out.sequences, expected)


def test_sampling_filters_match_hf_warpers():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 300)).astype(np.float32) * 3
    seen, stop = np.zeros(logits.shape, bool), np.array([0])
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.3, 0, 0.8), (0.5, 50, 0.9), (1.0, 1, 0.5)]:
        cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        scores = torch.from_numpy(logits)
        for warper in [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + (
                [TopPLogitsWarper(top_p)] if top_p < 1 else []):
            scores = warper(None, scores)
        expected = scores.numpy()
        got = _process_logits(logits, cfg, seen, 0, stop)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
        np.testing.assert_allclose(got[~np.isinf(got)], expected[~np.isinf(expected)], rtol=1e-6)


def test_sampler_follows_the_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(np.tile(probs, (20000, 1)))
    draws = _select(logits, GenerationConfig(temperature=1.0), np.random.default_rng(0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_sampling_is_seeded(models):
    config, _, ours, _ = models
    batch = _left_pad(config, _batch_prompts(config))

    def sample(seed, **kw):
        cfg = GenerationConfig(max_new_tokens=12, min_new_tokens=12, temperature=1.5, seed=seed, **kw)
        return generate(ours, **batch, generation_config=cfg).sequences

    np.testing.assert_array_equal(sample(7), sample(7))
    assert not np.array_equal(sample(7), sample(8))
    greedy = generate(ours, **batch, generation_config=GenerationConfig(max_new_tokens=12, min_new_tokens=12))
    np.testing.assert_array_equal(sample(3, top_k=1), greedy.sequences)


def test_bad_settings_are_errors(models):
    config, _, ours, _ = models
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    batch = build_batch(config, [Sample(3, [], 0), Sample(6, [], 0)], "right")
    with pytest.raises(ValueError, match="left padding"):
        generate(ours, batch["input_ids"], batch["attention_mask"])


def test_tensor_parallel_matches_single_process(models, tmp_path):
    """mp2 (the training plan: q/k/v/gate/up column-split, o/down row-split, vocab-parallel embedding and head);
    also a row joining a running batch on the sharded KV caches (H4)."""
    config, _, ours, path = models
    cases = {name: _prompt(config, s, seed=sorted(SINGLE).index(name)) for name, s in SINGLE.items()}
    cases["batch"] = _left_pad(config, _batch_prompts(config))
    np.savez(tmp_path / "inputs.npz", **{f"{name}.{k}": v for name, b in cases.items() for k, v in b.items()})
    result = run_workers(HELPERS / "generation_worker.py", 2, tmp_path / "mp2",
                         ["--model", str(path), "--inputs", str(tmp_path / "inputs.npz"),
                          "--new_tokens", str(NEW_TOKENS)], timeout=300)
    assert result.returncode == 0 and set(result.results) == {0, 1}, result.logs()
    for name, batch in cases.items():
        single = generate(ours, **batch, generation_config=_greedy()).sequences
        for rank in (0, 1):
            np.testing.assert_array_equal(np.asarray(result.results[rank][name]), single, err_msg=f"{name} rank {rank}")
            if name in result.results[rank]["joined"]:  # H4: joined a running batch on mp2, tokens as alone
                np.testing.assert_array_equal(np.asarray(result.results[rank]["joined"][name]), single[0],
                                              err_msg=f"{name} joined, rank {rank}")
    speed = result.results[0]["tokens_per_second"]
    print(f"[generate] mp2 == single process for {sorted(cases)} ({NEW_TOKENS} tokens each), "
          f"mp2 decode {speed:.1f} tokens/s (batch case)")
