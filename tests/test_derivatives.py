"""Each module's derivatives on their own, against ``torch.func.vjp``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vjp

import curvhooks.derivatives.affine
import curvhooks.derivatives.conv
from curvhooks.derivatives import ModuleDerivatives, ModuleIO, module_derivatives
from tests.problems import assert_close, eval_batchnorm, random_affine


def _pad_arguments(module: nn.Module) -> list[int]:
    conv = curvhooks.derivatives.conv
    return conv.pad_arguments(conv.explicit_padding(module))


ACTIVATIONS = {
    "leaky-relu": (lambda: nn.LeakyReLU(0.2), (3, 4)),
    "leaky-relu-negative-slope": (lambda: nn.LeakyReLU(-0.3), (3, 4)),
    "elu": (lambda: nn.ELU(alpha=0.7), (3, 4)),
    "selu": (nn.SELU, (3, 4)),
    "gelu": (nn.GELU, (3, 4)),
    "gelu-tanh": (lambda: nn.GELU(approximate="tanh"), (3, 4)),
    "silu": (nn.SiLU, (3, 4)),
    "tanh": (nn.Tanh, (3, 4)),
    "softplus-threshold": (lambda: nn.Softplus(beta=2.0, threshold=1.0), (3, 4)),
    "logsigmoid": (nn.LogSigmoid, (3, 4)),
    "sigmoid": (nn.Sigmoid, (3, 4)),
}
"""Element-wise activations, for their second derivatives as well."""

MODULES = {
    "linear": (lambda: nn.Linear(4, 3), (4,)),
    "linear-extra-dims": (lambda: nn.Linear(4, 3), (2, 5, 4)),
    "linear-wide-extra-dims": (lambda: nn.Linear(20, 30), (2, 20)),  # Gram path of sq_norm
    "linear-no-bias": (lambda: nn.Linear(4, 3, bias=False), (4,)),
    "conv-stride-padding": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 7, 6)),
    "conv-dilation-groups": (lambda: nn.Conv2d(4, 6, (2, 3), dilation=(2, 1), groups=2), (4, 7, 6)),
    "conv-same-even": (lambda: nn.Conv2d(2, 3, 4, padding="same", bias=False), (2, 5, 6)),
    "conv-valid-stride-tuple": (
        lambda: nn.Conv2d(2, 3, 3, padding="valid", stride=(2, 1)),
        (2, 7, 6),
    ),
    "conv-padding-beyond-kernel": (lambda: nn.Conv2d(2, 3, 2, stride=3, padding=3), (2, 5, 4)),
    "conv1d-stride-dilation-groups": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=1),
        (4, 11),
    ),
    "conv1d-same-even-no-bias": (lambda: nn.Conv1d(2, 3, 4, padding="same", bias=False), (2, 7)),
    "conv3d-stride-tuple-padding": (
        lambda: nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 2), padding=(1, 0, 1)),
        (2, 4, 5, 4),
    ),
    "conv3d-same-groups-dilation": (
        lambda: nn.Conv3d(4, 4, 2, padding="same", dilation=(1, 2, 1), groups=4),
        (4, 3, 4, 3),
    ),
    "transposed-conv1d-stride-output-padding": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        (4, 5),
    ),
    "transposed-conv2d-dilation-output-padding": (
        lambda: nn.ConvTranspose2d(2, 3, (2, 3), stride=(2, 1), dilation=3, output_padding=(2, 0)),
        (2, 3, 4),
    ),
    "transposed-conv3d-no-bias": (
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=(1, 0, 0), bias=False),
        (2, 2, 3, 2),
    ),
    "batchnorm1d": (lambda: eval_batchnorm(nn.BatchNorm1d(3)), (3,)),
    "batchnorm1d-sequence": (lambda: eval_batchnorm(nn.BatchNorm1d(3)), (3, 5)),
    "batchnorm2d": (lambda: eval_batchnorm(nn.BatchNorm2d(3, eps=0.1)), (3, 4, 2)),
    "batchnorm3d-no-affine": (
        lambda: eval_batchnorm(nn.BatchNorm3d(2, affine=False)),
        (2, 3, 2, 2),
    ),
    "layernorm": (lambda: random_affine(nn.LayerNorm(4)), (4,)),
    "layernorm-two-dims-sequence": (lambda: random_affine(nn.LayerNorm((3, 4))), (2, 3, 4)),
    "layernorm-no-affine": (lambda: nn.LayerNorm(4, elementwise_affine=False), (3, 4)),
    "layernorm-no-bias": (lambda: random_affine(nn.LayerNorm(4, bias=False)), (4,)),
    "groupnorm": (lambda: random_affine(nn.GroupNorm(3, 6, eps=0.1)), (6, 2, 3)),
    "groupnorm-one-group-1d": (lambda: random_affine(nn.GroupNorm(1, 2)), (2, 5)),
    "groupnorm-channels-only": (lambda: random_affine(nn.GroupNorm(2, 4)), (4,)),
    "groupnorm-no-affine-3d": (lambda: nn.GroupNorm(2, 4, affine=False), (4, 2, 1, 2)),
    "relu": (nn.ReLU, (3, 4)),
    "sigmoid": (nn.Sigmoid, (3, 4)),
    **ACTIVATIONS,
    "flatten": (nn.Flatten, (2, 3, 4)),
    "flatten-partial": (lambda: nn.Flatten(2, 3), (2, 3, 4, 5)),
    "unflatten": (lambda: nn.Unflatten(2, (2, 3)), (4, 6)),
    "identity": (nn.Identity, (3, 4)),
    "maxpool1d-overlap": (lambda: nn.MaxPool1d(3, stride=1, padding=1), (2, 7)),
    "maxpool2d-dilation-ceil": (
        lambda: nn.MaxPool2d(2, stride=2, dilation=2, ceil_mode=True),
        (2, 7, 6),
    ),
    "maxpool3d": (lambda: nn.MaxPool3d((2, 1, 2)), (2, 4, 3, 4)),
    "avgpool1d-padding": (lambda: nn.AvgPool1d(3, stride=2, padding=1), (2, 7)),
    "avgpool2d-exclude-pad-ceil": (
        lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        (2, 7, 6),
    ),
    "avgpool2d-divisor": (lambda: nn.AvgPool2d(2, divisor_override=3), (2, 4, 6)),
    "avgpool3d": (lambda: nn.AvgPool3d(2, stride=1), (2, 3, 3, 4)),
    "adaptive-avgpool1d": (lambda: nn.AdaptiveAvgPool1d(3), (2, 7)),
    "adaptive-avgpool2d": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 7, 5)),
    "adaptive-avgpool3d": (lambda: nn.AdaptiveAvgPool3d(1), (2, 3, 3, 2)),
    "dropout-eval": (lambda: nn.Dropout(0.5).eval(), (3, 4)),
    "zeropad1d": (lambda: nn.ZeroPad1d((1, 2)), (3, 4)),
    "zeropad2d-crop": (lambda: nn.ZeroPad2d((2, -1, 0, 1)), (2, 3, 4)),
    "zeropad3d": (lambda: nn.ZeroPad3d((1, 0, 0, 2, 1, 1)), (2, 2, 3, 4)),
}
NUM_VECTORS, BATCH = 3, 2


def _setting(key: str, num_vectors: int = NUM_VECTORS):
    """Module ``key`` in float64 on a random batch: its derivatives, the record of the call,
    a random stack ``[V, N, *out]`` and ``torch.func``'s pullback of the call."""
    build, input_shape = MODULES[key]
    torch.manual_seed(0)
    module = build().double()
    x = torch.randn(BATCH, *input_shape, dtype=torch.float64)
    params = dict(module.named_parameters())
    output, pullback = vjp(lambda x, p: functional_call(module, p, (x,)), x, params)
    mat = torch.randn(num_vectors, *output.shape, dtype=torch.float64)
    io = ModuleIO(module, x, output.detach(), x.shape, output.shape)
    return module_derivatives(module), io, mat, pullback


