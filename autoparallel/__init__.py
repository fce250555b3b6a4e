"""The one place that knows about meshes. Core: degrees -> mesh (mesh), plans applied (parallelize), batches
(batch), the distributed forward and loss (forward), the one train step (step), sequence parallel, pipeline
stages, per-rank memory measured (memory_report) and the CPU-build workarounds (cpu_compat). On top: the data
pipeline (data/), the run config schema (config), planning (planning/) and the engine (engine/)."""
