"""Every module's and loss's derivatives against central finite differences, in float64.

An independent check of the ``torch.func`` references (``torch.func.hessian`` is wrong through
``nn.LayerNorm``, see NOTES): only forward passes (and, for the loss Hessian, autograd's first
derivative of the loss, itself checked against the loss value) enter the expected values.

Tolerances: a central difference with step ``h = 1e-6`` has truncation error ``O(h^2)``
(~1e-12) and rounding error ``O(eps / h)`` (~1e-10 per entry, summed over at most a few
hundred entries), so it agrees to ``rtol=1e-6, atol=1e-8`` with room to spare, while a product
off by 1e-3 fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from curvhooks.derivatives import ModuleIO, loss_derivatives, module_derivatives
from tests.test_derivatives import BATCH, MODULES

STEP = 1e-6
NUM_VECTORS = 2
KINK_MARGIN = 1e-2
"""Inputs are moved this far from 0, the kink of ReLU, LeakyReLU, ELU and SELU (MaxPool's ties
between random entries are improbable: windows padded with ``-inf`` never tie)."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the perturbed batches are hundreds of tiny samples, which
    PyTorch's float64 dilated convolutions loop over with a parallel region each; on a busy
    two-core machine those regions stall (33 s for this file instead of 4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_fd_close(actual: Tensor, expected: Tensor) -> None:
    """Agreement with a central difference of step ``STEP`` (see the module docstring)."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-8)


def _setting(key: str) -> tuple[nn.Module, Tensor, Tensor]:
    """Module ``key`` in float64, a random batch ``[N, *in]`` away from kinks and a random
    stack ``[V, N, *out]``."""
    build, input_shape = MODULES[key]
    torch.manual_seed(0)
    module = build().double()
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        pytest.skip("integer inputs: no input derivative (parameter products: test_derivatives)")
    x = torch.randn(BATCH, *input_shape, dtype=torch.float64)
    x += KINK_MARGIN * x.sign()
    mat = torch.randn(NUM_VECTORS, *module(x).shape, dtype=torch.float64)
    return module, x, mat


def _io(module: nn.Module, x: Tensor) -> ModuleIO:
    """The record of calling ``module`` on ``x``, with input and output kept (``x`` intact
    even where the module acts in place)."""
    output = module(x.clone())
    return ModuleIO(module, x, output, x.shape, output.shape)


def _perturbed_inputs(x: Tensor) -> Tensor:
    """``[2, D, N, *in]``: ``x + s h e_i`` for ``s = +1, -1`` and each entry i of a sample
    (every sample moved at entry i; the modules act per sample, so one call of the module on
    all of them gives every partial derivative)."""
    batch, entries = x.shape[0], x[0].numel()
    moves = torch.eye(entries, dtype=x.dtype) * STEP  # [D, D]
    moves = torch.stack([moves, -moves])[:, :, None]  # [2, D, 1, D]
    return (x.reshape(1, 1, batch, entries) + moves).reshape(2, entries, *x.shape)


def _central_difference(values: Tensor) -> Tensor:
    """``(values[0] - values[1]) / (2 h)`` of values at ``+h`` and ``-h``."""
    return (values[0] - values[1]) / (2 * STEP)


@pytest.mark.parametrize("key", MODULES)
def test_jacobian_transpose_products(key: str) -> None:
    """``(J^T v)[n, i] = sum_o v[n, o] d f_n[o] / d x_n[i]``, the partials by central
    differences of the forward pass."""
    module, x, mat = _setting(key)
    perturbed = _perturbed_inputs(x)
    outputs = module(perturbed.flatten(0, 2)).view(2, x[0].numel(), BATCH, -1)
    partials = _central_difference(outputs)  # [D, N, O]
    expected = torch.einsum("vno,ino->vni", mat.flatten(2), partials).view(
        mat.shape[:2] + x.shape[1:]
    )
    derivatives = module_derivatives(module)
    assert_fd_close(derivatives.jac_t_mat_prod(_io(module, x), mat.clone()), expected)


@pytest.mark.parametrize(
    "key", [key for key, (build, _) in MODULES.items() if list(build().parameters())]
)
def test_per_sample_parameter_products(key: str) -> None:
    """``(J_n^T v)[j] = sum_o v[n, o] d f_n[o] / d p[j]`` per sample, the partials by central
    differences in each parameter entry."""
    module, x, mat = _setting(key)
    derivatives, io = module_derivatives(module), _io(module, x)
    for name, parameter in module.named_parameters():
        flat = parameter.detach().view(-1)
        partials = []  # per entry j: [N, O]
        for j in range(flat.numel()):
            original = flat[j].item()
            values = []
            for move in (STEP, -STEP):
                flat[j] = original + move
                values.append(module(x).detach().flatten(1))
            flat[j] = original
            partials.append(_central_difference(values))
        expected = torch.einsum("vno,pno->vnp", mat.flatten(2), torch.stack(partials))
        actual = derivatives.param_jac_t_mat_prod(io, name, mat)
        assert_fd_close(actual, expected.view(mat.shape[:2] + parameter.shape))


@pytest.mark.parametrize("key", MODULES)
def test_module_curvature(key: str) -> None:
    """The module's own curvature ``d^2 sum(f_n . g_n) / d x_n^2`` per sample, as given by
    ``residual_roots`` (``P P^T - Q Q^T``; zero where ``None``) and, where not ``None``, by
    its diagonal ``hessian_residual``: against central differences of the first derivative,
    the package's own ``jac_t_mat_prod`` of ``g`` (checked above)."""
    module, x, mat = _setting(key)
    derivatives, g = module_derivatives(module), mat[0]
    entries = x[0].numel()
    perturbed = _perturbed_inputs(x).flatten(0, 2)
    tiled = g.repeat(2 * entries, *[1] * (g.dim() - 1))[None]  # g at every perturbed input
    grads = derivatives.jac_t_mat_prod(_io(module, perturbed), tiled)
    expected = _central_difference(grads.reshape(2, entries, BATCH, entries)).transpose(0, 1)
    roots = derivatives.residual_roots(_io(module, x), g)
    curvature = torch.zeros_like(expected)  # [N, D, D]
    if roots is not None:
        positive, negative = (root.flatten(2) for root in roots)
        curvature += torch.einsum("uni,unj->nij", positive, positive)
        curvature -= torch.einsum("uni,unj->nij", negative, negative)
    assert_fd_close(curvature, expected)
    diagonal = derivatives.hessian_residual(_io(module, x), g)
    if diagonal is not None:
        assert_fd_close(diagonal.flatten(1), expected.diagonal(dim1=1, dim2=2))


LOSS_CASES: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "ce": (nn.CrossEntropyLoss, (3, 4)),
    "ce-positions": (nn.CrossEntropyLoss, (2, 4, 3)),
    "mse": (nn.MSELoss, (3, 4)),
    "mse-extra-dims": (nn.MSELoss, (2, 3, 2)),
    "bce": (nn.BCEWithLogitsLoss, (3, 4)),
    "bce-extra-dims": (nn.BCEWithLogitsLoss, (2, 3, 2)),
}
"""Loss class and output shape ``[N, *out]``."""


