"""``curvhooks.laplace``: laplace-torch fitted with the curvhooks backends equals it fitted with
its curvlinops and BackPACK backends (float64), for regression and classification, every
curvature structure and all, last-layer and subnetwork weights; the backends' Jacobians and
gradients equal laplace-torch's own ``torch.func`` ones. Skipped without laplace-torch (and
its peer backends)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("laplace")
pytest.importorskip("curvlinops")
pytest.importorskip("backpack")

from laplace import Laplace  # noqa: E402
from laplace.curvature import (  # noqa: E402
    BackPackEF,
    BackPackGGN,
    CurvatureInterface,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
)

import curvhooks  # noqa: E402
from curvhooks.laplace import CurvhooksEF, CurvhooksGGN, CurvhooksHessian  # noqa: E402
from tests import reference  # noqa: E402
from tests.problems import assert_close  # noqa: E402

LIKELIHOODS = ("regression", "classification")
ARCHITECTURES = ("mlp", "cnn")
PEERS = [  # (ours, structure, laplace-torch's backend giving the same matrix)
    (CurvhooksGGN, "full", CurvlinopsGGN),
    (CurvhooksGGN, "full", BackPackGGN),
    (CurvhooksGGN, "kron", CurvlinopsGGN),
    (CurvhooksGGN, "kron", BackPackGGN),
    (CurvhooksGGN, "diag", CurvlinopsGGN),
    (CurvhooksGGN, "diag", BackPackGGN),
    (CurvhooksEF, "full", CurvlinopsEF),
    (CurvhooksEF, "full", BackPackEF),
    (CurvhooksEF, "kron", CurvlinopsEF),
    (CurvhooksEF, "diag", BackPackEF),
    (CurvhooksHessian, "full", CurvlinopsHessian),
]


@pytest.fixture(autouse=True)
def float64_by_default():
    """laplace-torch's curvlinops backend multiplies by ``torch.eye`` of the default dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


class _Residual(nn.Module):
    """Not a chain: ``head(x + tanh(inner(x)))``, the skip a torch function."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + torch.tanh(self.inner(x)))


def _problem(likelihood: str, architecture: str) -> tuple[nn.Module, DataLoader]:
    """A small float64 model (``"mlp"``, ``"cnn"`` or ``"residual"``) and 20 samples in
    batches of 8, 8 and 4."""
    torch.manual_seed(0)
    outputs = 3 if likelihood == "classification" else 2
    if architecture == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, outputs))
        X = torch.randn(20, 4)
    elif architecture == "residual":
        model, X = _Residual(outputs), torch.randn(20, 4)
    else:
        convolution = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        model = nn.Sequential(convolution, nn.ReLU(), nn.Flatten(), nn.Linear(12, outputs))
        X = torch.randn(20, 2, 4, 4)
    y = torch.randint(0, 3, (20,)) if likelihood == "classification" else torch.randn(20, 2)
    return model.double(), DataLoader(TensorDataset(X.double(), y), batch_size=8)


def _fitted(backend: type, likelihood: str, architecture: str, **options) -> Laplace:
    model, loader = _problem(likelihood, architecture)
    laplace = Laplace(model, likelihood, backend=backend, **options)
    laplace.fit(loader)
    return laplace


def _matrix(laplace: Laplace) -> torch.Tensor:
    return laplace.H.to_matrix() if hasattr(laplace.H, "to_matrix") else laplace.H


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("weights", ["all", "last_layer"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("ours, structure, peer", PEERS, ids=lambda v: getattr(v, "__name__", v))
def test_laplace_equals_its_peer_backends(ours, structure, peer, likelihood, weights, architecture):
    if (peer, structure, weights, architecture) == (BackPackGGN, "kron", "all", "cnn"):
        pytest.skip("BackPACK's KFLR of a convolution takes another convention than KFAC's")
    options = {"subset_of_weights": weights, "hessian_structure": structure}
    fitted = _fitted(ours, likelihood, architecture, **options)
    expected = _fitted(peer, likelihood, architecture, **options)
    assert_close(_matrix(fitted), _matrix(expected))
    assert_close(fitted.loss, expected.loss)
    if ours is CurvhooksHessian:
        return  # indefinite: no Gaussian posterior to predict with
    X = next(iter(_problem(likelihood, architecture)[1]))[0]
    for got, want in zip(fitted(X), expected(X)):  # the GLM predictive
        assert_close(got, want)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize(
    "ours, structure, peer",
    [case for case in PEERS if case[2] in (CurvlinopsGGN, CurvlinopsEF)],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_a_model_that_is_not_a_chain(ours, structure, peer, likelihood):
    """A residual block (the skip a torch function) against curvlinops' backends (BackPACK's
    would need its converter)."""
    options = {"subset_of_weights": "all", "hessian_structure": structure}
    fitted = _fitted(ours, likelihood, "residual", **options)
    expected = _fitted(peer, likelihood, "residual", **options)
    assert_close(_matrix(fitted), _matrix(expected))
    assert_close(fitted.loss, expected.loss)


SUBNETWORK = torch.tensor([0, 3, 7, 20, 40])
REFERENCES = {
    CurvhooksGGN: reference.ggn,
    CurvhooksEF: reference.empirical_fisher,
    CurvhooksHessian: reference.hessian_matrix,
}


def _restricted_reference(ours: type, likelihood: str) -> torch.Tensor:
    """The reference matrix of all weights over the whole data set, the subnetwork's rows
    and columns, scaled as laplace-torch's."""
    model, loader = _problem(likelihood, "mlp")
    X, y = (torch.cat(parts) for parts in zip(*loader))
    backend = ours(model, likelihood)
    full = backend.factor * REFERENCES[ours](model, backend.lossfunc, X, y)
    return full[SUBNETWORK][:, SUBNETWORK]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("ours", [CurvhooksGGN, CurvhooksEF])
def test_a_subnetwork_is_the_full_matrix_restricted(ours, structure, likelihood):
    options = {"subset_of_weights": "subnetwork", "subnetwork_indices": SUBNETWORK}
    fitted = _fitted(ours, likelihood, "mlp", hessian_structure=structure, **options)
    expected = _restricted_reference(ours, likelihood)
    assert_close(_matrix(fitted), expected if structure == "full" else expected.diagonal())


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_the_hessian_of_a_subnetwork_by_products(likelihood):
    """laplace-torch takes subnetworks of the GGN and EF only; the backend itself serves
    the Hessian's, from products with the subnetwork's unit vectors."""
    model, loader = _problem(likelihood, "mlp")
    backend = CurvhooksHessian(model, likelihood, subnetwork_indices=SUBNETWORK)
    blocks = [backend.full(X, y)[1] for X, y in loader]
    assert_close(sum(blocks), _restricted_reference(CurvhooksHessian, likelihood))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_jacobians_and_gradients_equal_laplace_torch_s_own(likelihood, architecture):
    model, loader = _problem(likelihood, architecture)
    X, y = next(iter(loader))
    ours = CurvhooksEF(model, likelihood)
    theirs = CurvatureInterface(model, likelihood)  # torch.func
    for got, want in zip(ours.jacobians(X), theirs.jacobians(X)):
        assert_close(got, want)
    for got, want in zip(ours.gradients(X, y), theirs.gradients(X, y)):
        assert_close(got, want)
    assert all(param.grad is None for param in model.parameters())
    assert all("grad_batch" not in vars(param) for param in model.parameters())


def test_last_layer_jacobians_are_differentiable_in_the_input():
    fitted = _fitted(CurvhooksGGN, "classification", "mlp", subset_of_weights="last_layer")
    X = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    J, f = fitted.backend.last_layer_jacobians(X, enable_backprop=True)
    expected = CurvatureInterface.last_layer_jacobians(fitted.backend, X, enable_backprop=True)
    assert_close(J, expected[0])
    assert_close(f, expected[1])
    (gradient,) = torch.autograd.grad(J.square().sum() + f.sum(), X)
    (want,) = torch.autograd.grad(expected[0].square().sum() + expected[1].sum(), X)
    assert_close(gradient, want)


