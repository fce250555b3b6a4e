"""The fused chunked head + cross-entropy (network/loss.py) against plain autograd over full logits."""
import numpy as np
import paddle
import pytest

from network.loss import linear_cross_entropy

ROWS, HIDDEN, VOCAB = 11, 8, 37


def _inputs(transpose: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((ROWS, HIDDEN)).astype("float32")
    weight = rng.standard_normal((VOCAB, HIDDEN) if transpose else (HIDDEN, VOCAB)).astype("float32")
    targets = rng.integers(0, VOCAB, ROWS)
    targets[[2, 7]] = -100
    return hidden, weight * 3.0, targets  # * 3: logits spread wide, so the max shift matters


def _reference(hidden, weight, targets, transpose, normalizer, upstream):
    h, w = paddle.to_tensor(hidden, stop_gradient=False), paddle.to_tensor(weight, stop_gradient=False)
    logits = paddle.matmul(h, w, transpose_y=transpose)
    t = paddle.to_tensor(targets)
    keep = paddle.nonzero(t != -100).reshape([-1])
    rows, kept = paddle.gather(logits, keep), paddle.gather(t, keep)
    loss = (paddle.logsumexp(rows, axis=-1) - paddle.take_along_axis(rows, kept[:, None], axis=-1)[:, 0]).sum()
    loss = loss / normalizer
    (loss * upstream).backward()
    return float(loss), h.grad.numpy(), w.grad.numpy()


@pytest.mark.parametrize("transpose", [True, False], ids=["tied_VxH", "linear_HxV"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
def test_loss_and_gradients_match_full_logits(transpose, chunk_rows):
    hidden, weight, targets = _inputs(transpose)
    upstream = 2.5  # a loss scaled after the head (e.g. a loss transform): gradients scale with it
    want_loss, want_dh, want_dw = _reference(hidden, weight, targets, transpose, 9.0, upstream)
    h, w = paddle.to_tensor(hidden, stop_gradient=False), paddle.to_tensor(weight, stop_gradient=False)
    loss = linear_cross_entropy(h, w, paddle.to_tensor(targets), transpose_weight=transpose, normalizer=9.0,
                                chunk_rows=chunk_rows)
    (loss * upstream).backward()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(h.grad.numpy(), want_dh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), want_dw, rtol=1e-5, atol=1e-6)
    assert np.all(h.grad.numpy()[[2, 7]] == 0)  # ignored rows get no gradient


def test_frozen_weight_and_no_grad():
    """A frozen head (LoRA) gets no gradient but the hidden states do; under no_grad nothing is computed."""
    hidden, weight, targets = _inputs(True, seed=1)
    _, want_dh, _ = _reference(hidden, weight, targets, True, 1.0, 1.0)
    h, w = paddle.to_tensor(hidden, stop_gradient=False), paddle.to_tensor(weight)
    loss = linear_cross_entropy(h, w, paddle.to_tensor(targets), transpose_weight=True, chunk_rows=5)
    loss.backward()
    assert w.grad is None
    np.testing.assert_allclose(h.grad.numpy(), want_dh, rtol=1e-5, atol=1e-6)
    with paddle.no_grad():
        again = linear_cross_entropy(h, w, paddle.to_tensor(targets), transpose_weight=True)
    assert float(again) == pytest.approx(float(loss), rel=1e-6)


def test_huge_loss_is_not_clamped():
    """A target far below the row maximum (loss ~ 200): exact, where an underflowing probability would be inf."""
    hidden = np.eye(2, HIDDEN, dtype="float32")
    weight = np.zeros((VOCAB, HIDDEN), "float32")
    weight[0, 0], weight[1, 1] = 200.0, 200.0
    loss = linear_cross_entropy(paddle.to_tensor(hidden), paddle.to_tensor(weight), paddle.to_tensor([5, 1]),
                                transpose_weight=True)
    # Row 0: logsumexp 200 (+ 36 e^-200), target logit 0; row 1: its target is the maximum, loss ~ 0.
    assert float(loss) == pytest.approx(200.0, rel=1e-6)
