"""The Kronecker operators say what they are: KFAC or EKFAC, their size, their blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvhooks


@pytest.fixture(scope="module")
def problem():
    """Two linear layers (weight and bias each) around a LayerNorm, which has no factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    return model, nn.CrossEntropyLoss(), (X, y)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "KFAC, D=53, blocks=6: 4 Kronecker-factored, 2 exact (2 diagonal, 0 dense)"),
        (
            {"eigen_correction": True, "others": "dense"},
            "EKFAC, D=53, blocks=6: 4 Kronecker-factored, 2 exact (0 diagonal, 2 dense)",
        ),
        ({"others": "skip"}, "KFAC, D=43, blocks=4: 4 Kronecker-factored"),
    ],
)
def test_kronecker_repr(problem, arguments, expected):
    K = curvhooks.kfac(*problem, **arguments)
    assert repr(K) == f"Kronecker({expected}, dtype=torch.float32, device=cpu)"
    blocks = expected.split("blocks=")[1].split(":")[0]
    assert repr(K.inverse(0.1)) == (
        f"KroneckerInverse(D={K.shape[0]}, blocks={blocks}, dtype=torch.float32, device=cpu)"
    )


def test_kronecker_repr_follows_its_dtype(problem):
    model, loss_fn, (X, y) = problem
    K = curvhooks.kfac(model.double(), loss_fn, (X.double(), y))
    model.float()
    assert repr(K).endswith("dtype=torch.float64, device=cpu)")
    assert repr(2 * K).startswith("2 * Kronecker(KFAC, D=53,")
