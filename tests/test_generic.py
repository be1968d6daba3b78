"""Modules with parameters that curvhooks has no derivatives for, served by ``torch.func`` on
their own calls (``curvhooks.derivatives.generic``): the first-order and GGN-family
extensions and ``Jacobian`` against ``tests.reference`` and finite differences, on both
routes; the refusals (samples mixed, randomness, more arguments, the Hessian extensions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvhooks
from curvhooks import (
    KFAC,
    BatchGrad,
    DiagGGN,
    DiagHessian,
)
from tests import reference
from tests.checks import check_every_extension, check_finite_differences
from tests.problems import CE_MSE, Problem, by_name, run_with


class Gated(nn.Module):
    """``tanh(x W^T) * sigmoid(g) + x * g^2``: nonlinear in its input and its parameters."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features) / features**0.5)
        self.gate = nn.Parameter(torch.randn(features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.weight.T) * torch.sigmoid(self.gate) + x * self.gate**2


class OwnConvolution(nn.Module):
    """A user's convolution by ``F.conv2d``, with a frozen bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) / 3)
        self.bias = nn.Parameter(torch.randn(channels), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=1)


class Unused(nn.Module):
    """``x * weight`` with a parameter that takes no part (its products are zero)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))
        self.unused = nn.Parameter(torch.randn(2))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class Residual(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class Gate(nn.Module):
    """``x * sigmoid(g W^T)``: a gate from a second tensor argument."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features))

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return x * torch.sigmoid(g @ self.weight.T)


class GatedTwice(nn.Module):
    """``head(gate(relu(lin(x)), lin(x)))``: a chain of calls from ``head`` back to ``lin``
    through the gate's first argument, and a second path through its second."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.relu, self.gate, self.head = (
            nn.Linear(4, 3),
            nn.ReLU(),
            Gate(3),
            nn.Linear(3, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.lin(x)
        return self.head(self.gate(self.relu(hidden), hidden))


PROBLEMS = [
    Problem(
        "gated-chain",
        lambda: nn.Sequential(nn.Linear(4, 5), Gated(5), nn.ReLU(), nn.Linear(5, 3)),
        (4,),
    ),
    Problem(
        "own-conv-residual",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.Sigmoid(),
            Residual(OwnConvolution(3)),
            nn.Flatten(),
            nn.Linear(12, 3),
        ),
        (2, 4, 4),
        is_chain=False,
    ),
    Problem("gate-of-two-paths", GatedTwice, (4,), is_chain=False),
    Problem("gated-batch-of-one", lambda: nn.Sequential(Gated(3), nn.Linear(3, 2)), (3,), 1),
    Problem(  # torch.func batches prelu's backward wrongly under nested vmap (torch 2.13)
        "prelu-gated-inplace",
        lambda: nn.Sequential(
            nn.Linear(4, 3), nn.PReLU(3), Gated(3), nn.ReLU(inplace=True), nn.Linear(3, 3)
        ),
        (4,),
    ),
]
CASES = [
    pytest.param(problem, loss, route, id=f"{problem.name}-{loss}-{route}")
    for problem in PROBLEMS
    for loss in CE_MSE
    for route in (("chain", "graph") if problem.is_chain else ("auto", "graph"))
]


@pytest.mark.parametrize("problem, loss, route", CASES)
def test_first_order_and_ggn_family(problem, loss, route):
    with pytest.warns(UserWarning, match="serves them by torch.func"):
        check_every_extension(*problem.make(loss), route=route)


def test_per_sample_gradients_match_finite_differences():
    """The generic module's per-sample gradients against central differences of each
    sample's loss (float64, step 1e-6)."""
    model, loss_fn, X, y = PROBLEMS[0].make("ce-sum", num_samples=4)
    with pytest.warns(UserWarning, match="torch.func"):
        with curvhooks.extend(model, loss_fn, BatchGrad()):
            loss_fn(model(X), y).backward()
    entries = [(model[1].weight, index) for index in [(0, 0), (2, 4), (4, 1)]]
    check_finite_differences(model, loss_fn, X, y, entries)


class MixesSamples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0)) * self.weight


class Random(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, 0.5, training=True) * self.weight


class TwoInputs(nn.Module):
    """``tanh(x W^T + context) * scale`` and the context itself: two tensor arguments, a
    keyword argument and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: Tensor, context: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        return torch.tanh(x @ self.weight.T + context) * scale, context * 2


class CallsWithContext(nn.Module):
    """Feeds ``TwoInputs`` a context computed from the input by a linear layer (a second
    path to the parameters upstream), and uses both its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.context = nn.Linear(3, 3)
        self.inner = TwoInputs()
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        mixed, context = self.inner(x, self.context(x), scale=3.0)
        return self.head(mixed + context)


