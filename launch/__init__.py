"""The `qwen2vl-ap` command line (`cli`): config files and presets (`config`, `configs/`), parent-side validation
(`prepare`), the one launcher (`launcher`), training (`train`, `worker`), planning (`plan`), inference (`infer`),
the OpenAI-compatible server (`serve`, `serving/`) and the demo (`demo`)."""
