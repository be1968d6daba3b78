"""The extension context: lifecycle, hooks, memory, devices, and errors that say what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvhooks
from curvhooks import (
    BatchDiagGGN,
    BatchGrad,
    BatchL2Grad,
    DiagGGN,
    DiagHessian,
    HessianBlock,
    Jacobian,
    SqrtGGN,
    Variance,
)
from tests import reference
from tests.problems import (
    CASE_IDS,
    CASES,
    CNN,
    GRAPH_PROBLEMS,
    PROBLEMS,
    Scaled,
    assert_close,
    by_name,
    needs_cuda,
    run_with,
)
from tests.reference import ggn, per_sample_grads, split

MLP = PROBLEMS[0]


def _hook_count(module: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


def test_exit_leaves_the_model_as_before():
    model, loss_fn, X, y = MLP.make("ce-mean")
    with curvhooks.extend(model, loss_fn, BatchGrad(), SqrtGGN()) as context:
        assert _hook_count(model) > 0 and _hook_count(loss_fn) > 0
        loss_fn(model(X), y).backward()
        record = context._backward.recorder.record
        assert all(call.io.input is None and not call.stacks for call in record.calls)
    assert _hook_count(model) == 0 and _hook_count(loss_fn) == 0
    assert record.calls == [] and record._outputs == {}
    # torch.func works on the model afterwards
    params = {k: v.detach() for k, v in model.named_parameters()}

    def output_sum(params, x):
        return functional_call(model, params, (x[None],)).sum()

    vmap(grad(output_sum), in_dims=(None, 0))(params, X)


def test_results_belong_to_the_last_backward_pass():
    model, loss_fn, X, y = MLP.make("ce-sum")
    X2, y2 = torch.randn_like(X), y.flip(0)
    with curvhooks.extend(model, loss_fn, BatchGrad(), DiagGGN()):
        loss_fn(model(X), y).backward()
        loss_fn(model(X2), y2).backward()
    expected = per_sample_grads(model, loss_fn, X2, y2)
    expected_diag = split(ggn(model, loss_fn, X2, y2).diagonal(), model)
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name])
        assert_close(p.diag_ggn, expected_diag[name])


def test_entering_again_clears_results():
    model, loss_fn, X, y = MLP.make("ce-mean")
    run_with(model, loss_fn, X, y, BatchGrad())
    with curvhooks.extend(model, loss_fn, DiagGGN()):
        assert not any(hasattr(p, "grad_batch") for p in model.parameters())


def test_unreferenced_results_are_reused_referenced_ones_kept():
    model, loss_fn, X, y = MLP.make("ce-mean")
    weight = model[0].weight
    with curvhooks.extend(model, loss_fn, BatchGrad(), SqrtGGN()):
        loss_fn(model(X), y).backward()
        pointer = weight.grad_batch.data_ptr()
        loss_fn(model(X * 2), y).backward()
        assert weight.grad_batch.data_ptr() == pointer
        held = weight.sqrt_ggn
        snapshot = held.clone()
        loss_fn(model(X), y).backward()
        assert weight.sqrt_ggn is not held and torch.equal(held, snapshot)
    assert_close(weight.grad_batch, per_sample_grads(model, loss_fn, X, y)["0.weight"])


def test_results_are_reused_across_contexts_unless_referenced():
    model, loss_fn, X, y = MLP.make("ce-mean")
    weight = model[0].weight
    with curvhooks.extend(model, loss_fn, BatchGrad(), SqrtGGN()):
        loss_fn(model(X), y).backward()
    pointer = weight.grad_batch.data_ptr()
    held = weight.sqrt_ggn
    snapshot = held.clone()
    with curvhooks.extend(model, loss_fn, BatchGrad(), SqrtGGN()):
        assert not hasattr(weight, "grad_batch")  # entering clears results
        loss_fn(model(X * 3), y).backward()
    assert weight.grad_batch.data_ptr() == pointer
    assert torch.equal(held, snapshot) and weight.sqrt_ggn is not held
    assert_close(weight.grad_batch, per_sample_grads(model, loss_fn, X * 3, y)["0.weight"])


@pytest.mark.parametrize("problem, loss", CASES[::4], ids=CASE_IDS[::4])
def test_run_batch_and_the_chain_backward_match_loss_backward(problem, loss):
    """``run_batch`` (autograd's backward pass, and the hooks' own on a chain) gives what
    ``loss.backward()`` writes, without touching ``p.grad`` or the parameters' attributes."""
    from curvhooks.hooks import BatchResults, hooked

    extensions = (BatchGrad(), SqrtGGN()) + ((DiagHessian(),) if not problem.hessian_glue else ())
    model, loss_fn, X, y = problem.make(loss)
    expected = run_with(model, loss_fn, X, y, *extensions)
    curvhooks.hooks.sinks.ParameterAttributes().take(model)  # clear the attributes
    params = [p for p in model.parameters() if p.requires_grad]
    for route in ("auto", "graph") if problem.is_chain else ("auto",):
        for p in model.parameters():
            p.grad = None
        batch = BatchResults()
        with hooked(model, loss_fn, extensions, batch, route, params) as hooks:
            assert isinstance(hooks, curvhooks.hooks.ChainBackward) == (
                route == "auto" and problem.is_chain
            )
            output = hooks.run_batch(X, y)
        assert_close(output, model(X))
        for name, p in model.named_parameters():
            assert p.grad is None and not hasattr(p, "grad_batch")
            for attribute, value in expected[name].items():
                assert_close(batch.get(p, attribute), value)


