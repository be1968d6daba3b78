"""Kronecker-factored curvature (KFAC, EKFAC) as a block-diagonal operator, one block per
parameter, never formed as a ``[D, D]`` matrix unless asked for.

Conventions, for a weight ``p`` of shape ``[O, *rest]`` seen as ``P = p.reshape(O, I)``:
its factors are ``(B, A)``, ``B`` ``[O, O]`` and ``A`` ``[I, I]`` symmetric positive
semi-definite, and its block is ``torch.kron(B, A)`` acting on ``p.flatten()`` (row-major,
index ``o * I + i``), i.e. ``P -> B P A``. A 1-D parameter (a bias) has factors ``(B,)`` and
block ``B``. Every block, and every inverse, is applied factor by factor along the axes of
``P``: ``kron(M, N) vec(P) = vec(M P N^T)``.

Parameters without Kronecker structure (norm layers, embeddings) may have exact blocks
instead (``others``): a diagonal ``[n]`` or a dense ``[n, n]`` block for ``p.flatten()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvhooks.extensions.gram import Gram, formed
from curvhooks.operators.base import CurvatureOperator

Factor = Tensor | Gram
"""A Kronecker factor, formed or kept as the root of its Gram matrix."""


def factor_sides(param: Tensor) -> tuple[int, ...]:
    """The sides of a parameter's Kronecker factors: ``(O, I)`` for ``[O, *rest]`` (``I =
    prod(rest)``), ``(O,)`` for a 1-D one."""
    return (param.shape[0],) if param.dim() == 1 else (param.shape[0], math.prod(param.shape[1:]))


def eigenbases(factors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The eigenvectors of each Kronecker factor, by ``torch.linalg.eigh``.

    Compute EKFAC's corrected eigenvalues in this basis and pass it as ``eigenbases=`` to
    :class:`Kronecker`, so that both use the same one (eigenvectors are not unique).

    Args:
        factors: ``(B, A)`` or ``(B,)``, symmetric ``[O, O]`` and ``[I, I]``.

    Returns:
        ``(Q_B, Q_A)`` or ``(Q_B,)``, orthogonal, eigenvectors in columns:
        ``B = Q_B diag(.) Q_B^T``.
    """
    return tuple(torch.linalg.eigh(factor).eigenvectors for factor in factors)


def _kron_apply(mats: tuple[Factor, ...], x: Tensor, out: Tensor | None = None) -> Tensor:
    """``kron(*mats) @ x`` for ``x`` ``[O' * I', k]`` (or ``[O', k]`` for one matrix, ``x``
    itself for none), as ``M P N^T`` for each column's ``P`` ``[O', I']`` (``M``
    ``[O, O']``, ``N`` ``[I, I']``), without forming the Kronecker product; written into
    ``out`` (``[O * I, k]``) if given.

    A thin ``Gram`` acts through its root ``R`` (``R^T (R P)``), projecting first: with ``M``
    thin, ``P`` shrinks to ``[r, I]`` by one matrix product before ``N`` acts by batched
    products over its r rows, and the last product is written into ``out``; else ``N`` acts
    by one product over the rows of all columns' ``P`` (before ``M`` if ``N`` is thin)."""
    k = x.shape[-1]
    if out is None:
        out = x.new_empty(math.prod(m.shape[0] for m in mats) if mats else len(x), k)
    if len(mats) < 2:
        return out.copy_(mats[0] @ x if mats else x)
    left, right = mats
    (size, size_in), (inputs, inputs_in) = left.shape, right.shape
    columns = x.reshape(size_in, inputs_in, k)
    if isinstance(left, Gram):
        projected = (left.root @ columns.view(size_in, -1)).view(-1, inputs_in, k)  # [r, I, k]
        mixed = right @ projected  # a Gram through its root
        _matmul_into(left.root.T, mixed.view(len(mixed), -1), out.view(size, -1))
    else:  # N acts on all O' rows and k columns at once, as rows [O' k, I'] (copied)
        rows = columns.transpose(1, 2).reshape(-1, inputs_in)
        projected = rows @ (right.root.T if isinstance(right, Gram) else right.T)
        mixed = (left @ projected.view(size_in, -1)).view(size * k, -1)  # [O k, r or I]
        if isinstance(right, Gram):
            mixed = mixed @ right.root
        out.view(size, inputs, k).copy_(mixed.view(size, k, inputs).transpose(1, 2))
    return out


