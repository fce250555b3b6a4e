"""Parallel plans as data (`placements.qwen2_vl`) and their human-readable rendering (`placements.render`)."""
from placements.qwen2_vl import TP_PLAN, ParamLayout, layout, parallelize_config, parameter_shapes, tensor_parallel_plan
from placements.render import plan_rows, render_plan

__all__ = ["TP_PLAN", "ParamLayout", "layout", "parallelize_config", "parameter_shapes", "plan_rows", "render_plan",
           "tensor_parallel_plan"]
