"""Spectra of curvature operators: extreme eigenpairs (``eigenpairs``), the trace (``trace``)
and the spectral density by stochastic Lanczos quadrature (``spectral_density``).

Each product with an operator over a data set is a pass over the data, so every method here
multiplies blocks of vectors at once: block Lanczos for eigenpairs, all probes together for
the density, Hutch++'s three blocks for a trace estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from curvhooks.operators.base import CurvatureOperator

DEFAULT_MAX_MEMORY = 2**30
"""Most bytes the Gram method's factor and Gram matrix may take by default: 1 GiB."""

BREAKDOWN = 1e-10
"""A new Lanczos direction shorter than this times the largest diagonal entry of ``T`` so
far counts as spanned already: the Krylov space is invariant."""
WHICH = ("largest", "smallest")
METHODS = ("auto", "gram", "lanczos")
CONVERGE = ("pairs", "values")


def eigenpairs(
    operator: CurvatureOperator,
    k: int,
    which: str = "largest",
    method: str = "auto",
    *,
    tolerance: float | None = None,
    converge: str = "pairs",
    max_iterations: int | None = None,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest (or smallest) eigenvalues of a symmetric operator and their
    eigenvectors.

    Args:
        operator: A curvature operator (``GGNOperator``, ``HessianOperator``, ...).
        k: How many, ``1 <= k < D``.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        method: ``"gram"``: exact for the GGN and the empirical Fisher, from the eigenpairs
            of the ``R x R`` Gram matrix ``F F^T`` of their square-root factor ``F``
            (``R = C N`` rows for the GGN, ``N`` for the empirical Fisher; one pass over the
            data); ``"lanczos"``: block Lanczos with full re-orthogonalisation, blocks of
            ``block_size`` vectors (default ``k``) per product; ``"auto"``: the Gram method
            where it applies and its factor and Gram matrix fit ``max_memory``, else Lanczos.
        tolerance: Lanczos stops once, for each wanted Ritz pair, ``converge`` is within it
            (default: the square root of the dtype's machine epsilon, 1.5e-8 in float64 and
            3.5e-4 in float32).
        converge: ``"pairs"``: the residual norm ``||A v - theta v||`` relative to the
            largest Ritz value's magnitude (eigenvectors to about that accuracy);
            ``"values"``: the eigenvalue's error bound ``residual^2 / gap`` relative to
            ``|theta|`` (``gap`` the distance to the nearest other Ritz value; the values
            converge in fewer products than the vectors).
        max_iterations: Most Lanczos products (default: until the Krylov space is all of
            ``R^D``).
        block_size: Vectors per Lanczos product.
        max_memory: Bytes the Gram method may take (its factor ``[R, D]`` and Gram matrix).
        seed: Seed of Lanczos's starting block (the global random state is left as it was).

    Returns:
        ``(values, vectors)``: ``[k]`` (largest first for ``"largest"``, smallest first for
        ``"smallest"``) and ``[D, k]`` orthonormal columns, on the operator's device.

    Raises:
        ValueError: For a ``k``, ``which`` or ``method`` out of range, or ``method="gram"``
            where it does not apply or does not fit ``max_memory``.
        RuntimeError: If Lanczos does not converge within ``max_iterations``.
    """
    size = operator.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < size:
        raise ValueError(f"k must be an integer with 1 <= k < D = {size}, got {k!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if converge not in CONVERGE:
        raise ValueError(f"converge must be one of {CONVERGE}, got {converge!r}")
    if method != "lanczos":
        factor = _gram_factor(operator, which, method, max_memory)
        if factor is not None and (method == "gram" or k <= len(factor)):
            return _gram_eigenpairs(factor, k)
    block = block_size or k
    with torch.random.fork_rng(devices=_devices(operator)):
        torch.manual_seed(seed)
        start = torch.randn(size, block, dtype=operator.dtype, device=operator.device)
    if tolerance is None:
        tolerance = torch.finfo(operator.dtype).eps ** 0.5
    criterion = partial(_converged, tolerance=tolerance, values_only=converge == "values")
    return _lanczos_eigenpairs(operator, start, k, which, criterion, max_iterations or size)


def _devices(operator: CurvatureOperator) -> list[torch.device]:
    return [operator.device] if operator.device.type == "cuda" else []


def _gram_factor(
    operator: CurvatureOperator, which: str, method: str, max_memory: int
) -> Tensor | None:
    """The operator's square-root factor for the Gram method, or ``None`` where ``"auto"``
    takes Lanczos instead; raises where ``"gram"`` cannot be had."""
    if which != "largest" and method == "gram":
        raise ValueError(f"method='gram' gives the largest eigenpairs, not the {which}")
    factor = operator.factor(max_memory) if which == "largest" else None
    if factor is None and method == "gram":
        raise ValueError(
            f"method='gram' needs the square-root factor of a GGNOperator "
            f"or an EmpiricalFisherOperator within max_memory={max_memory} bytes (with its "
            f"Gram matrix), from the hooks and in one process; {operator!r} has none there: "
            "raise max_memory or use method='lanczos'"
        )
    return factor


def _gram_eigenpairs(factor: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` eigenpairs of ``F^T F`` from those of ``F F^T`` (``F`` ``[R, D]``):
    the same nonzero eigenvalues, eigenvectors ``F^T u / sqrt(lambda)``."""
    if k > len(factor):
        raise ValueError(
            f"method='gram': the matrix has rank at most {len(factor)} (its factor's rows) "
            f"< k = {k}; ask for fewer eigenpairs or use method='lanczos'"
        )
    values, vectors = torch.linalg.eigh(factor @ factor.T)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    directions = factor.T @ vectors
    return values.clamp(min=0), directions / directions.norm(dim=0)


def _lanczos_eigenpairs(
    operator: CurvatureOperator,
    start: Tensor,
    k: int,
    which: str,
    converged: Callable[[Tensor, Tensor, Tensor], Tensor],
    max_products: int,
) -> tuple[Tensor, Tensor]:
    """Block Lanczos with full re-orthogonalisation from the block ``start`` ``[D, b]``,
    until ``converged(values, residuals, wanted)`` holds for the wanted Ritz pairs."""
    lanczos = BlockLanczos(operator._matmat, start)
    for _ in range(max_products):
        if not lanczos.step():
            break
        values, vectors, residuals = lanczos.ritz()
        order = values.argsort(descending=which == "largest")[:k]
        if len(order) == k and bool(converged(values, residuals, order).all()):
            break
    values, vectors, residuals = lanczos.ritz()
    order = values.argsort(descending=which == "largest")[:k]
    if len(order) < k or not (lanczos.exhausted or converged(values, residuals, order).all()):
        raise RuntimeError(
            f"Lanczos did not converge within {max_products} products; raise max_iterations "
            "or loosen tolerance"
        )
    return values[order], lanczos.combine(vectors[:, order])


def _converged(
    values: Tensor, residuals: Tensor, wanted: Tensor, tolerance: float, values_only: bool
) -> Tensor:
    """Which wanted Ritz pairs are within ``tolerance``: their residuals relative to the
    largest Ritz value, or with ``values_only`` their values' error bounds
    ``residual^2 / gap`` relative to themselves."""
    if not values_only:
        return residuals[wanted] <= tolerance * values.abs().max()
    distances = (values[wanted, None] - values[None]).abs()
    distances[torch.arange(len(wanted)), wanted] = float("inf")
    gaps = distances.min(1).values  # inf with a single Ritz value: not converged
    bounds = residuals[wanted].square() / gaps
    return (bounds <= tolerance * values[wanted].abs()) & gaps.isfinite()


class BlockLanczos:
    """Block Lanczos with full re-orthogonalisation: an orthonormal basis ``Q`` of the block
    Krylov space of ``apply`` from ``start`` ``[D, b]``, and ``T = Q^T A Q`` (block
    tridiagonal), one block of ``b`` products per ``step``."""

    def __init__(self, apply, start: Tensor) -> None:
        self.apply = apply
        first, _ = torch.linalg.qr(start)
        self.blocks = [first]
        self.diagonal: list[Tensor] = []
        self.off_diagonal: list[Tensor] = []
        self.exhausted = False
        self.scale = torch.finfo(start.dtype).tiny
        """The largest magnitude of ``T``'s diagonal blocks so far."""

    def step(self) -> bool:
        """Extend the space by one block; ``False`` once it is invariant (``exhausted``: the
        Ritz pairs are then exact) or all of ``R^D``."""
        if self.exhausted:
            return False
        current = self.blocks[-1]
        product = self.apply(current)  # a fresh tensor, ours to overwrite
        self.diagonal.append(current.T @ product)
        for _ in range(2):  # full re-orthogonalisation, twice for round-off
            for block in self.blocks:  # block by block: Q is never copied whole
                product.addmm_(block, block.T @ product, alpha=-1)
        following, coupling = torch.linalg.qr(product)
        self.scale = max(self.scale, float(self.diagonal[-1].abs().max()))
        keep = coupling.diagonal().abs() > BREAKDOWN * self.scale  # directions not yet spanned
        self.off_diagonal.append(coupling[keep])
        room = len(product) - sum(block.shape[1] for block in self.blocks)
        if not bool(keep.any()) or room == 0:
            self.exhausted = True
        else:
            self.blocks.append(following[:, keep][:, :room])
            self.off_diagonal[-1] = self.off_diagonal[-1][:room]
        return True

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Q @ coefficients`` ``[D, j]`` for ``coefficients`` ``[m, j]``, block by block."""
        result, start = None, 0
        for block in self.blocks[: len(self.diagonal)]:
            rows = coefficients[start : start + block.shape[1]]
            result = block @ rows if result is None else result.addmm_(block, rows)
            start += block.shape[1]
        return result

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values ``[m]``, their vectors in the basis ``[m, m]`` and residual norms
        ``||A Q y - theta Q y||`` ``[m]`` (zero once the space is invariant)."""
        sizes = [block.shape[0] for block in self.diagonal]
        total = sum(sizes)
        matrix = self.diagonal[0].new_zeros(total, total)
        start = 0
        for index, size in enumerate(sizes):
            matrix[start : start + size, start : start + size] = self.diagonal[index]
            if index + 1 < len(sizes):
                coupling = self.off_diagonal[index]  # [size of the next block, size]
                following = slice(start + size, start + size + coupling.shape[0])
                matrix[following, start : start + size] = coupling
                matrix[start : start + size, following] = coupling.T
            start += size
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        if self.exhausted:
            return values, vectors, values.new_zeros(len(values))
        last = self.off_diagonal[-1] @ vectors[-sizes[-1] :]
        return values, vectors, last.norm(dim=0)


class TraceEstimate(NamedTuple):
    """A trace: ``value``, and ``standard_error`` (0 where exact) of an estimate from
    ``products`` matrix-vector products."""

    value: Tensor
    standard_error: Tensor
    products: int

    @property
    def exact(self) -> bool:
        return self.products == 0


def trace(operator: CurvatureOperator, samples: int | None = None, seed: int = 0) -> TraceEstimate:
    """The trace of a curvature operator: exact where its diagonal is had exactly, else a
    Hutch++ estimate with a standard error.

    Exact for the GGN (not Monte-Carlo), the empirical Fisher and ``Kronecker``, from their
    diagonals (one pass over the data), and for the Hessian where ``DiagHessian`` serves the
    model; sums and scalings of such operators too.

    Args:
        operator: The operator.
        samples: Matrix-vector products of the Hutch++ estimate (at least 3; default 99
            where the trace is not exact). Given, the trace is estimated even where it could
            be exact.
        seed: Seed of the estimate's random vectors (the global random state is left as it
            was).

    Returns:
        ``TraceEstimate(value, standard_error, products)``.
    """
    if samples is None:
        exact = operator.exact_trace()
        if exact is not None:
            return TraceEstimate(exact, torch.zeros_like(exact), 0)
        samples = 99
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 3:
        raise ValueError(f"samples must be an integer >= 3, got {samples!r}")
    return _hutch_plus_plus(operator, samples, seed)


def _hutch_plus_plus(operator: CurvatureOperator, samples: int, seed: int) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): the trace on a sketched range exactly, the rest by
    Hutchinson's estimator, with ``samples`` products in three blocks."""
    size, third = operator.shape[0], samples // 3
    with torch.random.fork_rng(devices=_devices(operator)):
        torch.manual_seed(seed)
        sketch, probes = (
            torch.randint(0, 2, (size, third), device=operator.device).to(operator.dtype) * 2 - 1
            for _ in range(2)
        )
    range_basis, _ = torch.linalg.qr(operator._matmat(sketch))
    exact_part = (range_basis * operator._matmat(range_basis)).sum()
    projected = probes - range_basis @ (range_basis.T @ probes)
    terms = (projected * operator._matmat(projected)).sum(0)
    value = exact_part + terms.mean()
    error = terms.std() / math.sqrt(len(terms)) if len(terms) > 1 else torch.zeros_like(value)
    return TraceEstimate(value, error, 3 * third)


def spectral_density(
    operator: CurvatureOperator,
    probes: int = 4,
    steps: int = 64,
    points: int = 1000,
    width: float = 0.01,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The spectral density by stochastic Lanczos quadrature (Ubaru et al. 2017).

    From each of ``probes`` random unit vectors, ``steps`` Lanczos steps (full
    re-orthogonalisation; all probes in one product per step) give nodes (Ritz values) and
    weights (squared first components of the Ritz vectors); the density is their average,
    each node a Gaussian of standard deviation ``width`` times the spectrum's range,
    normalised to integrate to 1 over the grid.

    Args:
        operator: The operator.
        probes: Random starting vectors.
        steps: Lanczos steps per probe (at most D).
        points: Grid points.
        width: The Gaussians' standard deviation, relative to the spectrum's range.
        seed: Seed of the probes (the global random state is left as it was).

    Returns:
        ``(grid, density)``, both ``[points]`` on the CPU in float64: the grid spans the
        nodes with a margin of five standard deviations.
    """
    size = operator.shape[0]
    steps = min(steps, size)
    with torch.random.fork_rng(devices=_devices(operator)):
        torch.manual_seed(seed)
        start = torch.randn(size, probes, dtype=operator.dtype, device=operator.device)
    nodes, weights = _lanczos_quadrature(operator._matmat, start, steps)
    nodes, weights = nodes.double().cpu(), weights.double().cpu()
    spread = max(float(nodes.max() - nodes.min()), float(nodes.abs().max()) * 1e-8, 1e-12)
    sigma = width * spread
    grid = torch.linspace(
        float(nodes.min()) - 5 * sigma, float(nodes.max()) + 5 * sigma, points, dtype=torch.float64
    )
    kernels = torch.exp(-0.5 * ((grid[:, None] - nodes[None]) / sigma) ** 2)
    density = (kernels * weights[None]).sum(1) / (sigma * math.sqrt(2 * math.pi) * probes)
    return grid, density / torch.trapezoid(density, grid)


def _lanczos_quadrature(apply, start: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Lanczos from each column of ``start`` ``[D, P]`` at once, each column against its own
    basis: the Gauss quadrature nodes and weights ``[P * m]`` of every probe's tridiagonal
    matrix (the weights sum to 1 per probe)."""
    current = start / start.norm(dim=0)
    basis, alphas, betas = [current], [], []
    previous, beta = torch.zeros_like(current), current.new_zeros(current.shape[1])
    scale = torch.finfo(start.dtype).tiny
    for step in range(steps):
        product = apply(current)
        alpha = (current * product).sum(0)
        scale = max(scale, float(alpha.abs().max()))
        product = product - alpha * current - beta * previous
        stacked = torch.stack(basis)  # [j, D, P]
        for _ in range(2):  # full re-orthogonalisation, twice for round-off
            coefficients = torch.einsum("jdp,dp->jp", stacked, product)
            product = product - torch.einsum("jdp,jp->dp", stacked, coefficients)
        alphas.append(alpha)
        beta = product.norm(dim=0)
        if step + 1 == steps or bool((beta <= BREAKDOWN * scale).any()):
            break  # a probe's Krylov space is invariant: every probe stops here
        betas.append(beta)
        previous, current = current, product / beta
        basis.append(current)
    matrix = torch.diag_embed(torch.stack(alphas, dim=1))  # [P, m, m]
    if betas:
        off = torch.stack(betas, dim=1)
        matrix = matrix + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    values, vectors = torch.linalg.eigh(matrix)
    return values.flatten(), vectors[:, 0, :].square().flatten()
