"""Which tensor is a parameter's gradient: shared by the train step and the pipeline."""
from __future__ import annotations

import paddle


def gradient(param: paddle.Tensor) -> paddle.Tensor | None:
    """The gradient the optimizer steps with: the fp32 `main_grad` under bf16 O2 with master_grad (sharding stages
    keep it there), else `.grad`."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad
