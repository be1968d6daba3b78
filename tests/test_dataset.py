"""Dataset-level matrices against ``torch.func`` references on all data at once."""

from __future__ import annotations

import importlib.util
import sys
from collections import UserDict
from collections.abc import Mapping

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvhooks
from tests import reference
from tests.problems import (
    CASE_IDS,
    CASES,
    CHAIN_CASE_IDS,
    CHAIN_CASES,
    CNN,
    PROBLEMS,
    assert_close,
    by_name,
    needs_cuda,
)

STRUCTURES = ("full", "layer", "param", "diag")
FUNCTIONS = {
    "ggn": (curvhooks.ggn, reference.ggn),
    "empirical_fisher": (curvhooks.empirical_fisher, reference.empirical_fisher),
    "hessian": (curvhooks.hessian, reference.hessian_matrix),
}


def _data(problem, loss, num_samples=7):
    """A problem with 7 samples in batches of 3, 3 and 1 (unequal last batch)."""
    model, loss_fn, X, y = problem.make(loss, num_samples=num_samples)
    return model, loss_fn, X, y, DataLoader(TensorDataset(X, y), batch_size=3)


@pytest.mark.parametrize("kind", FUNCTIONS)
@pytest.mark.parametrize("problem, loss", CASES, ids=CASE_IDS)
def test_matrices_match_reference(problem, loss, kind):
    model, loss_fn, X, y, loader = _data(problem, loss)
    function, reference_function = FUNCTIONS[kind]
    expected = reference_function(model, loss_fn, X, y)
    for structure in STRUCTURES:
        result = function(model, loss_fn, loader, structure=structure)
        assert_close(result, reference.restrict(expected, model, structure))


@needs_cuda
@pytest.mark.parametrize("problem, loss", CASES[::3], ids=CASE_IDS[::3])
def test_cuda_matches_cpu(problem, loss):
    """A CPU loader's batches go to the model's GPU; the matrices stay there and agree."""
    model, loss_fn, _, _, loader = _data(problem, loss)

    def every_matrix():
        return {
            (kind, structure): matrix
            for structure in ("full", "param", "diag")
            for kind, matrix in curvhooks.matrices(
                model, loss_fn, loader, structure=structure
            ).items()
        }

    on_cpu = every_matrix()
    model.cuda()
    for key, matrix in every_matrix().items():
        assert matrix.is_cuda
        torch.testing.assert_close(matrix.cpu(), on_cpu[key], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-mean"])
def test_matrices_shares_passes_and_matches_single_functions(loss):
    model, loss_fn, X, y, loader = _data(PROBLEMS[0], loss)
    together = curvhooks.matrices(model, loss_fn, loader)
    assert list(together) == ["hessian", "ggn", "empirical_fisher"]
    for kind, (function, _) in FUNCTIONS.items():
        assert_close(together[kind], function(model, loss_fn, loader))


def test_inside_no_grad():
    """Inside a caller's ``torch.no_grad()`` block the matrices are those outside it."""
    model, loss_fn, X, y, loader = _data(CNN, "ce-mean")
    expected = curvhooks.matrices(model, loss_fn, loader)
    diagonal = curvhooks.hessian(model, loss_fn, loader, structure="diag")
    with torch.no_grad():
        found = curvhooks.matrices(model, loss_fn, loader)
        assert_close(curvhooks.hessian(model, loss_fn, loader, structure="diag"), diagonal)
    for kind, matrix in expected.items():
        assert_close(found[kind], matrix)


def test_data_forms_agree():
    """A shuffled loader and a single (X, y) pair give the plain loader's matrix."""
    model, loss_fn, X, y, loader = _data(CNN, "ce-mean", num_samples=8)
    expected = curvhooks.ggn(model, loss_fn, loader)
    torch.manual_seed(3)
    shuffled = DataLoader(TensorDataset(X, y), batch_size=3, shuffle=True)
    assert_close(curvhooks.ggn(model, loss_fn, shuffled), expected)
    assert_close(curvhooks.ggn(model, loss_fn, (X, y)), expected)
    assert_close(curvhooks.ggn(model, loss_fn, [(X[:5], y[:5]), (X[5:], y[5:])]), expected)


def test_params_subset_and_no_side_effects():
    model, loss_fn, X, y, loader = _data(PROBLEMS[0], "ce-sum")
    params = [model[2].weight, model[4].bias]
    expected = reference.ggn(model, loss_fn, X, y)
    rows = torch.cat([torch.arange(35, 55), torch.arange(71, 74)])  # 2.weight, 4.bias
    result = curvhooks.ggn(model, loss_fn, loader, params=params)
    assert_close(result, expected[rows][:, rows])
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(hasattr(p, "sqrt_ggn") for p in model.parameters())


def test_float32_within_float32_precision():
    model, loss_fn, X, y, loader = _data(CNN, "ce-mean")
    expected = {kind: function(model, loss_fn, loader) for kind, (function, _) in FUNCTIONS.items()}
    model.float()
    loader32 = DataLoader(TensorDataset(X.float(), y), batch_size=3)
    for kind, (function, _) in FUNCTIONS.items():
        result = function(model, loss_fn, loader32)
        assert result.dtype == torch.float32
        torch.testing.assert_close(result.double(), expected[kind], rtol=1e-4, atol=1e-6)


def test_identities():
    """rank(GGN) <= N (C - 1), rank(EF) <= N, symmetry, last linear layer: Hessian = GGN."""
    model, loss_fn, X, y, loader = _data(PROBLEMS[0], "ce-mean", num_samples=4)
    found = curvhooks.matrices(model, loss_fn, loader)
    assert torch.linalg.matrix_rank(found["ggn"]) <= 4 * (3 - 1)
    assert torch.linalg.matrix_rank(found["empirical_fisher"]) <= 4
    for matrix in found.values():
        assert_close(matrix, matrix.T)
    last = slice(59, 74)  # 4.weight and 4.bias
    assert_close(found["hessian"][last, last], found["ggn"][last, last])


def test_layer_sizes():
    model, *_ = PROBLEMS[0].make("ce-mean")
    assert curvhooks.layer_sizes(model) == [35, 24, 15]
    assert curvhooks.layer_sizes(model, params=[model[2].weight]) == [20]


# ------------------------------------------------------------------------------ errors
def test_errors_say_what_to_do():
    model, loss_fn, X, y, loader = _data(PROBLEMS[0], "ce-mean")
    with pytest.raises(ValueError, match="empty"):
        curvhooks.ggn(model, loss_fn, [])
    with pytest.raises(ValueError, match="different numbers of samples"):
        curvhooks.hessian(model, loss_fn, (X, y[:-1]))
    with pytest.raises(ValueError, match="structure must be one of"):
        curvhooks.ggn(model, loss_fn, loader, structure="block")
    with pytest.raises(ValueError, match="structure='diag'"):
        curvhooks.ggn(model, loss_fn, loader, max_memory=1000)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        curvhooks.hessian(model, nn.CrossEntropyLoss(reduction="none"), loader)
    with pytest.raises(curvhooks.UnsupportedError, match="NLLLoss"):
        curvhooks.ggn(model, nn.NLLLoss(), loader)
    with pytest.raises(ValueError, match="parameters of the model"):
        curvhooks.ggn(model, loss_fn, loader, params=[nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.BatchNorm1d(5)])
def test_training_mode_batch_dependent_modules_are_rejected(layer):
    model = nn.Sequential(nn.Linear(4, 5), layer, nn.Linear(5, 2)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        curvhooks.hessian(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match=r"'1' \(.*\) is in training mode.*model.eval\(\)"):
        curvhooks.extend(model, nn.CrossEntropyLoss(), curvhooks.BatchGrad()).__enter__()
    model.eval()
    H = curvhooks.hessian(model, nn.CrossEntropyLoss(), (X, y))  # any model works in eval mode
    assert_close(H, reference.hessian_matrix(model, nn.CrossEntropyLoss(), X, y))


def test_progress_bar(capsys, monkeypatch):
    """tqdm's bar where tqdm is installed; a line of its own otherwise."""
    model, loss_fn, X, y, loader = _data(PROBLEMS[0], "ce-mean")
    expected = curvhooks.ggn(model, loss_fn, loader)
    if importlib.util.find_spec("tqdm") is not None:
        assert_close(curvhooks.ggn(model, loss_fn, loader, progress=True), expected)
        assert "3/3" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the fallback line
    assert_close(curvhooks.ggn(model, loss_fn, loader, progress=True), expected)
    assert "batch 3/3" in capsys.readouterr().err


@pytest.mark.parametrize("structure", ["param", "diag"])
@pytest.mark.parametrize("problem, loss", CASES, ids=CASE_IDS)
def test_hessian_routes_agree(problem, loss, structure):
    model, loss_fn, X, y, loader = _data(problem, loss)
    if problem.hessian_glue is not None:
        with pytest.raises(curvhooks.UnsupportedError, match=problem.hessian_glue):
            curvhooks.hessian(model, loss_fn, loader, structure=structure, route="hooks")
        return
    by_hooks = curvhooks.hessian(model, loss_fn, loader, structure=structure, route="hooks")
    by_autograd = curvhooks.hessian(model, loss_fn, loader, structure=structure, route="autograd")
    assert_close(by_hooks, by_autograd)


def test_hessian_route_choice():
    model, loss_fn, X, y = by_name("unsupported-in-chain").make("ce-mean")
    expected = reference.hessian_matrix(model, loss_fn, X, y).diagonal()
    assert_close(curvhooks.hessian(model, loss_fn, (X, y), structure="diag"), expected)  # auto
    with pytest.raises(curvhooks.UnsupportedError, match="PowBackward0"):
        curvhooks.hessian(model, loss_fn, (X, y), structure="diag", route="hooks")
    with pytest.raises(ValueError, match="structure='param' or 'diag'"):
        curvhooks.hessian(*PROBLEMS[0].make("ce-mean")[:2], (X, y), route="hooks")
    with pytest.raises(ValueError, match="route must be one of"):
        curvhooks.hessian(model, loss_fn, (X, y), route="fast")


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
def test_gram_in_row_panels(monkeypatch, kind):
    """With panels smaller than the matrix, each panel is multiplied from its diagonal on,
    then mirrored."""
    monkeypatch.setattr(curvhooks.tuning, "PANEL", 7)
    model, loss_fn, X, y, loader = _data(PROBLEMS[0], "ce-mean")
    function, reference_function = FUNCTIONS[kind]
    expected = reference_function(model, loss_fn, X, y)
    for structure in ("full", "layer"):
        result = function(model, loss_fn, loader, structure=structure)
        assert_close(result, reference.restrict(expected, model, structure))


def test_hook_level_results_survive_dataset_functions():
    model, loss_fn, X, y, loader = _data(PROBLEMS[0], "ce-mean")
    with curvhooks.extend(model, loss_fn, curvhooks.BatchGrad(), curvhooks.DiagGGN()):
        loss_fn(model(X), y).backward()
    before = {name: (p.grad_batch, p.diag_ggn) for name, p in model.named_parameters()}
    curvhooks.matrices(model, loss_fn, loader)
    curvhooks.hessian(model, loss_fn, loader, structure="diag")
    for name, p in model.named_parameters():
        assert p.grad_batch is before[name][0] and p.diag_ggn is before[name][1]
        assert not hasattr(p, "sqrt_ggn") and not hasattr(p, "diag_hessian")


def test_hessian_in_small_chunks_of_directions():
    """Several vectorised calls per task (chunks of 3 directions) give the same matrix."""
    model, loss_fn, X, y, loader = _data(CNN, "ce-mean")
    expected = reference.hessian_matrix(model, loss_fn, X, y)
    for structure in STRUCTURES:
        found = curvhooks.hessian(
            model, loss_fn, loader, structure=structure, route="autograd", chunk_size=3
        )
        assert_close(found, reference.restrict(expected, model, structure))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        curvhooks.hessian(model, loss_fn, loader, chunk_size=0)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_autograd_hessian_any_model_and_parameter_order(structure):
    """A non-Sequential model (one stage), and parameters listed against the model's order."""
    model, loss_fn, X, y, loader = _data(by_name("two-heads"), "ce-mean")
    expected = reference.hessian_matrix(model, loss_fn, X, y)
    found = curvhooks.hessian(model, loss_fn, loader, structure=structure, route="autograd")
    assert_close(found, reference.restrict(expected, model, structure))

    model, loss_fn, X, y, loader = _data(CNN, "mse-sum")
    params = [model[5].weight, model[0].bias, model[2].weight]  # against the model's order
    expected = reference.hessian_matrix(model, loss_fn, X, y)
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    offsets = torch.tensor([0] + [p.numel() for p in model.parameters()]).cumsum(0)
    rows = torch.cat(
        [
            torch.arange(offsets[index[n]], offsets[index[n] + 1])
            for n in ("5.weight", "0.bias", "2.weight")
        ]
    )
    found = curvhooks.hessian(
        model, loss_fn, loader, params=params, structure="full", route="autograd"
    )
    assert_close(found, expected[rows][:, rows])


@pytest.mark.parametrize("problem, loss", CHAIN_CASES, ids=CHAIN_CASE_IDS)
def test_chain_and_graph_routes_agree(problem, loss):
    """The hooks' own backward pass along a chain and autograd's batched products on the
    graph give the same matrices."""
    model, loss_fn, X, y, loader = _data(problem, loss)
    for structure in STRUCTURES:
        kinds = ("ggn", "empirical_fisher") + (
            ("hessian",) if structure in ("param", "diag") else ()
        )
        by_route = {
            route: curvhooks.matrices(
                model, loss_fn, loader, kinds, structure=structure, route=route
            )
            for route in ("chain", "graph")
        }
        for kind in kinds:
            assert_close(by_route["graph"][kind], by_route["chain"][kind])


def test_route_errors():
    model, loss_fn, X, y, loader = _data(by_name("two-heads"), "ce-mean")
    with pytest.raises(curvhooks.UnsupportedError, match="route='chain'"):
        curvhooks.ggn(model, loss_fn, loader, route="chain")
    with pytest.raises(ValueError, match="route must be one of"):
        curvhooks.empirical_fisher(model, loss_fn, loader, route="fast")


class _StructuredInput(nn.Module):
    """A network whose input is a structure: the tensor under key ``"x"`` of a mapping, or
    the first item of a tuple."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs) -> torch.Tensor:
        x = inputs["x"] if isinstance(inputs, Mapping) else inputs[0]
        return self.net(x)


@pytest.mark.parametrize("form", ["dict", "UserDict", "tuple"])
@pytest.mark.parametrize("kind", FUNCTIONS)
def test_inputs_of_any_structure(form, kind):
    """N is taken from y; the structure is moved to the model's device as it is."""
    net, loss_fn, X, y, _ = _data(PROBLEMS[0], "ce-mean")
    wrap = {
        "dict": lambda x: {"x": x},
        "UserDict": lambda x: UserDict(x=x),
        "tuple": lambda x: (x, "tag"),
    }
    loader = [(wrap[form](X[:4]), y[:4]), (wrap[form](X[4:]), y[4:])]
    function, reference_function = FUNCTIONS[kind]
    expected = reference_function(net, loss_fn, X, y)
    for structure in STRUCTURES:
        found = function(_StructuredInput(net), loss_fn, loader, structure=structure)
        assert_close(found, reference.restrict(expected, net, structure))
    single = function(_StructuredInput(net), loss_fn, (wrap[form](X), y))
    assert_close(single, expected)


def test_batch_size_fn():
    net, loss_fn, X, y, _ = _data(PROBLEMS[0], "ce-mean")
    counted = []

    def batch_size(inputs) -> int:
        counted.append(len(inputs["x"]))
        return len(inputs["x"])

    loader = [({"x": X[:4]}, y[:4]), ({"x": X[4:]}, y[4:])]
    found = curvhooks.ggn(_StructuredInput(net), loss_fn, loader, batch_size_fn=batch_size)
    assert_close(found, reference.ggn(net, loss_fn, X, y))
    assert counted == [4, 3]


def test_autograd_hessian_leaves_a_model_holding_a_module_twice_intact():
    """``torch.func.functional_call`` would leave plain tensors in the repeated module."""
    model, loss_fn, X, y = by_name("unrolled-recurrence").make("mse-sum")
    params = [p for m in model.modules() for p in m._parameters.values()]
    found = curvhooks.hessian(model, loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])], route="autograd")
    assert_close(found, reference.hessian_matrix(model, loss_fn, X, y))
    assert [p for m in model.modules() for p in m._parameters.values()] == params
    assert all(isinstance(p, nn.Parameter) for p in params)