def test_float32_results_match_float64():
    model, loss_fn, X, y = CNN.make("ce-mean")
    exact = run_with(model, loss_fn, X, y, BatchGrad(), DiagGGN())
    single = run_with(model.float(), loss_fn, X.float(), y, BatchGrad(), DiagGGN())
    for name in exact:
        for attribute, value in exact[name].items():
            assert single[name][attribute].dtype == torch.float32
            torch.testing.assert_close(
                single[name][attribute].double(), value, rtol=1e-4, atol=1e-6
            )


@needs_cuda
@pytest.mark.parametrize("problem, loss", CASES[::3], ids=CASE_IDS[::3])
def test_cuda_matches_cpu(problem, loss):
    extensions = BatchGrad(), BatchL2Grad(), Variance(), SqrtGGN(), DiagGGN(), Jacobian()
    extensions += (DiagHessian(), HessianBlock()) if not problem.hessian_glue else ()
    on_cpu = run_with(*problem.make(loss), *extensions)
    on_gpu = run_with(*problem.make(loss, device="cuda"), *extensions)
    for name in on_cpu:
        for attribute, value in on_cpu[name].items():
            assert on_gpu[name][attribute].is_cuda
            torch.testing.assert_close(on_gpu[name][attribute].cpu(), value, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------ errors
def test_unsupported_module_names_path_class_extension_and_support():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), Scaled(4)))
    with pytest.raises(curvhooks.UnsupportedError) as error:
        curvhooks.extend(model, nn.MSELoss(), BatchGrad(), generic=False).__enter__()
    message = str(error.value)
    assert "'1.1'" in message and "Scaled" in message and "BatchGrad()" in message
    assert "Linear" in message and "Conv2d" in message and "LayerNorm" in message
    assert "ReLU" not in message and "MaxPool2d" not in message  # no parameters to serve
    assert "unsupported='skip'" in message
    assert _hook_count(model) == 0


def test_unsupported_conv_argument():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(curvhooks.UnsupportedError, match="padding_mode='reflect'.*'zeros'"):
        with curvhooks.extend(model, nn.MSELoss(), BatchGrad()):
            pass


@pytest.mark.parametrize(
    "extensions, error, pattern",
    [
        ((BatchGrad,), TypeError, r"BatchGrad\(\), not BatchGrad"),
        ((BatchGrad(), BatchGrad()), ValueError, "once"),
        ((DiagGGN(), DiagGGN(mc_samples=2)), ValueError, "diag_ggn"),
        (("grad_batch",), TypeError, "instances"),
    ],
)
def test_bad_extension_arguments(extensions, error, pattern):
    model, loss_fn, _, _ = MLP.make("ce-mean")
    with pytest.raises(error, match=pattern):
        curvhooks.extend(model, loss_fn, *extensions)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_mc_samples(value):
    with pytest.raises(ValueError, match="mc_samples"):
        DiagGGN(mc_samples=value)


def test_reduction_none_is_rejected():
    with pytest.raises(ValueError, match="reduction='mean' or reduction='sum'"):
        curvhooks.extend(nn.Linear(2, 2), nn.MSELoss(reduction="none"), BatchGrad())


def _second_order_error(model, loss_fn, X, y, call=None):
    with curvhooks.extend(model, loss_fn, DiagGGN()):
        loss = (call or (lambda: loss_fn(model(X), y)))()
        loss.backward()


