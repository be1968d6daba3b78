"""The Kronecker operator (KFAC, EKFAC) against its dense matrix, formed independently."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from curvhooks.extensions.gram import Gram, weighted_sum
from curvhooks.operators.kronecker import Factor, Kronecker, eigenbases
from tests.problems import assert_close

SHAPES = {"weight": [3, 4], "conv": [2, 3, 2, 2], "bias": [3]}
"""Weights with O != I (3 x 4, 2 x 12), so that a transposed reshape or factor shows."""

KINDS = ("kfac", "kfac_singular", "kfac_thin", "kfac_mixed", "ekfac", "ekfac_bases")
"""KFAC; KFAC with a rank-5 input factor [12, 12]; KFAC with every factor of side n given as a
``Gram`` of a root of n // 2 rows; KFAC with one ``Gram`` factor per weight (A of "weight",
B of "conv"); EKFAC in the factors' eigh basis; EKFAC in given random orthogonal bases."""
SINGULAR = ("kfac_singular", "kfac_thin", "kfac_mixed")


def _spd(size: int, generator: torch.Generator, rank: int | None = None) -> Tensor:
    """``M M^T + 0.1 I``, or ``M M^T`` of rank ``rank`` (positive semi-definite)."""
    M = torch.randn(size, rank or size, generator=generator, dtype=torch.float64)
    return M @ M.T + (0.1 * torch.eye(size, dtype=torch.float64) if rank is None else 0)


def _formed(factor: Factor) -> Tensor:
    """A factor as a matrix, formed here from a ``Gram``'s root."""
    return factor.root.T @ factor.root if isinstance(factor, Gram) else factor


def _orthogonal(size: int, generator: torch.Generator) -> Tensor:
    M = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(M).Q


