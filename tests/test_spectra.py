"""Eigenpairs, traces and spectral densities of the operators against ``torch.linalg`` on the
dense references, and their errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import curvhooks
from curvhooks.operators.base import CurvatureOperator
from tests import reference
from tests.problems import assert_close, by_name

OPERATORS = {
    "ggn": (curvhooks.GGNOperator, reference.ggn),
    "empirical_fisher": (curvhooks.EmpiricalFisherOperator, reference.empirical_fisher),
    "hessian": (curvhooks.HessianOperator, reference.hessian_matrix),
}


def _setting(kind: str, name: str = "cnn-sigmoid", loss: str = "ce-mean", samples: int = 20):
    """An operator over ``samples`` samples in batches of 7 and its dense matrix."""
    operator_class, reference_function = OPERATORS[kind]
    model, loss_fn, X, y = by_name(name).make(loss, num_samples=samples)
    loader = DataLoader(TensorDataset(X, y), batch_size=7)
    return operator_class(model, loss_fn, loader), reference_function(model, loss_fn, X, y)


def _check_eigenpairs(values, vectors, dense, which: str, k: int) -> None:
    spectrum = torch.linalg.eigvalsh(dense)
    expected = spectrum.flip(0)[:k] if which == "largest" else spectrum[:k]
    assert_close(values, expected)
    assert_close(vectors.T @ vectors, torch.eye(k, dtype=vectors.dtype))
    residuals = (dense @ vectors - vectors * values).norm(dim=0)
    assert (residuals <= 1e-9 * spectrum.abs().max()).all()


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("method", ["lanczos", "gram", "auto"])
@pytest.mark.parametrize("kind", OPERATORS)
def test_eigenpairs_match_eigh(kind, method, which):
    operator, dense = _setting(kind)
    if method == "gram" and (kind == "hessian" or which == "smallest"):
        with pytest.raises(ValueError, match="method='gram'"):
            curvhooks.eigenpairs(operator, 4, which=which, method=method)
        return
    values, vectors = curvhooks.eigenpairs(operator, 4, which=which, method=method, tolerance=1e-12)
    _check_eigenpairs(values, vectors, dense, which, 4)


def test_gram_eigenpairs_on_a_graph_with_mse_and_mc():
    operator, dense = _setting("ggn", "conv-residual", "mse-sum")
    values, vectors = curvhooks.eigenpairs(operator, 3, method="gram")
    _check_eigenpairs(values, vectors, dense, "largest", 3)
    model, loss_fn, X, y = by_name("mlp").make("ce-mean", num_samples=9)
    mc = curvhooks.GGNOperator(model, loss_fn, [(X[:5], y[:5]), (X[5:], y[5:])], mc_samples=3)
    values, vectors = curvhooks.eigenpairs(mc, 3, method="gram")
    _check_eigenpairs(values, vectors, mc.to_dense(), "largest", 3)


def test_lanczos_in_small_blocks_and_a_low_rank_matrix():
    """Blocks of two vectors; the GGN of 3 samples has rank at most 12, so its Krylov space
    becomes invariant long before D."""
    operator, dense = _setting("ggn", samples=3)
    values, vectors = curvhooks.eigenpairs(
        operator, 5, method="lanczos", block_size=2, tolerance=1e-12
    )
    _check_eigenpairs(values, vectors, dense, "largest", 5)


def test_eigenpairs_errors():
    operator, dense = _setting("ggn", samples=3)
    size = len(dense)
    for k in (0, size, 2.5):
        with pytest.raises(ValueError, match=f"1 <= k < D = {size}"):
            curvhooks.eigenpairs(operator, k)
    with pytest.raises(ValueError, match="which must be one of"):
        curvhooks.eigenpairs(operator, 2, which="magnitude")
    with pytest.raises(ValueError, match="method must be one of"):
        curvhooks.eigenpairs(operator, 2, method="power")
    with pytest.raises(ValueError, match="max_memory=100 bytes.*method='lanczos'"):
        curvhooks.eigenpairs(operator, 2, method="gram", max_memory=100)
    with pytest.raises(ValueError, match="rank at most 12"):  # 3 samples, 4 classes
        curvhooks.eigenpairs(operator, 13, method="gram")
    values, _ = curvhooks.eigenpairs(operator, 2, max_memory=100)  # auto: Lanczos
    assert_close(values, torch.linalg.eigvalsh(dense).flip(0)[:2])
    with pytest.raises(RuntimeError, match="Lanczos did not converge"):
        curvhooks.eigenpairs(operator, 2, method="lanczos", max_iterations=1, block_size=1)


@pytest.mark.parametrize("kind", OPERATORS)
def test_exact_traces(kind):
    operator, dense = _setting(kind)
    found = curvhooks.trace(operator)
    assert found.exact and found.standard_error == 0
    assert_close(found.value, dense.trace())
    combined = curvhooks.trace(2.0 * operator + operator.damped(0.5))
    assert combined.exact
    assert_close(combined.value, 3 * dense.trace() + 0.5 * len(dense))


def test_kronecker_trace_and_composition():
    model, loss_fn, X, y = by_name("mlp").make("ce-sum", num_samples=6)
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    kronecker = curvhooks.kfac(model, loss_fn, data)
    ggn = curvhooks.GGNOperator(model, loss_fn, data)
    assert_close(curvhooks.trace(kronecker).value, kronecker.to_dense().trace())
    combined = kronecker + 0.5 * ggn
    V = torch.randn(kronecker.shape[0], 2, dtype=torch.float64)
    expected = kronecker.to_dense() + 0.5 * reference.ggn(model, loss_fn, X, y)
    assert_close(combined @ V, expected @ V)
    assert_close(curvhooks.trace(combined).value, expected.trace())


def test_trace_estimates_within_four_standard_errors():
    """Where ``DiagHessian`` cannot serve the model (attention's nonlinear product), and
    where an estimate is asked for, Hutch++ at a fixed seed."""
    operator, dense = _setting("hessian", "attention", samples=9)
    found = curvhooks.trace(operator, seed=3)
    assert not found.exact and found.products == 99 and found.standard_error > 0
    assert abs(found.value - dense.trace()) <= 4 * found.standard_error
    operator, dense = _setting("ggn")
    estimate = curvhooks.trace(operator, samples=30, seed=1)
    assert estimate.products == 30 and estimate.standard_error > 0
    assert abs(estimate.value - dense.trace()) <= 4 * estimate.standard_error
    with pytest.raises(ValueError, match="samples must be an integer >= 3"):
        curvhooks.trace(operator, samples=2)


class Diagonal(CurvatureOperator):
    """A diagonal matrix with the given entries (its eigenvalues)."""

    def __init__(self, entries: torch.Tensor) -> None:
        self.entries = entries
        self.params = [torch.nn.Parameter(torch.zeros_like(entries))]

    def _matmat(self, columns):
        return self.entries[:, None] * columns


def test_spectral_density_integrates_to_one_where_the_eigenvalues_are():
    """Run to the full Krylov space, the nodes are the eigenvalues; many probes weight two
    clusters (30 eigenvalues near 1, 10 near 10) by their sizes."""
    operator, dense = _setting("hessian")
    grid, density = curvhooks.spectral_density(operator, probes=2, steps=len(dense))
    assert_close(torch.trapezoid(density, grid), torch.tensor(1.0, dtype=torch.float64))
    eigenvalues = torch.linalg.eigvalsh(dense)
    sigma = 0.01 * float(eigenvalues.max() - eigenvalues.min())
    near = (grid[:, None] - eigenvalues[None]).abs().min(1).values <= 4 * sigma
    assert float(torch.trapezoid(density * near, grid)) > 0.999
    entries = torch.cat([1 + 0.01 * torch.rand(30), 10 + 0.01 * torch.rand(10)]).double()
    grid, density = curvhooks.spectral_density(Diagonal(entries), probes=400, steps=40)
    low = float(torch.trapezoid(density * (grid < 5), grid))
    torch.testing.assert_close(low, 0.75, rtol=0, atol=0.05)


def test_plot_spectrum(tmp_path):
    operator, _ = _setting("ggn", samples=3)
    density = curvhooks.spectral_density(operator, steps=10)
    values, _ = curvhooks.eigenpairs(operator, 3)
    figure, ax = curvhooks.plot.spectrum({"GGN": density}, {"GGN": values})
    assert ax.get_yscale() == "log" and len(ax.lines) == 1 + 3
    assert ax.get_xlabel() == "eigenvalue"
    figure.savefig(tmp_path / "spectrum.png")
    with pytest.raises(ValueError, match="at least one"):
        curvhooks.plot.spectrum({})


def test_eigenvalues_converged_on_their_error_bound():
    """``converge="values"`` stops on ``residual^2 / gap``: the values to the tolerance, in
    no more products than the pairs take."""
    operator, dense = _setting("hessian")
    counts = {}
    for converge in ("pairs", "values"):
        products = []
        original = operator._matmat
        operator._matmat = lambda c, products=products, original=original: (
            products.append(1) or original(c)
        )
        values, _ = curvhooks.eigenpairs(
            operator, 2, tolerance=1e-6, converge=converge, block_size=1
        )
        del operator._matmat
        counts[converge] = len(products)
        expected = torch.linalg.eigvalsh(dense).flip(0)[:2]
        torch.testing.assert_close(values, expected, rtol=1e-6, atol=0)
    assert counts["values"] <= counts["pairs"]
    with pytest.raises(ValueError, match="converge must be one of"):
        curvhooks.eigenpairs(operator, 2, converge="vectors")


def test_default_tolerance_follows_the_dtype():
    """By default Lanczos stops at residuals of the square root of the dtype's machine
    epsilon (relative to the largest eigenvalue): float32 does not chase float64's 1.5e-8,
    which its round-off cannot certify, and stops sooner."""
    counts = {}
    for dtype in (torch.float32, torch.float64):
        entries = torch.cat([torch.tensor([2.0, 1.9]), torch.linspace(0, 1, 2000)]).to(dtype)
        operator, products = Diagonal(entries), []
        original = operator._matmat
        operator._matmat = lambda columns, p=products, f=original: p.append(1) or f(columns)
        values, vectors = curvhooks.eigenpairs(operator, 1, block_size=1)
        tolerance = torch.finfo(dtype).eps ** 0.5
        residual = (entries[:, None] * vectors - values * vectors).norm()
        assert float(residual) <= 2 * tolerance * 2.0
        torch.testing.assert_close(values, torch.tensor([2.0], dtype=dtype), rtol=tolerance, atol=0)
        counts[dtype] = len(products)
    assert counts[torch.float32] < counts[torch.float64] < 200
