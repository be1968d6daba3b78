"""What an extension is: a reduction of a stack pushed to a parameter.

A first-order extension reduces the output gradient ``[N, *out]`` (a stack of one vector);
a second-order extension reduces the square-root GGN stack ``[V, N, *out]`` that the loss
starts and each module pushes back. Both call the module's derivatives, never a Jacobian of
their own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from curvhooks._compat import storage_users
from curvhooks.derivatives import ModuleDerivatives, ModuleIO
from curvhooks.errors import UnsupportedError
from curvhooks.extensions.gram import Gram
from curvhooks.extensions.stacks import GGN_EXACT, MonteCarloStack, Stack, StackKind

RESULT_ATTRIBUTES: set[str] = set()
"""Every result attribute of every extension class defined so far (library or user), so that
entering a context clears them all."""


@dataclass(frozen=True)
class Target:
    """A trainable parameter of one module call, and the products that push a stack
    ``[V, N, *out]`` from the module's output to it (its module's derivatives)."""

    derivatives: ModuleDerivatives
    io: ModuleIO
    name: str

    @property
    def param(self) -> Tensor:
        return self.io.module.get_parameter(self.name)

    def products(self, mat: Tensor, out: Tensor | None = None) -> Tensor:
        """Per-sample products ``[V, N, *p.shape]``, written into ``out`` if given."""
        if not len(mat):
            return self._zeros(0, mat.shape[1]) if out is None else out
        return self.derivatives.param_jac_t_mat_prod(self.io, self.name, mat, out=out)

    def summed(self, mat: Tensor) -> Tensor:
        """The products summed over the stack and the batch: ``p.shape``."""
        if not len(mat):
            return self._zeros()
        return self.derivatives.param_jac_t_mat_prod_summed(self.io, self.name, mat)

    def sq_sum(self, mat: Tensor, per_sample: bool) -> Tensor:
        """Squared products summed over the stack (``[N, *p.shape]``) and, unless
        ``per_sample``, over the batch (``p.shape``)."""
        if not len(mat):
            return self._zeros(mat.shape[1]) if per_sample else self._zeros()
        return self.derivatives.param_sq_sum(self.io, self.name, mat, per_sample)

    def sq_norm(self, mat: Tensor) -> Tensor:
        """Squared norms of the per-sample products, summed over the stack: ``[N]``."""
        if not len(mat):
            return mat.new_zeros(mat.shape[1])
        return self.derivatives.param_sq_norm(self.io, self.name, mat)

    def _zeros(self, *leading: int) -> Tensor:
        """Zeros ``[*leading, *p.shape]``: the reductions of an empty stack (no vectors, as
        a loss with a zero Hessian starts)."""
        param = self.param
        return torch.zeros(*leading, *param.shape, dtype=param.dtype, device=param.device)

    def kronecker(self, mat: Tensor, approx: str, thin: bool = False) -> tuple:
        """KFAC's factors of the parameter from the stack: ``(B, A)`` for a weight, ``(B,)``
        for a bias, each formed from its root (``ModuleDerivatives.output_root``,
        ``input_root``), or with ``thin`` kept as a ``Gram`` of its root where that is thin.
        B is computed once per stack and weight, A once per module call and weight; each
        caller gets copies. A bias takes the B of its weight (``kronecker_weight``)."""
        io, derivatives = self.io, self.derivatives
        weight = derivatives.kronecker_weight(io.module, self.name)
        if weight is None:
            raise UnsupportedError(
                f"{self.name} of {type(io.module).__name__} has no Kronecker factors (a bias "
                "of several weights, or a parameter of no weight); curvhooks.kfac gives it "
                "its exact block (others=), or leave it out (requires_grad_(False))"
            )
        key = ("output_factor", weight, approx, thin)
        cached = io.cache.get(key)
        if cached is None or cached[0] is not mat:
            rows = io.module.get_parameter(weight).shape[0]
            root = (
                derivatives.output_root(io, mat, approx, weight)
                if len(mat)
                else mat.new_zeros(0, rows)
            )
            io.cache[key] = cached = (mat, Gram.of(root, thin))
        if self.name != weight:
            return (Gram.copy(cached[1]),)
        key = ("input_factor", weight, approx, thin)  # the same for every stack
        if key not in io.cache:
            io.cache[key] = Gram.of(derivatives.input_root(io, approx, weight), thin)
        return Gram.copy(cached[1]), Gram.copy(io.cache[key])


class SummedTarget:
    """A parameter used by several calls (a module called twice, weights tied between
    modules): each stack's per-sample products, summed over the calls per sample and per
    vector before anything is squared, stand in for one call's products.

    The stacks it is asked about are tokens ``[V, N]`` (``tokens``), one per summed part;
    ``uses`` names the calls, for errors.
    """

    def __init__(
        self, param: Tensor, summed: list[Tensor], uses: str = "a shared parameter"
    ) -> None:
        self.param = param
        self.uses = uses
        self.tokens = tuple(p.new_empty(()).expand(*p.shape[:2]) for p in summed)
        self._products = {id(token): p for token, p in zip(self.tokens, summed)}

    @classmethod
    def of(cls, param: Tensor, targets: list[Target], stacks: list[tuple[Tensor, ...]], uses: str):
        """The summed target of ``targets`` (one per call, described by ``uses``) and their
        stacks, each a tuple of parts with the same vectors in every call (an empty part in
        any call counts as zeros)."""
        summed = []
        for index, part in enumerate(stacks[0]):
            pieces = [
                t.products(parts[index]) for t, parts in zip(targets, stacks) if len(parts[index])
            ]
            empty = param.new_zeros(0, part.shape[1], *param.shape)
            summed.append(sum(pieces[1:], pieces[0]) if pieces else empty)
        return cls(param, summed, uses)

    def products(self, mat: Tensor, out: Tensor | None = None) -> Tensor:
        products = self._products[id(mat)]
        return products.clone() if out is None else out.copy_(products)

    def summed(self, mat: Tensor) -> Tensor:
        return self._products[id(mat)].sum((0, 1))

    def sq_sum(self, mat: Tensor, per_sample: bool) -> Tensor:
        squares = self._products[id(mat)].square().sum(0)
        return squares if per_sample else squares.sum(0)

    def sq_norm(self, mat: Tensor) -> Tensor:
        return self._products[id(mat)].square().flatten(2).sum((0, 2))

    def kronecker(self, mat: Tensor, approx: str, thin: bool = False) -> tuple:
        raise UnsupportedError(
            f"KFAC of {self.uses} is not supported: a parameter used by several calls (a "
            "module called twice, or weights tied between modules) meets a different input at "
            "each; use the GGN extensions, or untie the weights"
        )


class Extension:
    """Base class: subclasses set ``attribute`` and implement ``compute``."""

    attribute: str = ""
    """Name of the attribute that receives the result on each parameter."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.attribute:
            RESULT_ATTRIBUTES.add(cls.attribute)

    def stack_kind(self) -> StackKind | None:
        """Which propagated stack this extension reduces: ``None`` for the output gradient
        (first order), else a kind from ``curvhooks.extensions.stacks``."""
        return None

    def unsupported_reason(self, derivatives: ModuleDerivatives) -> str | None:
        """Why this extension cannot serve parameters of a module with ``derivatives`` (which
        the module's other extensions can), or ``None``."""
        return None

    def compute(self, target: Target, mat: Stack, previous: object = None) -> object:
        """The result for the parameter ``target`` from the stack ``mat``.

        ``previous`` is this attribute's previous result on the parameter when nobody else
        references it: an extension may write its result into it.
        """
        raise NotImplementedError

    def combine(self, result: object, other: object) -> object:
        """The result of a stack from the results of two parts of its vectors: their sum,
        for every reduction that sums over the vectors."""
        return result + other

    def finish(self, result: object) -> object:
        """The result handed on, from what ``compute`` and ``combine`` built: itself."""
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MonteCarloExtension(Extension):
    """A second-order extension that is exact by default, or Monte-Carlo with M samples."""

    def __init__(self, mc_samples: int | None = None) -> None:
        if mc_samples is not None:
            check_mc_samples(mc_samples)
        self.mc_samples = mc_samples

    def stack_kind(self) -> StackKind:
        return GGN_EXACT if self.mc_samples is None else MonteCarloStack(self.mc_samples)

    def __repr__(self) -> str:
        argument = "" if self.mc_samples is None else f"mc_samples={self.mc_samples}"
        return f"{type(self).__name__}({argument})"


def check_mc_samples(mc_samples: object) -> None:
    """Raise ``ValueError`` unless ``mc_samples`` is a positive integer."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")


def result_buffer(previous: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``previous`` if it has ``shape`` and ``like``'s dtype and device, else a new tensor.

    Writing into the previous result avoids page-faulting a fresh tensor of the same size,
    as autograd does with ``.grad``.
    """
    if (
        previous is not None
        and previous.shape == shape
        and previous.dtype == like.dtype
        and previous.device == like.device
    ):
        return previous
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def is_unreferenced(tensor: Tensor, references: int) -> bool:
    """Whether ``tensor`` has exactly ``references`` Python references (counted by the
    caller, not counting this call's argument) and no view shares its memory. ``False``
    where this PyTorch cannot count a storage's users (results are then never reused)."""
    if tensor._base is not None or sys.getrefcount(tensor) - 2 > references:
        return False
    users = storage_users(tensor)
    return users is not None and users <= 2  # `tensor` and the temporary storage object