def _matmul_into(first: Tensor, second: Tensor, out: Tensor) -> None:
    """Write ``first @ second`` into ``out``: by ``matmul(out=)``, or where autograd records
    (which ``out=`` does not support) by copying the product."""
    if torch.is_grad_enabled() and (first.requires_grad or second.requires_grad):
        out.copy_(first @ second)
    else:
        torch.matmul(first, second, out=out)


def _eigen_apply(
    bases: tuple[Tensor, ...], values: Tensor, x: Tensor, out: Tensor, rest: float | None = None
) -> Tensor:
    """``Q diag(values.flatten()) Q^T @ x`` with ``Q = kron(*bases)``, into ``out``: rotate
    into the eigenbasis, scale, rotate back. Bases with fewer columns than rows span part of
    the space only; ``rest`` is then the eigenvalue on the rest of it."""
    rotated = _kron_apply(tuple(basis.T for basis in bases), x)
    if rest is None:
        return _kron_apply(bases, rotated.mul_(values.reshape(-1, 1)), out)
    spanned = _kron_apply(bases, rotated.mul_((values - rest).reshape(-1, 1)))
    return out.copy_(spanned.add_(x, alpha=rest))


def _eigen_dense(bases: tuple[Tensor, ...], values: Tensor, rest: float | None = None) -> Tensor:
    """``Q diag(values.flatten()) Q^T`` (plus ``rest`` on the rest of the space, see
    ``_eigen_apply``) with ``Q = kron(*bases)``, formed."""
    if not bases:
        return torch.diag(values)
    basis = bases[0] if len(bases) == 1 else torch.kron(*(b.contiguous() for b in bases))
    if rest is None:
        return (basis * values.flatten()) @ basis.T
    identity = torch.eye(len(basis), dtype=basis.dtype, device=basis.device)
    return (basis * (values - rest).flatten()) @ basis.T + rest * identity


def _decomposition(factor: Factor) -> tuple[Tensor, Tensor]:
    """Eigenvectors (columns) and eigenvalues clamped at 0 of a factor; of a thin ``Gram``
    those of its nonzero part only (``[n, r]``, ``[r]``, from a QR decomposition of its root
    and the SVD of the ``[r, r]`` triangle): the rest of the space has eigenvalue 0."""
    if isinstance(factor, Gram):  # R^T = Q T, so R^T R = Q T T^T Q^T, and T = U S W^T
        orthonormal, triangle = torch.linalg.qr(factor.root.T)  # (LAPACK's SVD of a wide R
        left, singular, _ = torch.linalg.svd(triangle)  # can take minutes at 32 x 16384)
        return orthonormal @ left, singular.square()
    decomposition = torch.linalg.eigh(factor)
    return decomposition.eigenvectors, decomposition.eigenvalues.clamp(min=0)


def _check_damping(damping: float) -> None:
    """Raise unless ``damping > 0``."""
    if not damping > 0:
        raise ValueError(
            f"damping must be positive, got {damping}: the undamped inverse of a singular "
            "factor is not defined. Pass damping > 0."
        )