def test_a_parameter_that_does_not_reach_the_loss_has_zero_curvature():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
            self.spare = nn.Linear(6, 2)

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model, loss_fn = Unused().double(), nn.CrossEntropyLoss()
    X, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    for function, reference_function in FUNCTIONS.values():
        expected = reference_function(model, loss_fn, X, y)
        assert expected[-14:].abs().sum() == 0  # spare's rows
        for structure in STRUCTURES:
            found = function(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])], structure=structure)
            assert_close(found, reference.restrict(expected, model, structure))


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
@pytest.mark.parametrize("problem, loss", CASES[::3], ids=CASE_IDS[::3])
def test_autograd_route_of_ggn_and_empirical_fisher(problem, loss, kind):
    """Per-sample Jacobians by ``torch.func`` give the same matrices, on any problem."""
    model, loss_fn, X, y, loader = _data(problem, loss)
    function, reference_function = FUNCTIONS[kind]
    expected = reference_function(model, loss_fn, X, y)
    for structure in STRUCTURES:
        found = function(model, loss_fn, loader, structure=structure, route="autograd")
        assert_close(found, reference.restrict(expected, model, structure))


def test_auto_route_takes_autograd_where_the_hooks_cannot_serve():
    """A parent's forward that uses its child's weight directly: the hooks cannot serve that
    weight, so ``route="auto"`` computes the GGN and empirical Fisher by autograd."""

    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(x)) @ self.inner.weight)

    torch.manual_seed(0)
    model, loss_fn = Direct().double(), nn.CrossEntropyLoss()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    assert_close(curvhooks.ggn(model, loss_fn, data), reference.ggn(model, loss_fn, X, y))
    expected = reference.empirical_fisher(model, loss_fn, X, y)
    assert_close(curvhooks.empirical_fisher(model, loss_fn, data), expected)
    with pytest.raises(curvhooks.UnsupportedError, match="inner.weight.*used outside"):
        curvhooks.ggn(model, loss_fn, data, route="hooks")