def test_loss_input_must_be_the_model_output():
    model, loss_fn, X, y = MLP.make("ce-mean")
    with pytest.raises(ValueError, match="not the model's output"):
        _second_order_error(model, loss_fn, X, y, call=lambda: loss_fn(model(X) * 2, y))


@pytest.mark.parametrize(
    "loss_fn, target, pattern",
    [
        (nn.NLLLoss(), torch.tensor([0, 1, 2]), "NLLLoss is not supported.*CrossEntropyLoss"),
        (
            nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)),
            torch.tensor([0, 1, 2]),
            "weight",
        ),
        (nn.CrossEntropyLoss(label_smoothing=0.1), torch.tensor([0, 1, 2]), "label_smoothing"),
        (nn.CrossEntropyLoss(ignore_index=1), torch.tensor([0, 1, 2]), "ignore_index=1"),
        (nn.CrossEntropyLoss(), torch.full((3, 3), 1 / 3, dtype=torch.float64), "probabilities"),
        (nn.MSELoss(), torch.zeros(3, 1, dtype=torch.float64), r"do not match"),
        (
            nn.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=torch.float64)),
            torch.zeros(3, 3, dtype=torch.float64),
            "pos_weight",
        ),
    ],
)
def test_unsupported_loss_arguments(loss_fn, target, pattern):
    model, _, X, _ = MLP.make("ce-mean")
    with pytest.raises(curvhooks.UnsupportedError, match=pattern):
        _second_order_error(model, loss_fn, X, target)


def test_unsupported_module_with_parameters_is_named_by_second_order():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), Scaled(4)))
    with pytest.raises(curvhooks.UnsupportedError, match=r"'1.1' \(Scaled\).*DiagGGN\(\)"):
        curvhooks.extend(model, nn.MSELoss(), DiagGGN(), generic=False).__enter__()


def test_backward_through_a_stale_forward_pass_is_rejected():
    model, loss_fn, X, y = MLP.make("ce-mean")
    with curvhooks.extend(model, loss_fn, BatchGrad()):
        stale = loss_fn(model(X), y)
        loss_fn(model(X), y)
        with pytest.raises(RuntimeError, match="latest"):
            stale.backward()


def test_the_graph_route_pushes_once_per_stack_part(monkeypatch):
    """The nested autograd call does not re-enter the hooks: one batched product per
    non-empty stack part on a residual model (the GGN's one; the Hessian's positive part from
    the loss, and both parts from the Sigmoid)."""
    from curvhooks.hooks import graph

    calls = []
    original = graph.batched_vjp
    monkeypatch.setattr(graph, "batched_vjp", lambda *args: calls.append(1) or original(*args))
    model, loss_fn, X, y = by_name("residual-sigmoid-branch").make("ce-mean")
    run_with(model, loss_fn, X, y, SqrtGGN(), DiagGGN())
    assert len(calls) == 1
    calls.clear()
    run_with(model, loss_fn, X, y, DiagHessian())
    assert len(calls) == 3


def test_results_of_any_extension_class_are_cleared_on_entry():
    from curvhooks.extensions import Extension

    class ParameterNorm(Extension):
        attribute = "test_parameter_norm"

        def compute(self, target, mat, previous=None):
            return (target.param.norm(), "any object")

    model, loss_fn, X, y = MLP.make("ce-mean")
    run_with(model, loss_fn, X, y, ParameterNorm())
    assert all(p.test_parameter_norm[1] == "any object" for p in model.parameters())
    with curvhooks.extend(model, loss_fn, BatchGrad()):
        assert not any(hasattr(p, "test_parameter_norm") for p in model.parameters())


def test_route_chain_refuses_a_graph():
    model, loss_fn, X, y = by_name("two-heads").make("ce-mean")
    with pytest.raises(curvhooks.UnsupportedError, match="route='chain'.*route='auto'"):
        run_with(model, loss_fn, X, y, DiagGGN(), route="chain")
    with pytest.raises(ValueError, match="route must be one of"):
        curvhooks.extend(model, loss_fn, DiagGGN(), route="fast")


