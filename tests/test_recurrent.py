"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: the step-by-step recurrence against torch's own
kernels, the first-order and GGN-family extensions and ``Jacobian`` against
``tests.reference`` (float64; the reference runs torch's kernels a sample at a time), the
dataset functions, finite differences, and the refusals."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

import curvhooks
from curvhooks import BatchGrad, DiagHessian
from curvhooks.derivatives.recurrent import recurrence
from tests import reference
from tests.checks import check_every_extension, check_finite_differences
from tests.problems import CE_MSE, Problem, assert_close

FEATURES, HIDDEN, STEPS = 3, 4, 4
CELLS = {
    "rnn-tanh": (nn.RNN, {}),
    "rnn-relu": (nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTM, {}),
    "lstm-projected": (nn.LSTM, {"proj_size": 2}),
    "gru": (nn.GRU, {}),
}


def _layer(cell: str, **options) -> nn.RNNBase:
    cls, own = CELLS[cell]
    return cls(FEATURES, HIDDEN, **{"batch_first": True, **own, **options})


@pytest.mark.parametrize(
    "cell, layers, bidirectional, batch_first, bias",
    itertools.product(CELLS, (1, 2), (False, True), (False, True), (True, False)),
)
def test_the_recurrence_is_torchs(cell, layers, bidirectional, batch_first, bias):
    """Every output, initial states zero or given, to float64 rounding."""
    torch.manual_seed(0)
    module = _layer(
        cell, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
    ).double()
    x = torch.randn(5, STEPS, FEATURES, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    expected, _ = tree_flatten(module(x))
    assert_close(
        torch.cat([t.flatten() for t in tree_flatten(recurrence(module, x))[0]]),
        torch.cat([t.flatten() for t in expected]),
    )
    states = module(x)[1]
    given = module(2 * x, states)
    assert_close(
        torch.cat([t.flatten() for t in tree_flatten(recurrence(module, 2 * x, states))[0]]),
        torch.cat([t.flatten() for t in tree_flatten(given)[0]]),
    )


class Classifier(nn.Module):
    """A recurrent layer, then a linear head on what ``read`` takes: the last step
    (``"last"``), the final hidden states of every layer and direction (``"states"``, LSTM's
    cell states too), or the last step with initial states from a linear map of the first
    step (``"given-states"``)."""

    def __init__(self, cell: str, read: str = "last", **options) -> None:
        super().__init__()
        self.rnn = _layer(cell, **options)
        self.read = read
        if read == "given-states":
            self.initial = nn.Linear(FEATURES, self.rnn.proj_size or HIDDEN)
        directions = 2 if self.rnn.bidirectional else 1
        width = (self.rnn.proj_size or HIDDEN) * directions
        if read == "states":
            layers = self.rnn.num_layers * directions
            width = (self.rnn.proj_size or HIDDEN) * layers
            width += HIDDEN * layers if cell.startswith("lstm") else 0
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        rnn = self.rnn
        sequences = x if rnn.batch_first else x.transpose(0, 1)
        states = None
        if self.read == "given-states":
            first = self.initial(x[:, 0])  # [N, H]
            layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
            hidden = first.expand(layers, *first.shape).contiguous()
            states = (hidden, torch.tanh(hidden)) if isinstance(rnn, nn.LSTM) else hidden
            if isinstance(rnn, nn.LSTM) and rnn.proj_size:
                states = (hidden, torch.zeros(layers, len(x), HIDDEN, dtype=x.dtype))
        output, final = rnn(sequences, states)
        if self.read == "states":
            finals = final if isinstance(final, tuple) else (final,)
            return self.head(torch.cat([f.transpose(0, 1).flatten(1) for f in finals], 1))
        last = output[:, -1] if rnn.batch_first else output[-1]
        return self.head(last)


SETTINGS = {
    "last": {},
    "states": {"read": "states"},
    "given-states": {"read": "given-states"},
    "two-layers-bidirectional": {"num_layers": 2, "bidirectional": True},
    "not-batch-first-states": {"batch_first": False, "read": "states", "num_layers": 2},
    "no-bias": {"bias": False},
}
PROBLEMS = [
    Problem(
        f"{cell}-{name}",
        lambda cell=cell, options=options: Classifier(cell, **options),
        (STEPS, FEATURES),
        is_chain=False,
    )
    for cell in CELLS
    for name, options in SETTINGS.items()
] + [
    Problem("lstm-one-step", lambda: Classifier("lstm"), (1, FEATURES), is_chain=False),
    Problem("gru-batch-of-one", lambda: Classifier("gru"), (STEPS, FEATURES), 1, is_chain=False),
]


@pytest.mark.parametrize(
    "problem, loss",
    [pytest.param(p, loss, id=f"{p.name}-{loss}") for p in PROBLEMS for loss in CE_MSE],
)
def test_first_order_and_ggn_family(problem, loss):
    check_every_extension(*problem.make(loss))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dataset_functions_by_hooks(cell):
    """``ggn`` and ``empirical_fisher`` by the hooks over unequal batches."""
    problem = Problem(cell, lambda: Classifier(cell, num_layers=2), (STEPS, FEATURES), 5)
    model, loss_fn, X, y = problem.make("ce-mean")
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    expected = reference.ggn(model, loss_fn, X, y)
    assert_close(curvhooks.ggn(model, loss_fn, data, route="hooks"), expected)
    expected = reference.empirical_fisher(model, loss_fn, X, y)
    assert_close(curvhooks.empirical_fisher(model, loss_fn, data, route="hooks"), expected)


@pytest.mark.parametrize("cell", list(CELLS))
def test_per_sample_gradients_match_finite_differences(cell):
    """Per-sample gradients of every weight of a two-layer bidirectional layer against
    central differences of each sample's loss (float64, step 1e-6)."""
    problem = Problem(
        cell,
        lambda: Classifier(cell, num_layers=2, bidirectional=True),
        (STEPS, FEATURES),
        3,
        is_chain=False,
    )
    model, loss_fn, X, y = problem.make("ce-sum")
    with curvhooks.extend(model, loss_fn, BatchGrad()):
        loss_fn(model(X), y).backward()
    entries = [(p, tuple(size // 2 for size in p.shape)) for p in model.rnn.parameters()]
    check_finite_differences(model, loss_fn, X, y, entries, rtol=1e-6)


def test_refusals():
    """Packed and unbatched sequences, dropout in training mode and the Hessian extensions
    are refused, naming the fix."""
    model, loss_fn, X, y = PROBLEMS[0].make("ce-mean")
    with curvhooks.extend(model, loss_fn, BatchGrad()):
        with pytest.raises(curvhooks.UnsupportedError, match="unbatched sequence.*pad"):
            model.rnn(X[0])
        packed = nn.utils.rnn.pack_sequence([X[0], X[1, :2]])
        with pytest.raises(curvhooks.UnsupportedError, match="packed"):
            model.rnn(packed)
    layered = Classifier("lstm", num_layers=2, dropout=0.5).double()
    with curvhooks.extend(layered, loss_fn, BatchGrad()):
        with pytest.raises(curvhooks.UnsupportedError, match="training mode.*eval"):
            layered(X)
    with pytest.raises(curvhooks.UnsupportedError, match="RNN.*own second derivatives"):
        curvhooks.extend(model, loss_fn, DiagHessian()).__enter__()