class Recurrent(nn.Module):
    """A two-layer recurrent classifier on its last step."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, num_layers=2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_recurrent_models_by_autograd(cell):
    """vmap cannot batch a recurrent layer's forward pass over samples: the per-sample
    Jacobians are then taken a sample at a time."""
    torch.manual_seed(0)
    model, loss_fn = Recurrent(cell).double(), nn.CrossEntropyLoss()
    X, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    assert_close(curvhooks.ggn(model, loss_fn, data), reference.ggn(model, loss_fn, X, y))
    gradients = []
    for n in range(len(X)):  # torch.func's vmap(grad) cannot batch the recurrence either
        loss = loss_fn(model(X[n : n + 1]), y[n : n + 1]) / len(X)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        gradients.append(torch.cat([g.flatten() for g in grads]))
    gradients = torch.stack(gradients)
    found = curvhooks.empirical_fisher(model, loss_fn, data)
    assert_close(found, gradients.T @ gradients * len(X))


def test_batchnorm_without_running_statistics_is_rejected_on_every_route():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    model = nn.Sequential(*model, nn.Linear(4, 2)).double().eval()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    for function in (curvhooks.ggn, curvhooks.empirical_fisher, curvhooks.hessian):
        with pytest.raises(ValueError, match="'1' .* track_running_stats=False"):
            function(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match="track_running_stats=True"):
        curvhooks.extend(model, nn.CrossEntropyLoss(), curvhooks.BatchGrad()).__enter__()


def _model_state(model: nn.Module) -> dict:
    """Everything a dataset function could change on a model: the parameters' attributes,
    flags, values and gradients, and every module's hooks."""
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
    hook_dicts += ("_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return {
        "params": [
            (dict(p.__dict__), p.requires_grad, p.detach().clone(), p.grad, p._backward_hooks)
            for p in model.parameters()
        ],
        "hooks": [
            {name: dict(getattr(m, name, {})) for name in hook_dicts} for m in model.modules()
        ],
        "training": [m.training for m in model.modules()],
    }