@pytest.mark.parametrize("key", [key for key in MODULES if key.startswith("conv-")])
def test_unfolded_input_of_any_memory_layout(key):
    """The patches of a channels-last input and of a view with an offset are F.unfold's
    (2-D; the 1-D and 3-D patches meet the per-sample products below)."""
    build, input_shape = MODULES[key]
    module = build().double()
    x = torch.randn(BATCH + 1, *input_shape, dtype=torch.float64)
    derivatives = module_derivatives(module)
    for layout in (x.contiguous(memory_format=torch.channels_last), x[1:]):
        expected = torch.nn.functional.unfold(
            torch.nn.functional.pad(layout, _pad_arguments(module)),
            module.kernel_size,
            dilation=module.dilation,
            stride=module.stride,
        )
        io = ModuleIO(module, layout, None, layout.shape, module(layout).shape)
        assert torch.equal(derivatives.unfold_input(io).flatten(1, 2), expected)


@pytest.mark.parametrize("key", [key for key in MODULES if key.startswith("conv")])
@pytest.mark.parametrize("num_vectors", [1, NUM_VECTORS])
def test_large_problems_take_the_other_kernels(key, num_vectors, monkeypatch):
    """Beyond ``SMALL_STACK``, ``UNFOLD_LIMIT`` and ``FEW_VECTORS``/``FEW_INPUTS`` (here: always),
    stacks pass the transposed convolution, products of one vector come from a grouped
    convolution, and squared products of several from the folded stack."""
    monkeypatch.setattr(curvhooks.tuning, "SMALL_STACK", 0)
    monkeypatch.setattr(curvhooks.tuning, "UNFOLD_LIMIT", -1)
    monkeypatch.setattr(curvhooks.tuning, "FEW_VECTORS", 0)
    monkeypatch.setattr(curvhooks.tuning, "FEW_INPUTS", 0)
    derivatives, io, mat, pullback = _setting(key, num_vectors)
    pushed = derivatives.jac_t_mat_prod(io, mat.clone())
    assert_close(pushed, torch.stack([pullback(v)[0] for v in mat]))
    per_sample = derivatives.param_jac_t_mat_prod(io, "weight", mat)
    assert_close(per_sample, _per_sample_pullback(pullback, mat, "weight"))
    squares = derivatives.param_sq_sum(io, "weight", mat, per_sample=True)
    assert_close(squares, per_sample.square().sum(0))


@pytest.mark.parametrize("key", MODULES)
def test_jacobian_transpose_products(key):
    derivatives, io, mat, pullback = _setting(key)
    pulled = [pullback(v) for v in mat]  # per vector: (d x, {name: d p}) summed over the batch
    assert_close(derivatives.jac_t_mat_prod(io, mat.clone()), torch.stack([dx for dx, _ in pulled]))
    for name, _ in io.module.named_parameters():
        per_sample = derivatives.param_jac_t_mat_prod(io, name, mat)
        assert_close(per_sample, _per_sample_pullback(pullback, mat, name))
        assert_close(derivatives.param_jac_t_mat_prod_summed(io, name, mat), per_sample.sum((0, 1)))
        squares = per_sample.square()
        assert_close(derivatives.param_sq_sum(io, name, mat, per_sample=True), squares.sum(0))
        assert_close(derivatives.param_sq_sum(io, name, mat, per_sample=False), squares.sum((0, 1)))
        assert_close(derivatives.param_sq_norm(io, name, mat), squares.flatten(2).sum((0, 2)))
        # the generic reductions a new module with parameters inherits agree as well
        generic = ModuleDerivatives
        assert_close(
            generic.param_jac_t_mat_prod_summed(derivatives, io, name, mat), per_sample.sum((0, 1))
        )
        assert_close(generic.param_sq_sum(derivatives, io, name, mat, True), squares.sum(0))
        assert_close(
            generic.param_sq_norm(derivatives, io, name, mat), squares.flatten(2).sum((0, 2))
        )


@pytest.mark.parametrize("key", [key for key in MODULES if key.startswith("maxpool")])
def test_max_pooling_takes_autograds_indices(key):
    """2-D and 3-D max pooling take the indices autograd saved at the forward pass (1-D
    pooling's node saves none: it recomputes them); the push is the same either way."""
    derivatives, io, mat, pullback = _setting(key)
    x = io.input.clone().requires_grad_()
    derivatives.take_saved(io, io.module(x))
    assert ("indices" in io.cache) == (x.dim() > 3)
    pushed = derivatives.jac_t_mat_prod(io, mat.clone())
    assert_close(pushed, torch.stack([pullback(v)[0] for v in mat]))
    unbatched = io.input[0].clone().requires_grad_()  # [C, *spatial]: no batch to index
    io.cache.clear()
    derivatives.take_saved(io, io.module(unbatched))
    assert "indices" not in io.cache