def _loss_setting(case: str, reduction: str) -> tuple[nn.Module, Tensor, Tensor]:
    """The loss, a random output and targets of the kind the loss takes."""
    build, shape = LOSS_CASES[case]
    torch.manual_seed(0)
    loss_fn = build(reduction=reduction)
    output = torch.randn(shape, dtype=torch.float64)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        target = torch.randint(shape[1], (shape[0], *shape[2:]))
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        target = torch.rand(shape, dtype=torch.float64)
    else:
        target = torch.randn(shape, dtype=torch.float64)
    return loss_fn, output, target


def _loss_gradient(loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """Autograd's gradient of the reduced loss in the output."""
    output = output.detach().requires_grad_()
    return torch.autograd.grad(loss_fn(output, target), output)[0]


def _moved(output: Tensor, entry: int, move: float) -> Tensor:
    """``output`` with its flat entry ``entry`` moved by ``move``."""
    moved = output.clone()
    moved.view(-1)[entry] += move
    return moved


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", LOSS_CASES)
def test_loss_gradient(case: str, reduction: str) -> None:
    """The gradient that the Hessian check below differentiates, against central differences
    of the loss value (the package takes the loss gradient from autograd)."""
    loss_fn, output, target = _loss_setting(case, reduction)
    differences = [
        _central_difference([loss_fn(_moved(output, i, move), target) for move in (STEP, -STEP)])
        for i in range(output.numel())
    ]
    assert_fd_close(
        _loss_gradient(loss_fn, output, target), torch.stack(differences).view_as(output)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", LOSS_CASES)
def test_loss_sqrt_hessian(case: str, reduction: str) -> None:
    """``sum_c S[c, n] S[c, n]^T`` of ``sqrt_hessian`` is the reduced loss's Hessian in sample
    n's output, by central differences of the gradient; across samples the Hessian vanishes.
    (The Monte-Carlo square root is checked for unbiasedness in test_second_order.)"""
    loss_fn, output, target = _loss_setting(case, reduction)
    rows = [
        _central_difference(
            [_loss_gradient(loss_fn, _moved(output, i, move), target) for move in (STEP, -STEP)]
        ).flatten()
        for i in range(output.numel())
    ]
    sqrt = loss_derivatives(loss_fn).sqrt_hessian(loss_fn, output, target).flatten(2)
    blocks = torch.einsum("cni,cnj->nij", sqrt, sqrt)
    assert_fd_close(torch.block_diag(*blocks), torch.stack(rows))
