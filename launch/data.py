"""`qwen2vl-ap data`: validate and preview a dataset exactly as training reads it, without starting workers.

    qwen2vl-ap data --meta_path M | --dataset A,B [--dataset_dir D] [--config FILE|PRESET] [--key value ...]
                    [--show N] [--probe N]

Same data options as `sft` (the run config's data keys, formats, loss masks, max_seq_length, pixel limits). Prints
samples per source, token lengths before truncation (histogram), media per sample, samples over max_seq_length,
warnings, and the first N samples (`--show`, default 2) rendered with the chat template — system prompt included,
image/video spans collapsed, supervised tokens between «». `--probe N` bounds how many evenly spaced samples are
tokenised for the statistics (default 20000; all: 0, which also writes the length table training reads; an existing
table is read whatever N is). Exit code 2 when the data would not train.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from autoparallel.config import ConfigError
from autoparallel.data.dataset import IGNORE_INDEX, SFTDataset
from autoparallel.data.records import DataError, RecordStore
from autoparallel.data.survey import Survey, survey
from autoparallel.engine.trainer import build_processor_for
from launch.config import load_run_config, parse_overrides
from launch.launcher import split_launch_options

DEFAULT_SHOW = 2
DEFAULT_PROBE = 20000


def _histogram(values: np.ndarray, bins: int = 8) -> list[str]:
    if not len(values):
        return ["  (no valid sample)"]
    counts, edges = np.histogram(values, bins=min(bins, len(np.unique(values))) or 1)
    width = max(counts)
    return [f"  {int(lo):>7}-{int(hi):<7} {n:>8}  {'#' * max(1 if n else 0, int(30 * n / width))}"
            for n, lo, hi in zip(counts, edges[:-1], edges[1:])]


def render_sample(dataset: SFTDataset, i: int) -> str:
    """Sample i as text: vision spans collapsed to `<|image_pad|>x N`, supervised runs between « and »."""
    ids, labels = dataset.tokens(i)
    tok = dataset.processor.tokenizer
    pads = {dataset.ids["<|image_pad|>"]: "<|image_pad|>", dataset.ids["<|video_pad|>"]: "<|video_pad|>"}
    out: list[str] = []
    start = 0
    while start < len(ids):  # runs of equal (supervised, pad kind)
        key = (labels[start] != IGNORE_INDEX, pads.get(int(ids[start])))
        end = start
        while end < len(ids) and (labels[end] != IGNORE_INDEX, pads.get(int(ids[end]))) == key:
            end += 1
        text = f"{key[1]}x{end - start}" if key[1] else tok.decode([int(t) for t in ids[start:end]])
        out.append(f"«{text}»" if key[0] else text)
        start = end
    return "".join(out)


def report(store: RecordStore, dataset: SFTDataset, found: Survey, show: int) -> list[str]:
    per_source = store.samples_per_source()
    lines = [f"data: {store.meta_path}: {len(store)} samples from {store.num_records} valid records "
             "(repeat_time applied)" + (f"; {len(store.held_out_ids)} records held out for evaluation (val_size)"
                                        if len(store.held_out_ids) else ""), "sources:"]
    for source in store.sources:
        lines.append(f"  {source.name:<20} {per_source[source.annotation]:>9} samples  {source.annotation}"
                     + (f"  (format {source.format.formatting})" if source.format.formatting != "auto" else ""))
    probed = f"all {found.probed}" if found.probed == found.total else f"{found.probed} evenly spaced"
    lines.append(f"token lengths before truncation ({probed} samples probed):")
    if len(found.lengths):
        q = np.percentile(found.lengths, [0, 50, 95, 100]).astype(int)
        lines.append(f"  min {q[0]}  median {q[1]}  p95 {q[2]}  max {q[3]}")
    lines += _histogram(found.lengths)
    for name, counts in (("images", found.images), ("videos", found.videos)):
        lines.append(f"{name} per sample: " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())))
    lines.append(f"over max_seq_length {found.max_seq_length}: {found.truncated} truncated, {found.dropped} "
                 "too long to truncate (skipped in training)")
    warnings = [w for w in (store.unread_keys_warning(), found.too_long_warning()) if w]
    if store.added_placeholders:
        warnings.append(f"added {store.added_placeholders} <image>/<video> placeholders to records that had media "
                        "but none (PaddleMIX rule)")
    if store.skips.total:
        warnings.append(store.skips.summary())
    warnings += [str(e) for e in found.errors[:5]]
    lines += ["warnings:"] + [f"  {w}" for w in warnings] if warnings else ["warnings: none"]
    for i in range(min(show, len(dataset))):
        conv = store.conversation(i)
        lines += ["", f"--- sample {i} ({conv.file}, record {conv.index}); supervised tokens between « and » ---"]
        try:
            lines.append(render_sample(dataset, i))
        except DataError as e:
            lines.append(f"(not trainable: {e})")
    return lines


def data_main(argv: list[str]) -> int:
    _, config, rest = split_launch_options(argv)
    overrides: dict[str, Any] = parse_overrides(rest)
    options = {k: overrides.pop(k) for k in ("show", "probe") if k in overrides}
    try:
        show, probe = int(options.get("show", DEFAULT_SHOW)), int(options.get("probe", DEFAULT_PROBE))
    except ValueError:
        raise ConfigError("--show and --probe take a number of samples") from None
    cfg = load_run_config("sft", config, overrides)
    if cfg.data.meta_path is None and not cfg.data.dataset:
        raise ConfigError("no data: --meta_path M, or --dataset A,B [--dataset_dir D]")
    try:
        store = RecordStore(cfg.data.meta_path, cfg.data.data_seed, skip_bad=cfg.data.skip_bad_samples,
                            dataset=cfg.data.dataset, dataset_dir=cfg.data.dataset_dir, val_size=cfg.data.val_size)
        dataset = SFTDataset(cfg.data, build_processor_for(cfg), records=store)
        if not probe:  # every sample: measured once into the length table training reads too
            dataset.index_lengths()
        found = survey(dataset, probe or None)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    print("\n".join(report(store, dataset, found, show)))
    problem = found.too_long_problem() or (str(found.errors[0]) if found.errors and not
                                           cfg.data.skip_bad_samples else None)
    if problem:
        print(f"qwen2vl-ap data: {problem}")
        return 2
    return 0