class _BlockDiagonal(CurvatureOperator):
    """A block-diagonal ``[D, D]`` operator over the flattened, concatenated parameters;
    subclasses say how block ``index`` multiplies ``[n, k]`` (into ``out``) and how it is
    formed."""

    _sizes: list[int]

    def _block_matmul(self, index: int, x: Tensor, out: Tensor) -> None:
        raise NotImplementedError

    def _block_dense(self, index: int) -> Tensor:
        raise NotImplementedError

    def _sample(self) -> Tensor:
        """A tensor of the operator's dtype and device (its parameters may have others:
        only their shapes are used)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self._sample().dtype

    @property
    def device(self) -> torch.device:
        return self._sample().device

    def _matmat(self, columns: Tensor) -> Tensor:
        result = torch.empty_like(columns)
        start = 0
        for index, rows in enumerate(self._sizes):  # narrow views, which autograd may write
            self._block_matmul(index, columns.narrow(0, start, rows), result.narrow(0, start, rows))
            start += rows
        return result

    def to_dense(self) -> Tensor:
        """The ``[D, D]`` block-diagonal matrix, formed block by block."""
        return torch.block_diag(*(self._block_dense(i) for i in range(len(self._sizes))))


class Kronecker(_BlockDiagonal):
    """KFAC, or EKFAC when ``corrected`` is given: one Kronecker block per parameter, or an
    exact block for the parameters in ``others``.

    Args:
        factors: Parameter name -> ``(B, A)`` for a parameter ``[O, *rest]`` with at least
            two dimensions (``A`` ``[I, I]``, ``I = prod(rest)``), ``(B,)`` for a 1-D one;
            symmetric positive semi-definite, all of one dtype and device (the operator's);
            each a tensor or a ``Gram`` of its root (formed only where needed: products use
            the root). One entry per name not in ``others``.
        params: The parameters, in the order of the operator's rows (only shapes are used).
        names: ``names[k]`` is the name of ``params[k]``, its key in the dicts.
        corrected: EKFAC: name -> eigenvalues ``E`` in the eigenbasis of the factors,
            ``[O, I]`` for a weight (block ``(Q_B ⊗ Q_A) diag(E.flatten()) (Q_B ⊗ Q_A)^T``),
            ``[O]`` for a bias (block ``Q_B diag(E) Q_B^T``); one per entry of ``factors``.
        eigenbases: With ``corrected`` only: name -> ``(Q_B, Q_A)`` or ``(Q_B,)``, the basis
            in which ``corrected`` was computed (see :func:`eigenbases`); by default that of
            ``torch.linalg.eigh`` of the factors.
        others: Name -> the exact block of a parameter without Kronecker factors, for
            ``p.flatten()`` of ``n`` entries: its diagonal ``[n]`` (nonnegative) or the dense
            symmetric positive semi-definite ``[n, n]`` block.

    Raises:
        ValueError: If names, factors, corrected eigenvalues or bases do not match the
            parameters, or ``eigenbases`` is given without ``corrected``.

    Eigendecompositions of the factors are computed once, when first needed. Eigenvalues of
    the factors are clamped at 0 from below (round-off makes them slightly negative) wherever
    they are used: in ``logdet`` and ``inverse``.
    """

    def __init__(
        self,
        factors: dict[str, tuple[Factor, ...]],
        params: list[Tensor],
        names: list[str],
        corrected: dict[str, Tensor] | None = None,
        eigenbases: dict[str, tuple[Tensor, ...]] | None = None,
        others: dict[str, Tensor] | None = None,
    ) -> None:
        if len(names) != len(params):
            raise ValueError(f"got {len(names)} names for {len(params)} params; pass one each.")
        others = others or {}
        if set(others) - set(names):
            raise ValueError(f"others must name parameters: {sorted(set(others) - set(names))}.")
        kronecker = [name for name in names if name not in others]
        _check_keys("factors", factors, kronecker)
        if eigenbases is not None and corrected is None:
            raise ValueError("eigenbases= is the basis of corrected=; pass both or neither.")
        if corrected is not None:
            _check_keys("corrected", corrected, kronecker)
        if eigenbases is not None:
            _check_keys("eigenbases", eigenbases, kronecker)
        self.params = list(params)
        self.names = list(names)
        self._factors = {name: tuple(factors[name]) for name in kronecker}
        self.corrected = None if corrected is None else {n: corrected[n] for n in kronecker}
        self.others = {name: others[name] for name in names if name in others}
        """Name -> the exact block of a parameter without Kronecker factors: ``[n]`` (its
        diagonal) or ``[n, n]``."""
        self._sizes = [param.numel() for param in params]
        self._bases = {} if eigenbases is None else {n: tuple(eigenbases[n]) for n in kronecker}
        self._values: dict[str, tuple[Tensor, ...]] = {}
        self._spectra: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {}
        for name, param in zip(names, params):
            self._check_block(name, param)

    def _check_block(self, name: str, param: Tensor) -> None:
        """Raise unless the factors (and corrected eigenvalues, bases), or the exact block,
        fit ``param``."""
        if name in self.others:
            shape = list(self.others[name].shape)
            if shape not in ([param.numel()], [param.numel()] * 2):
                raise ValueError(
                    f"others[{name!r}] for a parameter of {param.numel()} entries: expected "
                    f"[{param.numel()}] or [{param.numel()}, {param.numel()}], got {shape}."
                )
            return
        if param.dim() == 0:
            raise ValueError(f"{name!r} is a scalar; Kronecker blocks need 1-D or more.")
        sides = factor_sides(param)
        shapes = [[side, side] for side in sides]
        got = [list(factor.shape) for factor in self._factors[name]]
        if got != shapes:
            raise ValueError(f"factors of {name!r} {list(param.shape)}: expected {shapes}, {got=}.")
        if name in self._bases and [list(q.shape) for q in self._bases[name]] != shapes:
            raise ValueError(f"eigenbases of {name!r}: expected shapes {shapes}.")
        if self.corrected is not None and list(self.corrected[name].shape) != list(sides):
            got = list(self.corrected[name].shape)
            raise ValueError(f"corrected of {name!r}: expected {list(sides)}, {got=}.")

    @property
    def factors(self) -> dict[str, tuple[Tensor, ...]]:
        """Parameter name -> ``(B, A)`` or ``(B,)``, formed (those kept as thin roots are
        formed here, once); the parameters in ``others`` have none."""
        return {name: self._formed(name) for name in self._factors}

    def _formed(self, name: str) -> tuple[Tensor, ...]:
        """``name``'s factors, formed once where kept as thin roots."""
        if any(isinstance(factor, Gram) for factor in self._factors[name]):
            self._factors[name] = tuple(map(formed, self._factors[name]))
        return self._factors[name]

    def _eigen(self, name: str) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The eigenbasis of ``name``'s block (given, or the factors' eigenvectors) and the
        factors' eigenvalues clamped at 0 (none where the basis was given); computed once."""
        if name not in self._bases:
            decompositions = [_decomposition(factor) for factor in self._formed(name)]
            self._bases[name] = tuple(basis for basis, _ in decompositions)
            self._values[name] = tuple(values for _, values in decompositions)
        return self._bases[name], self._values.get(name, ())

    def _spectrum(self, name: str) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """KFAC: ``_eigen`` where the factors are formed; a factor kept as a thin root gives
        only the eigenvectors of its nonzero eigenvalues (see ``_decomposition``), and stays
        thin. Computed once."""
        if name in self._bases or not any(isinstance(f, Gram) for f in self._factors[name]):
            return self._eigen(name)
        if name not in self._spectra:
            decompositions = [_decomposition(factor) for factor in self._factors[name]]
            self._spectra[name] = tuple(zip(*decompositions))
        return self._spectra[name]

    def _sample(self) -> Tensor:
        if self.others:
            return next(iter(self.others.values()))
        factor = self._factors[self.names[0]][0]
        return factor.root if isinstance(factor, Gram) else factor

    def _block_matmul(self, index: int, x: Tensor, out: Tensor) -> None:
        name = self.names[index]
        if name in self.others:
            _exact_apply(self.others[name], x, out)
        elif self.corrected is None:
            _kron_apply(self._factors[name], x, out)
        else:
            _eigen_apply(self._eigen(name)[0], self.corrected[name], x, out)

    def _block_dense(self, index: int) -> Tensor:
        name = self.names[index]
        if name in self.others:
            block = self.others[name]
            return torch.diag(block) if block.dim() == 1 else block
        if self.corrected is None:
            factors = self._formed(name)
            return factors[0] if len(factors) == 1 else torch.kron(*factors)
        return _eigen_dense(self._eigen(name)[0], self.corrected[name])

    def inverse(self, damping: float, heuristic: bool = False) -> KroneckerInverse:
        """``(K + damping I)^{-1}``, block by block, from the eigendecompositions.

        Exact damping: a weight's block maps ``P`` to
        ``Q_B [(Q_B^T P Q_A) / (λ_B λ_A^T + damping)] Q_A^T`` (EKFAC: ``E`` in place of
        ``λ_B λ_A^T``), a bias's ``b`` to ``Q_B [(Q_B^T b) / (λ_B + damping)]``.

        ``heuristic=True``: Martens & Grosse's π-damping (curvlinops'
        ``use_heuristic_damping=True``, without its ``min_damping`` floor): a weight's block is
        ``(B + sqrt(damping) / π I)^{-1} ⊗ (A + sqrt(damping) π I)^{-1}`` with
        ``π = sqrt((tr(A) / I) / (tr(B) / O))``, or ``(B + damping I)^{-1} ⊗
        (A + damping I)^{-1}`` where either mean trace is not positive; a bias's is
        ``(B + damping I)^{-1}``.

        An exact block (``others``) is damped exactly: ``(diag + damping)^{-1}``, or by its
        eigendecomposition.

        Args:
            damping: Added to the diagonal; must be positive.
            heuristic: Whether to use π-damping (KFAC factors only).

        Returns:
            The inverse, an operator with ``@`` and ``to_dense()``.

        Raises:
            ValueError: If ``damping <= 0``, or ``heuristic`` is asked of EKFAC.
        """
        _check_damping(damping)
        if heuristic and self.corrected is not None:
            raise ValueError(
                "heuristic (π) damping applies to KFAC factors only, not to EKFAC's corrected "
                "eigenvalues; use heuristic=False."
            )
        bases, scales, rests = [], [], []
        for name in self.names:
            if name in self.others:
                basis, values = _exact_spectrum(self.others[name])
                bases.append(basis)
                scales.append(1 / (values + damping))
                rests.append(None)
                continue
            exact_kfac = self.corrected is None and not heuristic
            basis, values = self._spectrum(name) if exact_kfac else self._eigen(name)
            if self.corrected is not None:
                scale = 1 / (self.corrected[name] + damping)
            elif len(values) == 1:
                scale = 1 / (values[0] + damping)
            elif not heuristic:
                scale = 1 / (torch.outer(*values) + damping)
            else:
                shift_b, shift_a = _pi_shifts(self._factors[name], damping)
                scale = 1 / torch.outer(values[0] + shift_b, values[1] + shift_a)
            thin = any(q.shape[1] < q.shape[0] for q in basis)
            bases.append(basis)
            scales.append(scale)
            rests.append(1 / damping if thin else None)
        return KroneckerInverse(self.params, bases, scales, rests)

    def exact_trace(self) -> Tensor:
        return self.trace()

    def __repr__(self) -> str:
        kind = "KFAC" if self.corrected is None else "EKFAC"
        blocks = f"blocks={len(self.names)}: {len(self._factors)} Kronecker-factored"
        if self.others:
            dense = sum(block.dim() == 2 for block in self.others.values())
            diagonal = len(self.others) - dense
            blocks += f", {len(self.others)} exact ({diagonal} diagonal, {dense} dense)"
        where = f"dtype={self.dtype}, device={self.device}"
        return f"{type(self).__name__}({kind}, D={self.shape[0]}, {blocks}, {where})"

    def trace(self) -> Tensor:
        """``tr(K)`` (0-dim): ``Σ tr(B) tr(A)`` over blocks (EKFAC: ``Σ E``), plus the
        exact blocks' traces."""
        exact = sum(_exact_diagonal(block).sum() for block in self.others.values())
        if self.corrected is not None:
            return exact + sum(values.sum() for values in self.corrected.values())
        factors = self._factors.values()
        return exact + sum(math.prod(f.trace() for f in parts) for parts in factors)

    def logdet(self) -> Tensor:
        """``log det(K)`` (0-dim): ``Σ I logdet(B) + O logdet(A)`` over blocks from the
        eigenvalues clamped at 0 (EKFAC: ``Σ log E``), plus the exact blocks' (from their
        eigenvalues clamped at 0); ``-inf`` where K is singular."""
        total = sum(_exact_spectrum(block)[1].log().sum() for block in self.others.values())
        if self.corrected is not None:
            return total + sum(values.log().sum() for values in self.corrected.values())
        for name, param in zip(self.names, self.params):
            if name in self.others:
                continue
            for values, side in zip(self._spectrum(name)[1], factor_sides(param)):
                if values.numel() < side:  # a thin factor: singular
                    return values.new_tensor(-math.inf).sum()
                total = total + param.numel() // side * values.log().sum()
        return total

    def frobenius_norm(self) -> Tensor:
        """``||K||_F`` (0-dim): ``sqrt(Σ ||B||_F^2 ||A||_F^2)`` over blocks (EKFAC:
        ``sqrt(Σ E^2)``), the exact blocks' squared entries added."""
        exact = sum(block.square().sum() for block in self.others.values())
        if self.corrected is not None:
            return (exact + sum(values.square().sum() for values in self.corrected.values())).sqrt()
        factors = self._factors.values()
        return (exact + sum(math.prod(_squared_norm(f) for f in parts) for parts in factors)).sqrt()

    def diag(self) -> Tensor:
        """The diagonal ``[D]``: per weight ``outer(diag B, diag A).flatten()``, per bias
        ``diag B`` (EKFAC: ``(Q_B^2 @ E @ (Q_A^2)^T).flatten()``, ``Q_B^2 @ E``); the exact
        blocks' diagonals."""
        parts = []
        for name in self.names:
            if name in self.others:
                parts.append(_exact_diagonal(self.others[name]))
                continue
            if self.corrected is None:
                diagonals = [factor.diagonal() for factor in self._factors[name]]
                parts.append(diagonals[0] if len(diagonals) == 1 else torch.outer(*diagonals))
                continue
            bases = self._eigen(name)[0]
            values = self.corrected[name].reshape(bases[0].shape[0], -1)
            squared = bases[0].square() @ values
            parts.append(squared if len(bases) == 1 else squared @ bases[1].square().T)
        return torch.cat([part.flatten() for part in parts])