@pytest.mark.parametrize("problem", GRAPH_PROBLEMS[:3], ids=lambda problem: problem.name)
def test_graph_route_in_chunks_of_one_vector(problem, monkeypatch):
    """Stacks pushed one vector at a time, each reduced on arrival, give the same results."""

    model, loss_fn, X, y = problem.make("ce-sum")
    extensions = (SqrtGGN(), DiagGGN(), BatchDiagGGN(), DiagHessian(), HessianBlock(), Jacobian())
    expected = run_with(model, loss_fn, X, y, *extensions)
    monkeypatch.setattr(curvhooks.tuning, "GRAPH_CHUNK_BYTES", {"cpu": 1})
    found = run_with(model, loss_fn, X, y, *extensions)
    for name, results in expected.items():
        for attribute, value in results.items():
            assert_close(found[name][attribute], value)


def test_modules_run_inside_a_torch_func_transform_are_refused():
    class VmapInside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return torch.func.vmap(self.linear)(x)

    model, loss_fn = VmapInside().double(), nn.CrossEntropyLoss()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    refused = r"'linear' \(Linear\) ran inside a torch.func transform"
    for extension in (BatchGrad(), DiagGGN()):
        with pytest.raises(curvhooks.UnsupportedError, match=refused):
            run_with(model, loss_fn, X, y, extension)
    with pytest.raises(curvhooks.UnsupportedError, match=refused):
        curvhooks.ggn(model, loss_fn, (X, y))
    expected = reference.hessian_matrix(model, loss_fn, X, y)
    assert_close(curvhooks.hessian(model, loss_fn, (X, y)), expected)  # autograd route


def test_a_subclass_that_overrides_forward_gets_the_generic_derivatives():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Doubled(4, 2)).double()
    with pytest.raises(curvhooks.UnsupportedError, match=r"'2' \(Doubled\)"):
        curvhooks.extend(model, nn.MSELoss(), BatchGrad(), generic=False).__enter__()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"'2' \(Doubled\) and serves them by torch.func"):
        found = run_with(model, nn.MSELoss(), X, y, BatchGrad())
    assert_close(
        found["2.weight"]["grad_batch"], per_sample_grads(model, nn.MSELoss(), X, y)["2.weight"]
    )


def test_unsupported_skip_leaves_those_parameters_out():
    """``unsupported="skip"``: the unsupported module's parameters get nothing (one warning
    names it); every other parameter's results are those of the whole model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Scaled(5), nn.Sigmoid(), nn.Linear(5, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match=r"'1' \(Scaled\)"):
        with curvhooks.extend(
            model, loss_fn, BatchGrad(), DiagGGN(), unsupported="skip", generic=False
        ):
            loss_fn(model(X), y).backward()
    assert not hasattr(model[1].weight, "grad_batch") and not hasattr(model[1].weight, "diag_ggn")
    grads = per_sample_grads(model, loss_fn, X, y)
    diagonal = split(ggn(model, loss_fn, X, y).diagonal(), model)
    for name in ("0.weight", "0.bias", "3.weight", "3.bias"):
        p = model.get_parameter(name)
        assert_close(p.grad_batch, grads[name])
        assert_close(p.diag_ggn, diagonal[name])
    with pytest.warns(UserWarning, match=r"'1' \(Scaled\)"):
        found = curvhooks.ggn(model, loss_fn, (X, y), unsupported="skip")
    kept = torch.cat([torch.arange(0, 25), torch.arange(30, 48)])  # all but Scaled's 5
    assert_close(found, ggn(model, loss_fn, X, y)[kept][:, kept])
    with pytest.raises(ValueError, match="unsupported must be"):
        curvhooks.extend(model, loss_fn, BatchGrad(), unsupported="ignore")


class ZeroHessianLoss(curvhooks.derivatives.LossDerivatives):
    """``NLLLoss`` on raw scores, ``-sum_n f_n[y_n]``: linear in the output, so its square
    roots have no vectors."""

    def scale(self, loss_fn, output):
        return 1 / len(output) if loss_fn.reduction == "mean" else 1.0

    def sqrt_hessian(self, loss_fn, output, target):
        return output.new_zeros(0, *output.shape)

    sqrt_hessian_rows = sqrt_hessian


@pytest.mark.parametrize("route", ["chain", "graph"])
def test_a_loss_with_zero_hessian_gives_zero_results(route, monkeypatch):
    """An empty stack (no vectors) gives zero GGN results of the right shapes on both routes;
    the Hessian is then the activations' curvature alone."""
    monkeypatch.setitem(curvhooks.derivatives.LOSS_DERIVATIVES, nn.NLLLoss, ZeroHessianLoss())
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).double()
    loss_fn = nn.NLLLoss()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    extensions = SqrtGGN(), DiagGGN(), BatchDiagGGN(), DiagHessian(), curvhooks.KFLR()
    results = run_with(model, loss_fn, X, y, *extensions, route=route)
    hessian = split(reference.hessian_matrix(model, loss_fn, X, y).diagonal(), model)
    for name, param in model.named_parameters():
        found = results[name]
        assert found["sqrt_ggn"].shape == (0, 6, *param.shape)
        assert_close(found["diag_ggn"], torch.zeros_like(param))
        assert_close(found["diag_ggn_batch"], torch.zeros(6, *param.shape, dtype=param.dtype))
        assert_close(found["diag_hessian"], hessian[name])
        assert found["kflr"][0].abs().sum() == 0
    assert hessian["0.weight"].abs().sum() > 0