def _factor(side: int, generator: torch.Generator, kind: str, name: str, index: int) -> Factor:
    thin_here = {"weight": index == 1, "conv": index == 0, "bias": False}[name]
    if kind == "kfac_thin" or (kind == "kfac_mixed" and thin_here):
        root = torch.randn(side // 2, side, generator=generator, dtype=torch.float64)
        return Gram(root)
    rank = 5 if kind == "kfac_singular" and name == "conv" and index == 1 else None
    return _spd(side, generator, rank)


def _problem(kind: str) -> tuple[Kronecker, Tensor, dict]:
    """The operator, its dense ``[D, D]`` matrix built from ``torch.kron``, and its factors
    (as given to the operator)."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES.values()]
    factors = {}
    for name, p in zip(SHAPES, params):
        sides = [p.shape[0]] + ([p[0].numel()] if p.dim() > 1 else [])
        factors[name] = tuple(_factor(s, generator, kind, name, i) for i, s in enumerate(sides))
    if kind.startswith("kfac"):
        K = Kronecker(factors, params, list(SHAPES))
        dense = [tuple(map(_formed, f)) for f in factors.values()]
        blocks = [torch.kron(*f) if len(f) == 2 else f[0] for f in dense]
        return K, torch.block_diag(*blocks), factors
    if kind == "ekfac":
        bases = {
            n: tuple(torch.linalg.eigh(f).eigenvectors for f in fs) for n, fs in factors.items()
        }
    else:
        bases = {
            n: tuple(_orthogonal(f.shape[0], generator) for f in fs) for n, fs in factors.items()
        }
    corrected = {
        name: torch.rand(*[q.shape[0] for q in qs], generator=generator, dtype=torch.float64) + 0.1
        for name, qs in bases.items()
    }
    given = bases if kind == "ekfac_bases" else None
    K = Kronecker(factors, params, list(SHAPES), corrected=corrected, eigenbases=given)
    blocks = []
    for name, qs in bases.items():
        Q = torch.kron(*qs) if len(qs) == 2 else qs[0]
        blocks.append(Q @ torch.diag(corrected[name].flatten()) @ Q.T)
    return K, torch.block_diag(*blocks), factors


def _vectors(size: int, columns: int | None) -> Tensor:
    shape = [size] if columns is None else [size, columns]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("columns", [None, 2], ids=["vector", "matrix"])
@pytest.mark.parametrize("kind", KINDS)
def test_matmul_and_to_dense(kind, columns):
    K, dense, _ = _problem(kind)
    v = _vectors(dense.shape[0], columns)
    assert_close(K.to_dense(), dense)
    assert_close(K @ v, dense @ v)


@pytest.mark.parametrize("kind", KINDS)
def test_matmul_of_strided_columns_and_through_autograd(kind):
    """``@`` takes any layout (a transposed matrix, a column slice) and passes gradients
    back to ``v``, as does the inverse's."""
    K, dense, _ = _problem(kind)
    matrix = _vectors(dense.shape[0], 4)
    for v in (matrix.T.contiguous().T, matrix[:, 1:3]):
        assert_close(K @ v, dense @ v)
    v = matrix.clone().requires_grad_()
    weights = _vectors(dense.shape[0], 4)
    ((K @ v) * weights).sum().backward()
    assert_close(v.grad, dense.T @ weights)
    v.grad = None
    inverse = K.inverse(0.5)
    ((inverse @ v) * weights).sum().backward()
    assert_close(v.grad, inverse.to_dense().T @ weights)


@pytest.mark.parametrize("damping", [0.1, 1.0])
@pytest.mark.parametrize("kind", KINDS)
def test_inverse(kind, damping):
    K, dense, _ = _problem(kind)
    identity = torch.eye(dense.shape[0], dtype=torch.float64)
    inverse = K.inverse(damping)
    assert_close(inverse.to_dense(), torch.linalg.inv(dense + damping * identity))
    for v in (_vectors(dense.shape[0], None), _vectors(dense.shape[0], 3)):
        assert_close(inverse @ (K @ v + damping * v), v)


@pytest.mark.parametrize("zero_output_factor", [False, True], ids=["pi", "fallback"])
@pytest.mark.parametrize("kind", ["kfac", "kfac_singular", "kfac_thin", "kfac_mixed"])
def test_inverse_heuristic(kind, zero_output_factor):
    """π-damping written out; a zero ``B`` (mean eigenvalue 0) falls back to plain damping."""
    _, _, factors = _problem(kind)
    if zero_output_factor:
        factors["weight"] = (torch.zeros(3, 3, dtype=torch.float64), factors["weight"][1])
    K = Kronecker(factors, [torch.zeros(s) for s in SHAPES.values()], list(SHAPES))
    damping = 0.1
    blocks = []
    for B, *rest in (tuple(map(_formed, f)) for f in factors.values()):
        shift_b = shift_a = damping
        if rest and B.trace() > 0:
            pi = ((rest[0].trace() / rest[0].shape[0]) / (B.trace() / B.shape[0])).sqrt()
            shift_b, shift_a = damping**0.5 / pi, damping**0.5 * pi
        blocks.append(torch.linalg.inv(B + shift_b * torch.eye(B.shape[0], dtype=B.dtype)))
        if rest:
            A = rest[0]
            A_inverse = torch.linalg.inv(A + shift_a * torch.eye(A.shape[0], dtype=A.dtype))
            blocks[-1] = torch.kron(blocks[-1], A_inverse)
    expected = torch.block_diag(*blocks)
    inverse = K.inverse(damping, heuristic=True)
    v = _vectors(expected.shape[0], 2)
    assert_close(inverse.to_dense(), expected)
    assert_close(inverse @ v, expected @ v)


REDUCTIONS = {
    "trace": torch.trace,
    "logdet": lambda dense: torch.linalg.slogdet(dense).logabsdet,
    "frobenius_norm": torch.linalg.matrix_norm,
    "diag": torch.diagonal,
}


@pytest.mark.parametrize(
    "kind, reduction",
    [(k, r) for k in KINDS for r in REDUCTIONS if k not in SINGULAR or r != "logdet"],
)
def test_reductions(kind, reduction):
    """The singular problems' log-determinants (-inf, or round-off) are left out."""
    K, dense, _ = _problem(kind)
    assert_close(getattr(K, reduction)(), REDUCTIONS[reduction](dense))


def test_thin_factors_inverse_and_logdet_without_forming():
    """Exact damping and the log-determinant of thin factors come from the SVD of their roots:
    nothing is formed; a thin factor is singular."""
    K, dense, _ = _problem("kfac_thin")
    inverse = K.inverse(0.1)
    identity = torch.eye(dense.shape[0], dtype=torch.float64)
    assert_close(inverse.to_dense(), torch.linalg.inv(dense + 0.1 * identity))
    assert K.logdet() == -float("inf")
    assert all(isinstance(f, Gram) for fs in K._factors.values() for f in fs)


def test_thin_factors_formed_once():
    """``factors`` forms the ``Gram`` factors, and the operator then uses the formed ones."""
    K, dense, given = _problem("kfac_thin")
    formed = K.factors
    assert not any(isinstance(f, Gram) for fs in formed.values() for f in fs)
    for name, fs in given.items():
        for got, factor in zip(formed[name], fs):
            assert_close(got, _formed(factor))
    v = _vectors(dense.shape[0], 3)
    assert_close(K @ v, dense @ v)


@pytest.mark.parametrize("rows", [(1, 2), (3, 3)], ids=["stays-thin", "formed"])
@pytest.mark.parametrize("total_formed", [False, True], ids=["gram", "tensor"])
@pytest.mark.parametrize("part_formed", [False, True], ids=["gram", "tensor"])
def test_weighted_sum(rows, total_formed, part_formed):
    """``keep * total + add * part`` for factors of side 6: two roots of 1 and 2 rows stay a
    thin ``Gram`` (3 <= 6 / 2), of 3 and 3 rows are formed, as is anything with a tensor; a
    formed ``part`` is left as it was."""
    generator = torch.Generator().manual_seed(0)
    roots = [torch.randn(r, 6, generator=generator, dtype=torch.float64) for r in rows]
    total, part = (
        r.T @ r if formed else Gram(r) for r, formed in zip(roots, (total_formed, part_formed))
    )
    expected = 0.3 * _formed(total) + 2.0 * _formed(part)
    part_before = _formed(part).clone()
    result = weighted_sum(total, part, 0.3, 2.0)
    assert isinstance(result, Gram) == (rows == (1, 2) and not total_formed and not part_formed)
    assert_close(_formed(result), expected)
    assert torch.equal(_formed(part), part_before)
    assert_close(_formed(weighted_sum(None, Gram(roots[1]), 0.3, 2.0)), 2.0 * roots[1].T @ roots[1])


def test_eigenbases_diagonalize():
    _, _, factors = _problem("kfac")
    for fs in factors.values():
        for f, Q in zip(fs, eigenbases(fs)):
            rotated = Q.T @ f @ Q
            assert_close(rotated, torch.diag(rotated.diagonal()))


@pytest.mark.parametrize("damping", [0.0, -1.0])
def test_errors(damping):
    K, _, factors = _problem("ekfac")
    with pytest.raises(ValueError, match="damping must be positive"):
        K.inverse(damping)
    with pytest.raises(ValueError, match="KFAC factors only"):
        K.inverse(1.0, heuristic=True)
    params = [torch.zeros(s) for s in SHAPES.values()]
    swapped = {**factors, "weight": factors["weight"][::-1]}
    with pytest.raises(ValueError, match="factors of 'weight'"):
        Kronecker(swapped, params, list(SHAPES))
    with pytest.raises(ValueError, match="pass both"):
        Kronecker(factors, params, list(SHAPES), eigenbases={})


def test_exact_blocks_must_fit_their_parameters():
    _, _, factors = _problem("kfac")
    params = [torch.zeros(s) for s in SHAPES.values()]
    name, param = next(iter(SHAPES.items()))
    rest = {n: f for n, f in factors.items() if n != name}
    size = math.prod(param)
    with pytest.raises(ValueError, match=rf"others\['{name}'\].*expected \[{size}\]"):
        Kronecker(rest, params, list(SHAPES), others={name: torch.ones(size + 1)})
    with pytest.raises(ValueError, match="others must name parameters"):
        Kronecker(factors, params, list(SHAPES), others={"nothing": torch.ones(1)})
    with pytest.raises(ValueError, match="factors must have one entry per name"):
        Kronecker(factors, params, list(SHAPES), others={name: torch.ones(size)})