def _assert_same_state(found: dict, expected: dict) -> None:
    assert found["hooks"] == expected["hooks"] and found["training"] == expected["training"]
    for now, before in zip(found["params"], expected["params"], strict=True):
        assert now[0].keys() == before[0].keys()
        assert all(now[0][key] is before[0][key] for key in before[0])
        assert now[1] == before[1] and torch.equal(now[2], before[2])
        assert now[3] is before[3] and now[4] == before[4]


DATASET_CALLS = {
    "ggn": (curvhooks.ggn, {}),
    "ggn-params-subset": (curvhooks.ggn, {"params": "last"}),
    "kfac-params-subset": (curvhooks.kfac, {"params": "last"}),
    "ggn-graph-layer": (curvhooks.ggn, {"structure": "layer", "route": "graph"}),
    "ggn-autograd": (curvhooks.ggn, {"route": "autograd"}),
    "empirical-fisher-diag": (curvhooks.empirical_fisher, {"structure": "diag"}),
    "hessian": (curvhooks.hessian, {}),
    "hessian-hooks-param": (curvhooks.hessian, {"structure": "param"}),
    "matrices": (curvhooks.matrices, {}),
    "kfac": (curvhooks.kfac, {"eigen_correction": True}),
    "kfac-empirical": (curvhooks.kfac, {"fisher": "empirical"}),
}
"""Dataset functions and arguments; ``params="last"``: the last trainable parameter."""


