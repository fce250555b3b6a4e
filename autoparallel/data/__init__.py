"""Data pipeline: meta files and annotation records (PaddleMIX, LLaMA-Factory, ms-swift, OpenAI content lists) →
SFT samples → globally padded, per-rank batches.

    config = DataConfig(meta_path="meta.json", max_seq_length=1024)
    dataset = SFTDataset(config)                       # validates every record up front
    loader = SFTDataLoader(dataset, per_device_batch_size=2, dp_world_size=2, dp_rank=rank)
    for batch in loader: ...                           # one epoch; loader.state_dict() to resume

See records.py (sources, validation, the record store; the formats in llamafactory.py, swift.py,
content_list.py, media_refs.py, annotation_file.py; the index in record_index.py), survey.py (what a dataset
holds), dataset.py (template, labels, truncation), collator.py (padding), sampler.py and
loader.py (global batches, workers, bad samples, resumption), synthetic.py (demo dataset; imported on its own so
`python -m autoparallel.data.synthetic` runs cleanly).
"""
from autoparallel.data.collator import collate, padded_length
from autoparallel.data.config import DataConfig
from autoparallel.data.dataset import IGNORE_INDEX, PAD_TOKEN_ID, SFTDataset, build_processor
from autoparallel.data.loader import SFTDataLoader
from autoparallel.data.records import Conversation, DataError, RecordStore, SkipLog, load_meta
from autoparallel.data.sampler import GlobalBatchSampler

__all__ = [
    "DataConfig", "SFTDataset", "SFTDataLoader", "GlobalBatchSampler", "DataError", "SkipLog", "RecordStore",
    "Conversation", "load_meta", "collate", "padded_length", "build_processor", "IGNORE_INDEX", "PAD_TOKEN_ID",
]
