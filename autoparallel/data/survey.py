"""What a dataset holds, as training will read it: per-source counts, token lengths before truncation, samples
too long for max_seq_length, media per sample and bad samples, from the length table (SFTDataset.index_lengths)
or probes (image headers and video metadata; no pixel is decoded). The parent's checks (launch/prepare.py) and
`qwen2vl-ap data` both use it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from autoparallel.data.collator import padded_length
from autoparallel.data.dataset import FULL, IMAGE_HEIGHT, IMAGE_WIDTH, IMAGES, TOKENS, VIDEOS, SFTDataset
from autoparallel.data.records import DataError

# Samples whose length-table rows are read at once.
SURVEY_CHUNK = 1 << 16


@dataclass
class Survey:
    total: int  # samples (repeat_time applied)
    probed: int
    max_seq_length: int
    # untruncated token counts of the probed valid samples
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    dropped: int = 0  # too long and not truncatable (the loader skips them)
    truncated: int = 0  # too long, cut at a turn boundary or hard
    images: Counter = field(default_factory=Counter)  # images per sample -> samples
    videos: Counter = field(default_factory=Counter)
    per_source: Counter = field(default_factory=Counter)  # annotation file -> samples probed
    errors: list[DataError] = field(default_factory=list)  # bad samples other than too long

    def too_long_problem(self) -> Optional[str]:
        """An error when no probed sample fits, else None (see `too_long_warning`)."""
        if not len(self.lengths) or self.dropped < len(self.lengths):
            return None
        return (f"all {self.probed} probed samples are longer than max_seq_length {self.max_seq_length} and cannot be "
                f"truncated (they are {self.lengths.min()}-{self.lengths.max()} tokens): raise max_seq_length to at "
                f"least {self.lengths.max()}, or lower max_pixels / video_max_pixels / video_maxlen")

    def too_long_warning(self) -> Optional[str]:
        if not self.dropped:
            return None
        return (f"{self.dropped} of {self.probed} probed samples are longer than max_seq_length "
                f"{self.max_seq_length} and cannot be truncated (they will be skipped): raise max_seq_length to "
                f"{self.lengths.max()} to keep them")


def sample_indices(total: int, limit: Optional[int]) -> Optional[np.ndarray]:
    """`limit` evenly spaced samples (deterministic), or None for all of them."""
    if limit is None or total <= limit:
        return None
    return np.unique(np.linspace(0, total - 1, limit).astype(np.int64))


def _counts(values: np.ndarray) -> Counter:
    keys, counts = np.unique(values, return_counts=True)
    return Counter({int(k): int(n) for k, n in zip(keys, counts)})


def _measured_chunks(dataset: SFTDataset, indices: Optional[np.ndarray]
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, list[DataError]]]:
    """(indices, `dataset.measure_many` of them) a slice at a time, over the given samples or (None) all: the rows
    of millions of samples are never held at once (each process reads them at start-up)."""
    total = len(dataset) if indices is None else len(indices)
    for start in range(0, total, SURVEY_CHUNK):
        stop = min(start + SURVEY_CHUNK, total)
        chunk = np.arange(start, stop) if indices is None else indices[start:stop]
        yield chunk, *dataset.measure_many(chunk)


def survey(dataset: SFTDataset, limit: Optional[int] = None) -> Survey:
    """Measure `limit` evenly spaced samples (all when None) of `dataset`."""
    indices = sample_indices(len(dataset), limit)
    out = Survey(len(dataset), len(dataset) if indices is None else len(indices), dataset.config.max_seq_length)
    records = dataset.records
    sources = np.zeros(len(records.sources), np.int64)
    lengths = []
    for chunk, rows, errors in _measured_chunks(dataset, indices):
        sources += np.bincount(records.record_sources[records.sample_to_record[chunk]], minlength=len(sources))
        out.errors += errors
        lengths.append(rows[:, FULL].copy())  # not a view: the chunk's rows are let go
        out.images.update(_counts(rows[:, IMAGES]))
        out.videos.update(_counts(rows[:, VIDEOS]))
        too_long = rows[:, FULL] > out.max_seq_length
        dropped = int((too_long & (rows[:, TOKENS] < 0)).sum())
        out.dropped += dropped
        out.truncated += int(too_long.sum()) - dropped
    out.per_source = Counter({s.annotation: int(n) for s, n in zip(records.sources, sources) if n})
    out.lengths = np.concatenate(lengths) if lengths else out.lengths
    return out


@dataclass
class DataProfile:
    """What `qwen2vl-ap plan` (and the run's plan.txt) takes from the training data instead of assumed shapes."""

    samples: int
    trainable: int  # samples that fit max_seq_length (truncated or not) with readable media
    too_long: int
    unreadable: int
    longest: int  # tokens after truncation
    images: int  # most images in one sample
    largest_image: tuple[int, int]  # original (height, width) of the largest image

    def note(self) -> str:
        skipped = (f"; {self.too_long} too long to truncate, {self.unreadable} with unreadable media"
                   if self.too_long or self.unreadable else "")
        return (f"data: {self.samples} samples, {self.trainable} trainable; longest {self.longest} tokens (padded "
                f"{padded_length([self.longest])}), up to {self.images} images/sample, largest image "
                f"{self.largest_image[0]}x{self.largest_image[1]} px{skipped}")

    def plan_options(self, given: set[str]) -> dict[str, object]:
        """planning.setup.PlanOptions fields from the data; the options in `given` (set by the user) win."""
        changes: dict[str, object] = {"longest_sample": padded_length([self.longest])}
        if "images_per_sample" not in given:
            changes["images_per_sample"] = self.images
        if "image_size" not in given and self.images:
            changes["image_hw"] = self.largest_image
        return changes


def data_profile(dataset: SFTDataset) -> DataProfile:
    """Every sample's row (the length table, measured where it has none); raises DataError when none fits."""
    samples = trainable = unreadable = longest = images = 0
    largest, largest_area = (0, 0), -1
    for _, rows, errors in _measured_chunks(dataset, None):
        fits = rows[rows[:, TOKENS] >= 0]
        samples += len(rows)
        unreadable += len(errors)
        if not len(fits):
            continue
        trainable += len(fits)
        longest, images = max(longest, int(fits[:, TOKENS].max())), max(images, int(fits[:, IMAGES].max()))
        area = fits[:, IMAGE_HEIGHT].astype(np.int64) * fits[:, IMAGE_WIDTH]
        if int(area.max()) > largest_area:
            row = fits[int(area.argmax())]
            largest, largest_area = (int(row[IMAGE_HEIGHT]), int(row[IMAGE_WIDTH])), int(area.max())
    if not trainable:
        raise DataError(dataset.records.meta_path, None, f"no sample fits max_seq_length "
                        f"{dataset.config.max_seq_length} with readable media (qwen2vl-ap data shows why)",
                        kind="too long")
    return DataProfile(len(dataset), trainable, samples - trainable, unreadable, longest, images, largest)