class KroneckerInverse(_BlockDiagonal):
    """A block-diagonal operator with blocks ``Q diag(s.flatten()) Q^T``, ``Q = Q_B ⊗ Q_A``
    (or ``Q_B``), plus ``rest`` times the projection onto the complement of ``Q``'s columns
    where ``Q`` has fewer columns than rows: the damped inverse of a :class:`Kronecker` (see
    ``Kronecker.inverse``).

    Args:
        params: The parameters, in the order of the operator's rows.
        bases: Per parameter, ``(Q_B, Q_A)`` or ``(Q_B,)``, orthonormal columns: ``[O, O]``,
            ``[I, I]`` or fewer columns; ``()`` for the identity (a diagonal block).
        scales: Per parameter, the inverse's eigenvalues ``s`` on ``Q``'s columns, one per
            column of each basis: ``[., .]`` or ``[.]``.
        rests: Per parameter, the eigenvalue on the rest of the space, or ``None`` where the
            bases are square (default: all ``None``).
    """

    def __init__(
        self,
        params: list[Tensor],
        bases: list[tuple[Tensor, ...]],
        scales: list[Tensor],
        rests: list[float | None] | None = None,
    ) -> None:
        self.params = params
        self.bases = bases
        self.scales = scales
        self.rests = [None] * len(scales) if rests is None else rests
        self._sizes = [param.numel() for param in params]

    def _sample(self) -> Tensor:
        return self.scales[0]

    def __repr__(self) -> str:
        where = f"dtype={self.dtype}, device={self.device}"
        return f"{type(self).__name__}(D={self.shape[0]}, blocks={len(self.scales)}, {where})"

    def _block_matmul(self, index: int, x: Tensor, out: Tensor) -> None:
        _eigen_apply(self.bases[index], self.scales[index], x, out, self.rests[index])

    def _block_dense(self, index: int) -> Tensor:
        return _eigen_dense(self.bases[index], self.scales[index], self.rests[index])