@pytest.mark.parametrize("call", DATASET_CALLS)
@pytest.mark.parametrize("name", ["frozen-params", "conv-residual"])
def test_dataset_functions_leave_the_model_as_they_found_it(name, call):
    """No attribute, ``requires_grad`` flag (also during the call), value, gradient or hook
    of the user's model changes; a result attribute the user holds stays as it was."""
    model, loss_fn, X, y, loader = _data(by_name(name), "ce-mean")
    first = next(model.parameters())
    first.grad_batch = torch.ones(1)  # a result of the user's, from an earlier context
    first.grad = torch.zeros_like(first)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    during = []
    for module in model.modules():
        module.register_forward_pre_hook(
            lambda module, args: during.append([p.requires_grad for p in params])
        )
    before = _model_state(model)
    function, options = DATASET_CALLS[call]
    if options.get("params") == "last":
        options = {"params": [p for p in params if p.requires_grad][-1:]}
    function(model, loss_fn, loader, **options)
    _assert_same_state(_model_state(model), before)
    assert during and all(seen == flags for seen in during)


def test_one_shot_data_is_iterated_again_only_from_its_first_batch():
    """A one-shot iterator keeps its first batch (the hooks may stop after it to start
    again); a second full pass over it raises instead of seeing no data."""
    from curvhooks.dataset.weighting import FirstBatchKept

    batches = FirstBatchKept(iter([1, 2, 3]))
    next(iter(batches))  # a pass that stops after the first batch
    assert list(batches) == [1, 2, 3]
    with pytest.raises(ValueError, match="past its first batch already"):
        list(batches)
    model, loss_fn, X, y, _ = _data(by_name("conv-residual"), "ce-mean")
    one_shot = iter([(X[:3], y[:3]), (X[3:], y[3:])])
    with pytest.raises(ValueError, match="past its first batch already"):
        curvhooks.matrices(model, loss_fn, one_shot, ("ggn", "hessian"))


@pytest.mark.parametrize("name, loss", [("conv-residual", "ce-mean"), ("mlp", "bce-sum")])
def test_monte_carlo_ggn(name, loss):
    """``mc_samples``: the same matrix on every route and structure at a seed, the caller's
    random state left as it was; another seed another matrix; its mean over many samples
    tends to the exact GGN."""
    model, loss_fn, X, y = by_name(name).make(loss, num_samples=7)
    data = list(zip(X.split(4), y.split(4)))
    state = torch.random.get_rng_state()
    sampled = {
        route: curvhooks.ggn(model, loss_fn, data, mc_samples=2, seed=3, route=route)
        for route in ("hooks", "graph", "autograd")
    }
    assert torch.equal(torch.random.get_rng_state(), state)
    for matrix in sampled.values():
        assert_close(matrix, sampled["hooks"])
    diagonal = curvhooks.ggn(model, loss_fn, data, structure="diag", mc_samples=2, seed=3)
    assert_close(diagonal, sampled["hooks"].diagonal())
    other = curvhooks.ggn(model, loss_fn, data, mc_samples=2, seed=4)
    assert (other - sampled["hooks"]).abs().max() > 1e-3 * other.abs().max()
    exact = reference.ggn(model, loss_fn, X, y)
    mean = curvhooks.ggn(model, loss_fn, data, mc_samples=4000, seed=0)
    assert (mean - exact).abs().max() < 0.05 * exact.abs().max()
    with pytest.raises(ValueError, match="mc_samples"):
        curvhooks.ggn(model, loss_fn, data, mc_samples=0)


@pytest.mark.parametrize("kind", FUNCTIONS)
@pytest.mark.parametrize("problem, loss", CASES[::7], ids=CASE_IDS[::7])
def test_return_loss(problem, loss, kind):
    """``return_loss=True``: the matrix as without it, and the whole-dataset loss of all the
    samples as one batch, over unequal batches, on the route each kind takes."""
    model, loss_fn, X, y, data = _data(problem, loss)
    function = FUNCTIONS[kind][0]
    matrix, found = function(model, loss_fn, data, structure="diag", return_loss=True)
    assert_close(matrix, function(model, loss_fn, data, structure="diag"))
    assert found.dim() == 0 and not found.requires_grad
    with torch.no_grad():
        assert_close(found, loss_fn(model(X), y))
    both = curvhooks.matrices(model, loss_fn, data, ("ggn", "hessian"), return_loss=True)
    assert set(both) == {"ggn", "hessian", "loss"}
    assert_close(both["loss"], found)