def _per_sample_pullback(pullback, mat: torch.Tensor, name: str) -> torch.Tensor:
    """``[V, N, *p.shape]``: the pullback of each vector restricted to one sample at a time."""
    rows = []
    for vector in mat:
        rows.append(
            torch.stack(
                [
                    pullback(
                        vector * (torch.arange(BATCH) == n).view(-1, *[1] * (vector.dim() - 1))
                    )[1][name]
                    for n in range(BATCH)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("key", ACTIVATIONS)
def test_second_derivatives_against_autograd_and_finite_differences(key):
    """``hessian_residual`` is ``f''(x) * g``: against the diagonal of ``torch.func.hessian``
    of ``sum(f(x) g)``, and against central differences of autograd's first derivative."""
    derivatives, io, _, _ = _setting(key)
    module, x = io.module, io.input
    g = torch.randn_like(io.output)
    residual = derivatives.hessian_residual(io, g)
    if residual is None:  # piecewise linear: zero almost everywhere
        residual = torch.zeros_like(x)

    def weighted_sum(inputs: torch.Tensor) -> torch.Tensor:
        return (module(inputs) * g).sum()

    exact = torch.func.hessian(weighted_sum)(x).reshape(x.numel(), x.numel()).diagonal()
    assert_close(residual.flatten(), exact)
    step = 1e-5
    first = [torch.func.grad(weighted_sum)(x + sign * step) for sign in (1, -1)]
    torch.testing.assert_close(residual, (first[0] - first[1]) / (2 * step), rtol=1e-6, atol=1e-8)
    assert_close(
        derivatives.jac_t_mat_prod(io, g[None].clone())[0], torch.func.grad(weighted_sum)(x)
    )


def test_embedding_products_with_repeated_indices_and_padding():
    """Per-sample products scatter the stack into the rows a sample uses (several positions
    per row summed); the padding row gets nothing."""
    torch.manual_seed(0)
    module = nn.Embedding(5, 3, padding_idx=1).double()
    x = torch.tensor([[0, 1, 1, 3], [3, 3, 4, 1]])
    params = dict(module.named_parameters())
    output, pullback = vjp(lambda p: functional_call(module, p, (x,)), params)
    mat = torch.randn(NUM_VECTORS, *output.shape, dtype=torch.float64)
    io = ModuleIO(module, x, None, x.shape, output.shape)
    derivatives = module_derivatives(module)
    expected = torch.stack(
        [
            torch.stack(
                [
                    pullback(v * (torch.arange(BATCH) == n)[:, None, None])[0]["weight"]
                    for n in range(BATCH)
                ]
            )
            for v in mat
        ]
    )
    assert expected[:, :, 1].abs().sum() == 0 and expected[:, 1, 3].abs().sum() > 0
    assert_close(derivatives.param_jac_t_mat_prod(io, "weight", mat), expected)
    squares = expected.square()
    assert_close(derivatives.param_sq_sum(io, "weight", mat, per_sample=True), squares.sum(0))
    assert_close(derivatives.param_sq_sum(io, "weight", mat, per_sample=False), squares.sum((0, 1)))
    assert_close(derivatives.param_sq_norm(io, "weight", mat), squares.flatten(2).sum((0, 2)))


NORMALIZATIONS = [key for key in MODULES if "norm" in key and "batchnorm" not in key]
CURVED = [*ACTIVATIONS, *NORMALIZATIONS]
"""Modules with curvature of their own in their input (the others are linear or piecewise
linear in it)."""


@pytest.mark.parametrize("key", [key for key in MODULES if key not in CURVED])
def test_modules_linear_in_their_input_add_no_curvature(key):
    derivatives, io, _, _ = _setting(key)
    assert derivatives.residual_roots(io, torch.randn_like(io.output)) is None


@pytest.mark.parametrize("key", CURVED)
def test_module_curvature_roots(key):
    """``residual_roots`` gives ``P P^T - Q Q^T`` = the Hessian of ``out . g`` in each
    sample's input: against reverse-over-reverse autograd (``torch.func``'s forward-over-reverse
    is wrong through LayerNorm, see NOTES; central differences in test_finite_differences)."""
    derivatives, io, _, _ = _setting(key)
    module, x = io.module, io.input
    g = torch.randn_like(io.output)
    size = x[0].numel()
    roots = derivatives.residual_roots(io, g)
    actual = torch.zeros(BATCH, size, size, dtype=x.dtype)
    if roots is not None:
        positive, negative = (part.flatten(2).transpose(0, 1) for part in roots)  # [N, U, in]
        actual = positive.mT @ positive - negative.mT @ negative

    def weighted_sum(inputs: torch.Tensor) -> torch.Tensor:
        return (module(inputs) * g).sum()

    full = torch.autograd.functional.hessian(weighted_sum, x).reshape(BATCH, size, BATCH, size)
    assert_close(actual, full.diagonal(0, 0, 2).permute(2, 0, 1))
    across_samples = 1 - torch.eye(BATCH, dtype=x.dtype)[:, None, :, None]
    assert (full * across_samples).abs().max() == 0