def _exact_apply(block: Tensor, x: Tensor, out: Tensor) -> None:
    """An exact block (a diagonal ``[n]`` or ``[n, n]``) times ``x`` ``[n, k]``, into
    ``out``."""
    if block.dim() == 1:
        out.copy_(x * block[:, None])
    else:
        _matmul_into(block, x, out)


def _exact_diagonal(block: Tensor) -> Tensor:
    """An exact block's diagonal ``[n]``."""
    return block if block.dim() == 1 else block.diagonal()


def _exact_spectrum(block: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """An exact block's eigenbasis (none for a diagonal: the identity) and its eigenvalues
    clamped at 0."""
    if block.dim() == 1:
        return (), block.clamp(min=0)
    basis, values = _decomposition(block)
    return (basis,), values


def _squared_norm(factor: Factor) -> Tensor:
    """The squared Frobenius norm of a factor (0-dim)."""
    return factor.squared_norm() if isinstance(factor, Gram) else factor.square().sum()


def _pi_shifts(factors: tuple[Factor, Factor], damping: float) -> tuple[Tensor, Tensor]:
    """π-damping's shifts of ``B`` and ``A``: ``sqrt(damping) / π`` and ``sqrt(damping) π``
    with ``π = sqrt((tr(A) / I) / (tr(B) / O))``; ``damping`` for both unless both mean
    traces are positive."""
    output_factor, input_factor = factors
    mean_b = output_factor.trace() / output_factor.shape[0]
    mean_a = input_factor.trace() / input_factor.shape[0]
    if mean_a <= 0 or mean_b <= 0:
        return mean_b.new_tensor(damping), mean_a.new_tensor(damping)
    pi = (mean_a / mean_b).sqrt()
    return math.sqrt(damping) / pi, math.sqrt(damping) * pi


def _check_keys(what: str, given: dict, names: list[str]) -> None:
    """Raise unless ``given`` has exactly one entry per name."""
    if set(given) != set(names):
        missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
        raise ValueError(f"{what} must have one entry per name: {missing=}, {extra=}.")