def test_an_empty_batch_is_refused():
    model, loss_fn, _, _ = MLP.make("ce-sum")
    X, y = torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    with curvhooks.extend(model, loss_fn, DiagGGN()):
        with pytest.raises(ValueError, match="the batch is empty"):
            loss_fn(model(X), y)


@pytest.mark.parametrize("name", ["mlp", "conv-residual"])
def test_params_limits_the_results_to_those_parameters(name):
    model, loss_fn, X, y = by_name(name).make("ce-mean")
    extensions = BatchGrad(), DiagGGN(), DiagHessian()
    expected = run_with(model, loss_fn, X, y, *extensions)
    chosen = [model.get_parameter(n) for n in list(expected)[1:3]]
    with curvhooks.extend(model, loss_fn, *extensions, params=chosen):
        loss_fn(model(X), y).backward()
    for param_name, results in expected.items():
        param = model.get_parameter(param_name)
        served = any(param is p for p in chosen)
        for attribute, value in results.items():
            assert hasattr(param, attribute) == served
            if served:
                assert_close(getattr(param, attribute), value)
    with pytest.raises(ValueError, match="params must be parameters of the model"):
        curvhooks.extend(
            model, loss_fn, BatchGrad(), params=[nn.Parameter(torch.ones(1))]
        ).__enter__()


def test_hooks_left_on_earlier_outputs_do_nothing_after_leaving():
    """A loss built inside the context, before a later forward pass, can be differentiated
    after leaving it: plain autograd."""
    model, loss_fn, X, y = MLP.make("ce-mean")
    with curvhooks.extend(model, loss_fn, BatchGrad(), DiagGGN()):
        early = loss_fn(model(X), y)
        model(X)
    early.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_interrupted_backward_pass_leaves_nothing_for_the_next(monkeypatch):
    """Sums of a parameter used by several calls start afresh with every forward pass, also
    after a backward pass that raised halfway (its end, which hands them on, never came)."""
    model, loss_fn, X, y = by_name("tied-weights").make("ce-sum")
    add_gradient = curvhooks.hooks.reducer.Reducer.add_gradient
    calls = []

    def interrupted(self, *args):
        calls.append(1)
        add_gradient(self, *args)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(curvhooks.hooks.reducer.Reducer, "add_gradient", interrupted)
    with curvhooks.extend(model, loss_fn, BatchGrad()):
        with pytest.raises(KeyboardInterrupt):
            loss_fn(model(X), y).backward()
        model.zero_grad()
        loss_fn(model(X), y).backward()
    for p in model.parameters():
        assert_close(p.grad_batch.sum(0), p.grad)


def test_entering_one_context_twice_is_refused():
    model, loss_fn, X, y = MLP.make("ce-mean")
    context = curvhooks.extend(model, loss_fn, BatchGrad())
    with context:
        with pytest.raises(RuntimeError, match="entered already"):
            context.__enter__()
    assert _hook_count(model) == 0


def test_targets_passed_by_keyword():
    model, loss_fn, X, y = MLP.make("ce-mean")
    expected = run_with(model, loss_fn, X, y, DiagGGN())
    with curvhooks.extend(model, loss_fn, DiagGGN()):
        loss_fn(model(X), target=y).backward()
    for name, p in model.named_parameters():
        assert_close(p.diag_ggn, expected[name]["diag_ggn"])


def test_kronecker_factors_of_two_extensions_share_no_memory():
    model, loss_fn, X, y = MLP.make("ce-mean")
    with curvhooks.extend(model, loss_fn, curvhooks.KFLR(), curvhooks.KFAC()):
        loss_fn(model(X), y).backward()
    weight = model[0].weight
    assert weight.kflr[1].data_ptr() != weight.kfac[1].data_ptr()
    assert_close(weight.kflr[1], weight.kfac[1])  # A: the same input factor
