"""Parallel plans as data and pure functions (no paddle): the tensor-parallel, sequence-parallel and pipeline plans
of Qwen2-VL and each parameter's layout (`placements.qwen2_vl`), LoRA placements that follow their base layer
(`placements.lora`) and the parallel degrees with every reason they cannot run (`placements.degrees`)."""
from placements.qwen2_vl import TP_PLAN, ParamLayout, layout, parameter_shapes, tensor_parallel_plan

__all__ = ["TP_PLAN", "ParamLayout", "layout", "parameter_shapes", "tensor_parallel_plan"]