def test_kron_gives_norm_layers_their_exact_blocks():
    """A model with a BatchNorm (eval mode): its parameters' blocks in ``kron`` are the
    exact GGN's; the Linear layers' are KFAC's (curvhooks.kfac, tested elsewhere)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model.double().eval()
    model[1].running_mean.normal_()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    options = {"subset_of_weights": "all", "hessian_structure": "kron"}
    laplace = Laplace(model, "classification", backend=CurvhooksGGN, **options)
    laplace.fit(loader)
    matrix = laplace.H.to_matrix()
    exact = reference.ggn(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    norm = slice(25, 35)  # the BatchNorm's weight and bias, after the first Linear's 25
    assert_close(matrix[norm, norm].diagonal(), exact[norm, norm].diagonal())
    assert_close(matrix[25:30, 25:30], exact[25:30, 25:30])
    assert_close(matrix[30:35, 30:35], exact[30:35, 30:35])
    kfac = curvhooks.kfac(model, nn.CrossEntropyLoss(reduction="sum"), [(X, y)], others="dense")
    assert_close(matrix, kfac.to_dense())


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_stochastic_ggn_approaches_the_ggn(structure):
    """``stochastic=True``: the Monte Carlo GGN (or KFAC) of many sampled labels is near the
    exact one."""
    options = {"subset_of_weights": "all", "hessian_structure": structure}
    model, loader = _problem("classification", "mlp")
    stochastic = {"stochastic": True, "num_samples": 4000}
    laplace = Laplace(
        model, "classification", backend=CurvhooksGGN, backend_kwargs=stochastic, **options
    )
    laplace.fit(loader)
    exact = _fitted(CurvhooksGGN, "classification", "mlp", **options)
    got, want = _matrix(laplace), _matrix(exact)
    assert 0 < (got - want).norm() / want.norm() < 0.05


def test_dict_inputs_and_the_hessian_s_kron_are_refused():
    model, _ = _problem("regression", "mlp")
    backend = CurvhooksHessian(model, "regression")
    with pytest.raises(ValueError, match="tensor inputs"):
        backend.jacobians({"input_ids": torch.zeros(2, 4)})
    with pytest.raises(NotImplementedError, match="CurvhooksGGN or CurvhooksEF"):
        backend.kron(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 2), N=2)


@pytest.mark.parametrize("bias", [True, False])
def test_kron_of_one_by_one_weights_over_several_batches(bias):
    """A ``[1, 1]`` weight keeps two factors, so that the batches' sums are those of the
    factors (as BackPACK's backend gives them), not of their products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1, bias=bias), nn.Tanh(), nn.Linear(1, 1, bias=bias))
    X, y = torch.randn(12, 1), torch.randn(12, 1)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    matrices = []
    for backend in (CurvhooksGGN, BackPackGGN):
        laplace = Laplace(
            copy.deepcopy(model), "regression", backend=backend, subset_of_weights="all",
            hessian_structure="kron",
        )  # fmt: skip
        laplace.fit(loader)
        matrices.append(_matrix(laplace))
    assert_close(*matrices)


def test_kron_refuses_a_factorless_parameter_of_two_dimensions():
    """laplace-torch's ``Kron`` holds a 2-D parameter only as two factors; an ``Embedding``
    has none: a clear error, while ``full`` serves the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2))
    X, y = torch.randint(0, 6, (8, 2)), torch.randn(8, 2)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    options = {"subset_of_weights": "all"}
    kron = Laplace(model, "regression", backend=CurvhooksGGN, hessian_structure="kron", **options)
    with pytest.raises(ValueError, match="only as two Kronecker factors"):
        kron.fit(loader)
    fitted = Laplace(model, "regression", backend=CurvhooksGGN, hessian_structure="full", **options)
    fitted.fit(loader)
    expected = Laplace(
        model, "regression", backend=CurvlinopsGGN, hessian_structure="full", **options
    )
    expected.fit(loader)
    assert_close(fitted.H, expected.H)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("ours, peer", [(CurvhooksGGN, CurvlinopsGGN), (CurvhooksEF, CurvlinopsEF)])
def test_frozen_parameters_are_left_out(ours, peer, structure):
    """Parameters with ``requires_grad=False`` have no rows; the rest as curvlinops'
    (whose dense matrix gives the diagonal)."""
    matrices = []
    for backend, kind in ((ours, structure), (peer, "full")):
        model, loader = _problem("classification", "mlp")
        model[0].weight.requires_grad_(False)
        model[2].bias.requires_grad_(False)
        laplace = Laplace(
            model, "classification", backend=backend, subset_of_weights="all",
            hessian_structure=kind,
        )  # fmt: skip
        laplace.fit(loader)
        matrices.append(_matrix(laplace))
    ours_matrix, full = matrices
    assert_close(ours_matrix, full if structure == "full" else full.diagonal())


def test_a_second_fit_without_override_adds_to_the_first():
    options = {"subset_of_weights": "all", "hessian_structure": "kron"}
    matrices = []
    for backend in (CurvhooksGGN, CurvlinopsGGN):
        model, loader = _problem("classification", "cnn")
        laplace = Laplace(model, "classification", backend=backend, **options)
        laplace.fit(loader)
        laplace.fit(loader, override=False)
        matrices.append(_matrix(laplace))
    assert_close(*matrices)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_the_hessian_s_diagonal(likelihood):
    options = {"subset_of_weights": "all", "hessian_structure": "diag"}
    fitted = _fitted(CurvhooksHessian, likelihood, "mlp", **options)
    model, loader = _problem(likelihood, "mlp")
    X, y = (torch.cat(parts) for parts in zip(*loader))
    expected = reference.hessian_matrix(model, fitted.backend.lossfunc, X, y).diagonal()
    assert_close(fitted.H, fitted.backend.factor * expected)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_fitting_leaves_the_model_as_it_was(structure):
    """No ``p.grad``, no result attributes and no hooks left on the model."""
    model, loader = _problem("classification", "cnn")
    options = {"subset_of_weights": "all", "hessian_structure": structure}
    Laplace(model, "classification", backend=CurvhooksGGN, **options).fit(loader)
    for param in model.parameters():
        assert param.grad is None
        assert set(vars(param)) <= {"_is_param"}, vars(param)
    for module in model.modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
        assert not any(hooks), module


def test_a_parameter_that_does_not_reach_the_loss():
    """A module the forward pass never calls: zero rows in ``full``, ``diag`` and the
    gradients (as laplace-torch's ``torch.func`` gradients give them); ``kron`` names it."""

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.unused, self.last = nn.Linear(4, 5), nn.Linear(2, 2), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.last(torch.tanh(self.first(x)))

    torch.manual_seed(0)
    model = Unused()
    X, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    ours, theirs = CurvhooksEF(model, "classification"), CurvatureInterface(model, "classification")
    for got, want in zip(ours.gradients(X, y), theirs.gradients(X, y)):
        assert_close(got, want)
    unused = slice(25, 31)  # after the first layer's 25 entries
    for structure in ("full", "diag"):
        options = {"subset_of_weights": "all", "hessian_structure": structure}
        laplace = Laplace(model, "classification", backend=CurvhooksGGN, **options)
        laplace.fit(loader)
        assert not laplace.H[unused].any()
        expected = reference.ggn(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
        assert_close(laplace.H, expected if structure == "full" else expected.diagonal())
    kron = Laplace(
        model, "classification", backend=CurvhooksGGN, subset_of_weights="all",
        hessian_structure="kron",
    )  # fmt: skip
    with pytest.raises(ValueError, match="unused.weight does not reach the loss"):
        kron.fit(loader)
