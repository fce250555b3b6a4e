"""Will it fit? Planning from the plan data alone — no model is built, no paddle imported: the workload and setup
of a run (setup), per-rank memory (memory), collectives per step (communication), the fit search (fit) and every
rendering of a plan (render: the plan table of plan.txt and the `qwen2vl-ap plan` report)."""
