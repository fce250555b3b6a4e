"""The `qwen2vl-ap` command line (`cli`): config files and presets (`config`, `configs/`), parent-side validation
(`prepare`), the one launcher (`launcher`), training (`train`, `worker`), planning (`plan`), inference (`infer`)
and the demo (`demo`)."""
