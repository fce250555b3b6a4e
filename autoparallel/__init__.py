"""The one place that knows about meshes: degrees -> mesh (mesh), plans applied (parallelize), batches and the
distributed loss (step), per-rank memory (memory) and the CPU-build workarounds (cpu_compat)."""
