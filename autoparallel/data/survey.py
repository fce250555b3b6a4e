"""What a dataset holds, as training will read it: per-source counts, token lengths before truncation, samples
too long for max_seq_length, media per sample and bad samples, from probes (image headers and video metadata; no
pixel is decoded). The parent's checks (launch/prepare.py) and `qwen2vl-ap data` both use it."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from autoparallel.data.dataset import SFTDataset
from autoparallel.data.records import DataError


@dataclass
class Survey:
    total: int  # samples (repeat_time applied)
    probed: int
    max_seq_length: int
    lengths: list[int] = field(default_factory=list)  # untruncated token counts of the probed valid samples
    dropped: int = 0  # too long and not truncatable (the loader skips them)
    truncated: int = 0  # too long, cut at a turn boundary or hard
    images: Counter = field(default_factory=Counter)  # images per sample -> samples
    videos: Counter = field(default_factory=Counter)
    per_source: Counter = field(default_factory=Counter)  # annotation file -> samples probed
    errors: list[DataError] = field(default_factory=list)  # bad samples other than too long

    def too_long_problem(self) -> Optional[str]:
        """An error when no probed sample fits, else None (see `too_long_warning`)."""
        if not self.lengths or self.dropped < len(self.lengths):
            return None
        return (f"all {self.probed} probed samples are longer than max_seq_length {self.max_seq_length} and cannot be "
                f"truncated (they are {min(self.lengths)}-{max(self.lengths)} tokens): raise max_seq_length to at "
                f"least {max(self.lengths)}, or lower max_pixels / video_max_pixels / video_maxlen")

    def too_long_warning(self) -> Optional[str]:
        if not self.dropped:
            return None
        return (f"{self.dropped} of {self.probed} probed samples are longer than max_seq_length "
                f"{self.max_seq_length} and cannot be truncated (they will be skipped): raise max_seq_length to "
                f"{max(self.lengths)} to keep them")


def sample_indices(total: int, limit: Optional[int]) -> np.ndarray:
    """All samples, or `limit` evenly spaced ones (deterministic)."""
    if limit is None or total <= limit:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, limit).astype(np.int64))


def survey(dataset: SFTDataset, limit: Optional[int] = None) -> Survey:
    """Probe `limit` evenly spaced samples (all when None) of `dataset`."""
    indices = sample_indices(len(dataset), limit)
    unlimited = SFTDataset(dataclasses.replace(dataset.config, max_seq_length=1 << 30), dataset.processor,
                           records=dataset.records)
    out = Survey(len(dataset), len(indices), dataset.config.max_seq_length)
    for i in indices:
        conv = dataset.records.conversation(int(i))
        out.per_source[conv.file] += 1
        try:
            full = unlimited.probe(int(i))[0]
        except DataError as e:
            out.errors.append(e)
            continue
        out.lengths.append(full)
        out.images[len(conv.images)] += 1
        out.videos[len(conv.videos)] += 1
        if full > out.max_seq_length:
            try:
                dataset.probe(int(i))
                out.truncated += 1
            except DataError:
                out.dropped += 1
    return out
