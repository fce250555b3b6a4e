"""The learning-rate schedule equals PaddleNLP's (the oracle PaddleMIX's scripts train with) step by step."""
import pytest
from paddlenlp.trainer.trainer_utils import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from autoparallel.engine.optim import lr_multiplier

ORACLES = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}


@pytest.mark.parametrize("kind", sorted(ORACLES))
@pytest.mark.parametrize("warmup,total", [(100, 330), (3, 10), (0, 7)])
def test_schedule_equals_paddlenlp(kind, warmup, total):
    oracle = ORACLES[kind](1.0, warmup, total)
    for step in range(total):
        assert lr_multiplier(step, warmup, total, kind) == pytest.approx(oracle.get_lr(), abs=1e-12), step
        oracle.step()


def test_warmup_starts_at_zero():
    assert [lr_multiplier(s, 4, 10, "constant") for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
