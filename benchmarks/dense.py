"""Dense curvature matrices on the visual-tour setting and a tiny residual CNN, and how
they scale with D.

Run: ``python -m benchmarks.dense [--repeats 5] [--problem visual-tour|residual]``; writes
docs/benchmarks/dense.md when it ran both problems; ``--scaling`` instead times the full GGN
and Hessian for D from 1e3 to 2e4 (docs/benchmarks/dense_scaling.md).
Each matrix (Hessian, GGN, empirical Fisher over all three batches) against one plain
backward pass over the loader and, where installed, curvlinops (linear operator @ identity),
BackPACK (square-root factors and per-sample gradients assembled by hand; on the residual CNN
on the copy its converter traces) and ``torch.func``. A method that raises (an unsupported
model) is listed as failed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import curvhooks
from benchmarks.common import (
    backpack_extended,
    environment,
    markdown_table,
    optional,
    peak_memory_of,
    plain_backward,
    problems_parser,
    run_problems,
    write_doc,
)
from benchmarks.problems import RESIDUAL, DenseProblem, residual

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import visual_tour  # noqa: E402

KINDS = ("hessian", "ggn", "empirical_fisher")


def tour() -> DenseProblem:
    """The visual tour's model, loss and its loader's three batches."""
    model, loss_fn, loader = visual_tour.setting()
    return model, loss_fn, list(loader)


SETTINGS: dict[str, Callable[[], DenseProblem]] = {"visual-tour": tour, "residual": residual}


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    """Plain backward over the batches, curvhooks' matrices and the peers' on ``problem``."""
    model, loss_fn, batches = SETTINGS[problem]()
    model = model.to(device)
    data = [(X.to(device), y.to(device)) for X, y in batches]

    methods = {"backward": plain_backward(model, loss_fn, data)}
    for kind in KINDS:
        function = getattr(curvhooks, kind)
        methods[f"curvhooks {kind}"] = lambda function=function: function(model, loss_fn, data)
    for structure in ("param", "diag"):
        for route in ("hooks", "autograd"):
            methods[f"hessian {structure} by {route}"] = lambda s=structure, r=route: (
                curvhooks.hessian(model, loss_fn, data, structure=s, route=r)
            )
    methods.update(_torch_func(model, loss_fn, data))
    if optional("curvlinops"):
        methods.update(_curvlinops(model, loss_fn, data, device))
    if optional("backpack"):
        methods.update(_backpack(model, loss_fn, data, use_converter=problem in RESIDUAL))
    return methods


def _flat_function(model: nn.Module):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def unflatten(flat):
        pieces = flat.split([shape.numel() for shape in shapes])
        return {name: piece.view(shape) for name, piece, shape in zip(names, pieces, shapes)}

    point = torch.cat([p.detach().flatten() for p in model.parameters()])
    return unflatten, point


def _torch_func(model, loss_fn, data) -> dict[str, Callable[[], object]]:
    """References a user would write with torch.func (mean over all samples)."""
    unflatten, point = _flat_function(model)
    total = sum(len(X) for X, _ in data)
    sum_loss = type(loss_fn)(reduction="sum")

    def batch_loss(X, y):
        return lambda flat: loss_fn(functional_call(model, unflatten(flat), (X,)), y)

    def batch_output(X):
        return lambda flat: functional_call(model, unflatten(flat), (X,))

    def hessian_matrix():
        return sum(hessian(batch_loss(X, y))(point) * (len(X) / total) for X, y in data)

    def ggn_matrix():
        result = 0
        for X, y in data:
            output = functional_call(model, unflatten(point), (X,))
            jac = jacrev(batch_output(X))(point)
            hess = vmap(hessian(lambda out, t: sum_loss(out[None], t[None])))(output.detach(), y)
            result = result + torch.einsum("nca,ncd,ndb->ab", jac, hess, jac) / total
        return result

    def empirical_fisher_matrix():
        def sample_loss(flat, x, t):
            return sum_loss(functional_call(model, unflatten(flat), (x[None],)), t[None])

        grads = torch.cat(
            [vmap(grad(sample_loss), in_dims=(None, 0, 0))(point, X, y) for X, y in data]
        )
        return grads.T @ grads / total

    return {
        "torch.func hessian": hessian_matrix,
        "torch.func ggn": ggn_matrix,
        "torch.func empirical_fisher": empirical_fisher_matrix,
    }


def _curvlinops(model, loss_fn, data, device) -> dict[str, Callable[[], object]]:
    from curvlinops import EFLinearOperator, GGNLinearOperator, HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    identity = torch.eye(sum(p.numel() for p in params), device=device)
    operators = {
        "hessian": HessianLinearOperator,
        "ggn": GGNLinearOperator,
        "empirical_fisher": EFLinearOperator,
    }

    def method(operator):
        return lambda: operator(model, loss_fn, params, data, check_deterministic=False) @ identity

    return {f"curvlinops {kind}": method(operator) for kind, operator in operators.items()}


def _backpack(model, loss_fn, data, use_converter: bool) -> dict[str, Callable[[], object]]:
    from backpack import backpack
    from backpack.extensions import BatchGrad, SqrtGGNExact

    model, loss_fn = backpack_extended(model, loss_fn, use_converter)
    total = sum(len(X) for X, _ in data)

    def accumulate(extension, attribute, weight_of):
        result = 0
        for X, y in data:
            with backpack(extension()):
                loss_fn(model(X), y).backward()
            factor = torch.cat(
                [getattr(p, attribute).reshape(-1, p.numel()) for p in model.parameters()], dim=1
            )
            result = result + factor.T @ factor * weight_of(len(X))
        return result

    return {
        "backpack ggn": lambda: accumulate(SqrtGGNExact, "sqrt_ggn_exact", lambda n: n / total),
        "backpack empirical_fisher": lambda: accumulate(
            BatchGrad, "grad_batch", lambda n: n * n / total
        ),
    }


def _peers_of(method: str) -> tuple[str, ...]:
    if method.startswith("hessian") and method.endswith("hooks"):
        return (method.replace("hooks", "autograd"),)
    if not method.startswith("curvhooks"):
        return ()
    kind = method.split()[-1]
    return tuple(f"{peer} {kind}" for peer in ("torch.func", "curvlinops", "backpack"))


def scaling(repeats: int) -> str:
    """Time and peak memory of the full Hessian and GGN on wider MLPs, D from 1e3 to 2e4."""
    rows = []
    for width in (8, 32, 64, 128):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, width),
            nn.Sigmoid(),
            nn.Linear(width, width),
            nn.Sigmoid(),
            nn.Linear(width, 10),
        )
        dim = sum(p.numel() for p in model.parameters())
        loss_fn = nn.CrossEntropyLoss()
        data = [(torch.randn(64, 64), torch.randint(0, 10, (64,))) for _ in range(2)]
        row = [str(dim), f"{dim * dim * 4 / 2**20:.0f}"]
        for kind in ("ggn", "hessian"):
            run = partial(getattr(curvhooks, kind), model, loss_fn, data)

            peak = peak_memory_of(run, lambda: None, torch.device("cpu"))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            row += [f"{sorted(times)[len(times) // 2]:.3f}", f"{peak / 2**20:.0f}"]
        rows.append(row)
        print(row, flush=True)
    header = ["D", "result MB", "GGN s", "GGN peak MB", "Hessian s", "Hessian peak MB"]
    return markdown_table(header, rows)


def main() -> None:
    parser = problems_parser(list(SETTINGS), repeats=5)
    parser.add_argument(
        "--scaling", action="store_true", help="only time D from 1e3 to 2e4 (dense_scaling.md)"
    )
    args = parser.parse_args()
    if args.scaling:
        title = "Dense matrices: scaling with D"
        body = f"{environment()}, MLP 64-w-w-10 with Sigmoid, 2 batches of 64, medians of 3.\n\n"
        print("wrote", write_doc("dense_scaling", title, body + scaling(3)))
        return
    groups = tuple(
        (f"curvhooks {kind}", f"torch.func {kind}", f"curvlinops {kind}", f"backpack {kind}")
        for kind in KINDS
    )
    groups += (("hessian param",), ("hessian diag",))
    doc = ("dense", "Dense matrices (visual tour, residual CNN)")
    run_problems(args, __spec__.name, build_methods, _peers_of, list(SETTINGS), doc, groups)


if __name__ == "__main__":
    main()