@pytest.mark.parametrize("loss", CE_MSE)
def test_a_call_with_several_arguments_and_outputs_is_served(loss):
    """Every tensor argument gets the samples' stacks by autograd (not only the first),
    the keyword argument is kept, and both outputs pass their stacks back."""
    problem = Problem("two-inputs", CallsWithContext, (3,), 4, is_chain=False)
    with pytest.warns(UserWarning, match="serves them by torch.func"):
        check_every_extension(*problem.make(loss))


@pytest.mark.parametrize("layer", [MixesSamples(), Random()], ids=["mixes-samples", "random"])
def test_a_module_that_is_not_a_per_sample_function_of_its_input_is_refused(layer):
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.Linear(3, 2)).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.warns(UserWarning, match="torch.func"):
        with curvhooks.extend(model, loss_fn, BatchGrad()):
            with pytest.raises(curvhooks.UnsupportedError, match="mixes samples or is random"):
                loss_fn(model(X), y).backward()


def test_the_hessian_extensions_and_kfac_refuse_it():
    model, loss_fn, _, _ = PROBLEMS[0].make("ce-mean")
    for extension, refused in ((DiagHessian(), "own second derivatives"), (KFAC(), "Kronecker")):
        with pytest.raises(curvhooks.UnsupportedError, match=rf"'1' \(Gated\).*{refused}"):
            curvhooks.extend(model, loss_fn, extension).__enter__()


def test_generic_false_refuses_it():
    model, loss_fn, _, _ = PROBLEMS[0].make("ce-mean")
    with pytest.raises(curvhooks.UnsupportedError, match=r"'1' \(Gated\) is not supported"):
        curvhooks.extend(model, loss_fn, BatchGrad(), generic=False).__enter__()


class Tied(nn.Module):
    """One parameter under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Parameter(torch.randn(3, 3))
        self.decode = self.encode

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.encode.T) @ self.decode


def _hooked(module: nn.Module) -> nn.Module:
    module.register_forward_pre_hook(lambda module, args: None)
    return module


@pytest.mark.parametrize("layer", [Tied(), _hooked(Gated(3))], ids=["tied-names", "own-hooks"])
def test_modules_the_fallback_cannot_see_through_are_not_served(layer):
    model = nn.Sequential(layer, nn.Linear(3, 2)).double()
    with pytest.raises(curvhooks.UnsupportedError, match=r"'0' \((Tied|Gated)\) is not supported"):
        curvhooks.extend(model, nn.MSELoss(), BatchGrad()).__enter__()


def test_a_parameter_that_takes_no_part_gets_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Unused(3), nn.Linear(3, 2)).double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.warns(UserWarning, match="torch.func"):
        found = run_with(model, nn.CrossEntropyLoss(), X, y, BatchGrad(), DiagGGN())
    assert torch.equal(found["1.unused"]["grad_batch"], torch.zeros(5, 2, dtype=torch.float64))
    assert torch.equal(found["1.unused"]["diag_ggn"], torch.zeros(2, dtype=torch.float64))
    expected = reference.per_sample_grads(model, nn.CrossEntropyLoss(), X, y)["1.weight"]
    torch.testing.assert_close(found["1.weight"]["grad_batch"], expected, rtol=1e-10, atol=1e-12)


def test_parameters_used_directly_match_finite_differences():
    """A container's class token and position embeddings (``DirectDerivatives``): per-sample
    gradients against central differences of each sample's loss (float64, step 1e-6)."""
    model, loss_fn, X, y = by_name("class-token").make("ce-sum", num_samples=4)
    with pytest.warns(UserWarning, match="cls_token, pos_embed, used directly"):
        with curvhooks.extend(model, loss_fn, BatchGrad()):
            loss_fn(model(X), y).backward()
    entries = [(model.cls_token, (0, 0, 1)), (model.pos_embed, (0, 2, 3))]
    check_finite_differences(model, loss_fn, X, y, entries)


class TiedToChild(nn.Module):
    """A parameter held by the model and by its child, used by both."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3, 3))
        self.inner = nn.Linear(3, 3)
        self.inner.weight = self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) @ self.scale


def test_direct_use_of_a_parameter_a_call_also_uses_is_refused():
    """Served directly, the parameter's derivative would count the call's use twice."""
    torch.manual_seed(0)
    model = TiedToChild().double()
    X = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="used directly"):
        with curvhooks.extend(model, nn.MSELoss(), BatchGrad()):
            with pytest.raises(curvhooks.UnsupportedError, match="scale.*used outside"):
                model(X)


def test_generic_false_refuses_parameters_used_directly():
    model, loss_fn, _, _ = by_name("class-token").make("ce-mean")
    with pytest.raises(curvhooks.UnsupportedError, match=r"\(ClassToken\) is not supported"):
        curvhooks.extend(model, loss_fn, BatchGrad(), generic=False).__enter__()
