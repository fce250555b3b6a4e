"""bf16 resume keeps the training progress: fp32 master weights go into the dist checkpoint under flat keys and come
back bit-exactly; a checkpoint written without them gets masters rebuilt from its loaded weights."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist
import pytest

from autoparallel import cpu_compat
from autoparallel.engine.checkpoint import MASTER_PREFIX, inner_optimizer, load_dist_state, optimizer_tensors


def _bf16_model_and_optimizer(seed: int):
    """A bf16 model with a multi-precision AdamW whose moments and fp32 masters exist (names fixed by the guard)."""
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():
        paddle.set_default_dtype("bfloat16")
        try:
            model = paddle.nn.Sequential(paddle.nn.Linear(6, 5), paddle.nn.Linear(5, 3))
        finally:
            paddle.set_default_dtype("float32")
        optimizer = paddle.optimizer.AdamW(parameters=model.parameters(), multi_precision=True)
        for p in model.parameters():
            p.grad = paddle.zeros(p.shape, "bfloat16")
        # The CPU build has no bf16 adamw kernel: step() creates the moments and masters, then fails in the kernel.
        with pytest.raises(RuntimeError, match="adamw"):
            optimizer.step()
    masters = inner_optimizer(optimizer)._master_weights
    assert len(masters) == len(model.parameters())
    return model, optimizer, masters


def _randomise(tensors, seed):
    rng = np.random.default_rng(seed)
    for t in tensors:
        t.set_value(paddle.to_tensor(rng.standard_normal(t.shape).astype("float32")).astype(t.dtype))


def test_masters_are_flat_keys_and_round_trip_bit_exactly(tmp_path):
    cpu_compat.apply()
    model, optimizer, masters = _bf16_model_and_optimizer(0)
    _randomise(masters.values(), 1)  # training progress: masters differ from the bf16 weights' values
    state = dict(model.state_dict()) | optimizer_tensors(optimizer)
    assert {MASTER_PREFIX + name for name in masters} <= set(state)
    assert all(isinstance(v, paddle.Tensor) for v in state.values())
    dist.save_state_dict(state, str(tmp_path), safetensors=True)

    fresh, fresh_opt, fresh_masters = _bf16_model_and_optimizer(5)
    fresh_state = dict(fresh.state_dict()) | optimizer_tensors(fresh_opt)
    assert load_dist_state(fresh_state, tmp_path, fresh_opt, fresh.parameters()) == 0
    for name, master in masters.items():
        np.testing.assert_array_equal(fresh_masters[name].numpy(), master.numpy())
        assert fresh_masters[name].dtype == paddle.float32
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(q.numpy(), p.numpy(), err_msg=name)


def test_old_checkpoint_without_masters_reseeds_them_from_loaded_weights(tmp_path):
    cpu_compat.apply()
    model, optimizer, _ = _bf16_model_and_optimizer(0)
    _randomise(model.parameters(), 2)
    old = {k: v for k, v in (dict(model.state_dict()) | optimizer_tensors(optimizer)).items()
           if not k.startswith(MASTER_PREFIX)}  # what checkpoints held before
    dist.save_state_dict(old, str(tmp_path), safetensors=True)

    fresh, fresh_opt, fresh_masters = _bf16_model_and_optimizer(5)
    state = dict(fresh.state_dict()) | optimizer_tensors(fresh_opt)
    assert load_dist_state(state, tmp_path, fresh_opt, fresh.parameters()) == len(fresh.parameters())
    for p in fresh.parameters():
        np.testing.assert_array_equal(fresh_masters[p.name].numpy(), p.astype("float32").numpy())
    np.testing.assert_array_equal(fresh.parameters()[0].numpy(), model.parameters()[0].numpy())
