"""The operators against the dense matrices of ``tests.reference`` on the shared problems:
products with vectors and matrices over unequal batches, composition, damping, the
conjugate-gradient inverse, scipy, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import curvhooks
from curvhooks.operators import dataset as dataset_operators
from tests import reference
from tests.problems import CASE_IDS, CASES, assert_close, by_name

OPERATORS = {
    "ggn": (curvhooks.GGNOperator, reference.ggn),
    "empirical_fisher": (curvhooks.EmpiricalFisherOperator, reference.empirical_fisher),
    "hessian": (curvhooks.HessianOperator, reference.hessian_matrix),
}


def _setting(problem, loss: str):
    """Seven samples in batches of 3, 3 and 1, and random columns ``[D, 3]``."""
    model, loss_fn, X, y = problem.make(loss, num_samples=7)
    loader = DataLoader(TensorDataset(X, y), batch_size=3)
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.manual_seed(1)
    return model, loss_fn, X, y, loader, torch.randn(size, 3, dtype=torch.float64)


def _cases(kinds: tuple[str, ...], step: int):
    return [
        pytest.param(kind, problem, loss, id=f"{kind}-{case_id}")
        for kind in kinds
        for (problem, loss), case_id in list(zip(CASES, CASE_IDS))[::step]
    ]


def _check_products(kind: str, problem, loss: str) -> None:
    operator_class, reference_function = OPERATORS[kind]
    model, loss_fn, X, y, loader, V = _setting(problem, loss)
    expected = reference_function(model, loss_fn, X, y)
    operator = operator_class(model, loss_fn, loader)
    assert operator.shape == expected.shape and operator.dtype == torch.float64
    assert_close(operator @ V, expected @ V)
    assert_close(operator @ V[:, 0], expected @ V[:, 0])


@pytest.mark.parametrize("kind, problem, loss", _cases(("ggn", "empirical_fisher"), 1))
def test_products_match_the_dense_matrix(kind, problem, loss):
    _check_products(kind, problem, loss)


@pytest.mark.parametrize("kind, problem, loss", _cases(("ggn",), 2))
def test_ggn_products_by_the_batches_factors(kind, problem, loss, monkeypatch):
    """With enough columns the GGN multiplies each batch's square-root factor from the
    hooks, where they serve the model (else forward- and reverse-mode products, as above)."""
    monkeypatch.setattr(curvhooks.tuning, "FACTOR_PRODUCT_COLUMNS", 1)
    factor_matmat = curvhooks.GGNOperator._factor_matmat
    used = []
    monkeypatch.setattr(
        curvhooks.GGNOperator,
        "_factor_matmat",
        lambda self, columns: used.append(1) or factor_matmat(self, columns),
    )
    _check_products(kind, problem, loss)
    assert used


def test_monte_carlo_products_by_factors_are_those_by_forward_mode(monkeypatch):
    model, loss_fn, X, y, loader, V = _setting(by_name("conv-residual"), "ce-mean")
    operator = curvhooks.GGNOperator(model, loss_fn, loader, mc_samples=2, seed=5)
    monkeypatch.setattr(curvhooks.tuning, "FACTOR_PRODUCT_COLUMNS", 10**9)
    by_forward_mode = operator @ V
    monkeypatch.setattr(curvhooks.tuning, "FACTOR_PRODUCT_COLUMNS", 1)
    assert_close(operator @ V, by_forward_mode)


@pytest.mark.parametrize("kind, problem, loss", _cases(("hessian",), 3))
def test_hessian_products_match_the_dense_matrix(kind, problem, loss):
    _check_products(kind, problem, loss)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, problem, loss",
    [case for case in _cases(("hessian",), 1) if case not in _cases(("hessian",), 3)],
)
def test_hessian_products_on_every_problem(kind, problem, loss):
    _check_products(kind, problem, loss)


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("name", ["cnn-sigmoid", "conv-residual", "attention", "embedding-padding"])
def test_products_in_chunks_of_one_column(kind, name, monkeypatch):
    """Where a batch's module outputs times the columns exceed ``COLUMN_CHUNK_BYTES``, the
    vectorised products run over chunks of columns; the numbers stay the same."""
    monkeypatch.setattr(curvhooks.tuning, "FACTOR_PRODUCT_COLUMNS", 10**9)
    monkeypatch.setattr(curvhooks.tuning, "COLUMN_CHUNK_BYTES", {"cpu": 1})
    chunks = []
    columns_per_chunk = dataset_operators._columns_per_chunk
    monkeypatch.setattr(
        dataset_operators,
        "_columns_per_chunk",
        lambda *args: chunks.append(columns_per_chunk(*args)) or chunks[-1],
    )
    _check_products(kind, by_name(name), "ce-mean")
    assert chunks and set(chunks) == {1}


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("chunk_bytes", [1, 2**25])
def test_products_with_no_columns(kind, chunk_bytes, monkeypatch):
    monkeypatch.setattr(curvhooks.tuning, "COLUMN_CHUNK_BYTES", {"cpu": chunk_bytes})
    model, loss_fn, _, _, loader, V = _setting(by_name("conv-residual"), "ce-mean")
    product = OPERATORS[kind][0](model, loss_fn, loader) @ V[:, :0]
    assert product.shape == (len(V), 0)


def test_output_bytes_counts_what_leaf_modules_return_and_leaves_no_hook():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ).double()
    with dataset_operators._output_bytes(model) as counted:
        model(torch.randn(5, 3, dtype=torch.float64))
    assert counted == [(5 * 4 + 5 * 4 + 5 * 2) * 8]
    assert not any(module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("name", ["cnn-sigmoid", "conv-residual"])
def test_diag_and_to_dense(kind, name):
    operator_class, reference_function = OPERATORS[kind]
    model, loss_fn, X, y, loader, _ = _setting(by_name(name), "ce-mean")
    expected = reference_function(model, loss_fn, X, y)
    operator = operator_class(model, loss_fn, loader)
    assert_close(operator.to_dense(), expected)
    assert_close(operator.diag(), expected.diagonal())


def test_composition_damping_and_inverse():
    model, loss_fn, X, y, loader, V = _setting(by_name("cnn-sigmoid"), "ce-sum")
    ggn = curvhooks.GGNOperator(model, loss_fn, loader)
    hessian = curvhooks.HessianOperator(model, loss_fn, loader)
    G, H = reference.ggn(model, loss_fn, X, y), reference.hessian_matrix(model, loss_fn, X, y)
    eye = torch.eye(len(G), dtype=G.dtype)
    combined = 2.0 * ggn + hessian * 0.5
    assert_close(combined @ V, (2 * G + 0.5 * H) @ V)
    assert_close(combined.diag(), (2 * G + 0.5 * H).diagonal())
    assert_close(ggn.damped(0.3) @ V, (G + 0.3 * eye) @ V)
    inverse = ggn.inverse(0.3, tolerance=1e-10)
    solution = inverse @ V
    residual = (G + 0.3 * eye) @ solution - V
    assert (residual.norm(dim=0) <= 1e-10 * V.norm(dim=0)).all()
    # the stated tolerance bounds the residual; the error is at most the condition number
    # (about 10 here) times it
    exact = torch.linalg.solve(G + 0.3 * eye, V)
    torch.testing.assert_close(solution, exact, rtol=0, atol=1e-8 * exact.abs().max())
    assert "GGNOperator" in repr(combined) and "D=" in repr(ggn)


def test_inverse_says_when_it_does_not_converge():
    model, loss_fn, X, y, loader, V = _setting(by_name("mlp"), "ce-sum")
    ggn = curvhooks.GGNOperator(model, loss_fn, loader)
    with pytest.raises(RuntimeError, match="did not reach the relative residual 1e-12 within 3"):
        ggn.inverse(1e-6, tolerance=1e-12, max_iterations=3) @ V
    with pytest.raises(ValueError, match="method must be 'cg'"):
        ggn.inverse(1e-3, method="cholesky")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        ggn.inverse(-1.0)


def test_to_scipy_with_eigsh():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    model, loss_fn, X, y, loader, _ = _setting(by_name("cnn-sigmoid"), "ce-mean")
    operator = curvhooks.GGNOperator(model, loss_fn, loader).to_scipy()
    values = scipy_linalg.eigsh(operator, k=3, which="LA", return_eigenvectors=False)
    expected = torch.linalg.eigvalsh(reference.ggn(model, loss_fn, X, y))[-3:]
    torch.testing.assert_close(torch.tensor(sorted(values)), expected, rtol=1e-8, atol=1e-12)


def test_monte_carlo_ggn_is_one_fixed_matrix():
    """Its samples are fixed by the seed: products are linear in the columns, the matrix is
    symmetric, and many samples approach the exact GGN."""
    model, loss_fn, X, y, loader, V = _setting(by_name("mlp"), "ce-mean")
    operator = curvhooks.GGNOperator(model, loss_fn, loader, mc_samples=2, seed=3)
    dense = operator.to_dense()
    assert_close(dense, dense.T)
    assert_close(operator @ V, dense @ V)
    assert_close(operator @ V[:, 1], dense @ V[:, 1])
    assert not torch.allclose(dense, reference.ggn(model, loss_fn, X, y))
    many = curvhooks.GGNOperator(model, loss_fn, loader, mc_samples=20_000).to_dense()
    exact = reference.ggn(model, loss_fn, X, y)
    torch.testing.assert_close(many, exact, rtol=0, atol=0.03 * exact.abs().max())


def test_bad_columns_get_clear_errors():
    model, loss_fn, X, y, loader, V = _setting(by_name("mlp"), "ce-mean")
    operator = curvhooks.GGNOperator(model, loss_fn, loader)
    with pytest.raises(ValueError, match=r"expected a vector \[74\] or a matrix \[74, k\]"):
        operator @ V[:-1]
    with pytest.raises(ValueError, match="dtype torch.float64"):
        operator @ V.float()
    with pytest.raises(ValueError, match="expected a vector"):
        operator @ V[None]
    with pytest.raises(ValueError, match="on cpu .*, got torch.float64 on meta"):
        operator @ V.to("meta")
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        curvhooks.GGNOperator(model, torch.nn.CrossEntropyLoss(reduction="none"), loader)


def test_hessian_of_one_batch_keeps_its_graph_until_the_parameters_change():
    model, loss_fn, X, y, _, V = _setting(by_name("cnn-sigmoid"), "ce-mean")
    operator = curvhooks.HessianOperator(model, loss_fn, (X, y))
    assert_close(operator @ V, reference.hessian_matrix(model, loss_fn, X, y) @ V)
    kept = operator._kept
    assert_close(operator @ V[:, :2], reference.hessian_matrix(model, loss_fn, X, y) @ V[:, :2])
    assert operator._kept is kept
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # an optimizer's step
    assert_close(operator @ V, reference.hessian_matrix(model, loss_fn, X, y) @ V)
    assert operator._kept is not kept
    several = curvhooks.HessianOperator(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])])
    assert_close(several @ V, reference.hessian_matrix(model, loss_fn, X, y) @ V)
    assert several._kept is None
