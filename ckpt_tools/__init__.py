"""Checkpoint tools on `network` (and `placements`) only: streaming merge of dist checkpoints (`merge`), LoRA
merge (`lora_merge`), HF <-> Paddle conversion (`convert`), inspection (`inspect`); `cli` holds the handlers of
`qwen2vl-ap merge-ckpt | merge-lora | convert | inspect`."""
