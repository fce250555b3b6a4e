"""Generation-based evaluation of a dataset the trainer reads: each record's last assistant turn is the reference,
the conversation before it (system, earlier turns, media) the prompt, rendered exactly as in training.

`qwen2vl-ap eval` (launch/evaluate.py) runs it on one model per data-parallel rank; the prompts go in
left-padded batches of `batch_size` in record order, and a rank takes every `world`-th batch, so the batches (and
so the predictions) are the same on any number of ranks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from autoparallel.data.dataset import SFTDataset
from autoparallel.data.records import Conversation
from autoparallel.engine.eval_metrics import Reference, aggregate, score_sample
from network.generation import GenerationConfig, generate, left_pad_prompts
from network.processor import Qwen2VLProcessor

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def stop_token_ids(processor: Qwen2VLProcessor, model_config, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
    """`<|im_end|>` (end of an assistant turn), the tokenizer's eos, the model config's eos and `extra` (the eos
    ids of the checkpoint's generation_config.json)."""
    ids = {processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), processor.eos_token_id,
           model_config.eos_token_id, *extra}
    return tuple(sorted(i for i in ids if i is not None))


class TensorParallelModel:
    """A model parallelized with a plan (infer's mp plan, or a training layout), called like the plain one; logits
    (vocab-split over "mp") come back dense and replicated, which is what `generate` reads on every rank."""

    def __init__(self, model: Any):
        self.model = model
        self.config = model.config

    def __call__(self, *args, **kwargs):
        import paddle.distributed as dist

        out = self.model(*args, **kwargs)
        logits = out.logits
        if logits.is_dist():
            replicated = [dist.Replicate()] * len(logits.process_mesh.shape)
            logits = dist.reshard(logits, logits.process_mesh, replicated)._local_value()
        out.__dict__["logits"] = logits  # `Qwen2VLOutput.logits` is a cached_property: this is its cache slot
        return out


@dataclass
class EvalRecord:
    id: int  # the sample index in the dataset (repeat_time applied)
    source: str  # the meta file's dataset name
    prompt: str  # the last user turn, placeholders kept
    reference: str  # the last assistant turn
    conversation: Conversation  # the record with its last answer removed: what the model answers


def eval_records(dataset: SFTDataset, max_samples: int | None = None) -> list[EvalRecord]:
    """The first `max_samples` (all when None) samples of `dataset` as prompts with their references."""
    names = {os.path.abspath(s.annotation): s.name for s in dataset.records.sources}
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    out = []
    for i in range(count):
        conv = dataset.records.conversation(i)
        question, answer = conv.turns[-1]
        prompt = dataclasses.replace(conv, turns=conv.turns[:-1] + ((question, None),))
        out.append(EvalRecord(i, names.get(os.path.abspath(conv.file), conv.file), question, answer, prompt))
    return out


def record_batches(num_records: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """This rank's batches: every `world`-th of the record-order batches of `batch_size`."""
    batches = [range(s, min(s + batch_size, num_records)) for s in range(0, num_records, batch_size)]
    return batches[rank::world]


def predict_batch(model: Any, dataset: SFTDataset, conversations: Sequence[Conversation],
                  generation_config: GenerationConfig) -> list[str]:
    """One left-padded batch through `generate`; answers decoded without special tokens."""
    prompts, seconds_per_grid = [], []
    for conv in conversations:
        inputs = dataset.prompt_inputs(conv)
        prompt = {"input_ids": inputs["input_ids"][None], "attention_mask": inputs["attention_mask"][None]}
        prompt.update({k: inputs[k] for k in _MEDIA_KEYS if k in inputs})
        prompts.append(prompt)
        if "second_per_grid_ts" in inputs:
            seconds_per_grid.append(np.asarray(inputs["second_per_grid_ts"]))
    processor = dataset.processor
    batch = left_pad_prompts(prompts, processor.pad_token_id)
    out = generate(model, **batch, second_per_grid_ts=np.concatenate(seconds_per_grid) if seconds_per_grid else None,
                   generation_config=generation_config)
    return [processor.decode(out.sequences[i, : out.num_tokens[i]], skip_special_tokens=True)
            for i in range(len(conversations))]


def predict(model: Any, dataset: SFTDataset, records: Sequence[EvalRecord], generation_config: GenerationConfig,
            batch_size: int, rank: int = 0, world: int = 1, progress: bool = False) -> dict[int, str]:
    """Predictions of this rank's share of `records` (see `record_batches`), by position in `records`."""
    from tqdm import tqdm

    batches = record_batches(len(records), batch_size, rank, world)
    bar = tqdm(total=sum(len(b) for b in batches), desc="eval", unit="sample", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    out: dict[int, str] = {}
    with bar:
        for batch in batches:
            answers = predict_batch(model, dataset, [records[i].conversation for i in batch], generation_config)
            out.update(zip(batch, answers))
            bar.update(len(batch))
    return out


def score_rows(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Add per-sample `scores` to each row ({"prediction", "reference", optional "source"}) and return
    `metrics.json`: metric name -> value, plus "per_source" (the same per dataset) when rows name several."""
    for row in rows:
        row["scores"] = score_sample(row["prediction"], row["reference"], names)
    metrics: dict[str, Any] = _aggregate(rows, names)
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_source[row.get("source")].append(row)
    if len(by_source) > 1:
        metrics["per_source"] = {str(src): _aggregate(part, names) for src, part in by_source.items()}
    return metrics


def _aggregate(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    predictions = [r["prediction"] for r in rows]
    references: list[Reference] = [r["reference"] for r in rows]
    return aggregate(predictions, references, [r["scores"] for r in rows], names)


def prediction_rows(records: Sequence[EvalRecord], predictions: dict[int, str]) -> list[dict[str, Any]]:
    """`predictions.jsonl` rows in record order (before scoring)."""
    return [{"id": r.id, "source": r.source, "prompt": r.prompt, "prediction": predictions[i],
             "reference": r.reference} for i, r in enumerate(records)]


def write_results(output_dir: str, rows: Iterable[dict[str, Any]], metrics: dict[str, Any]) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, PREDICTIONS_FILE), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(output_dir, METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
