"""Kronecker-factored curvature: ``curvhooks.kfac`` against curvlinops' ``KFACLinearOperator``
over a data set, and the hook-level ``KFLR``/``KFAC`` against BackPACK's ``KFLR``/``KFAC``.

Dataset level (the visual tour's three batches, and the MLP and the CNN of
``benchmarks.problems`` as one batch): building the factors and one product with a
``[D, 10]`` block, for the type-2 and the empirical Fisher; on the tour also a hand-written
floor of the empirical factors' work. The product ``K @ V`` alone (type-2 KFAC, built once)
against its floor: one ``torch.mm`` of contiguous square matrices with as many floating-point
operations as ``K @ V``'s matrix products (counted by ``torch.profiler``). Hook level (the
MLP and the CNN): one backward pass with the extension, against a plain backward pass.

Run: ``python -m benchmarks.kronecker [--repeats 10] [--problem NAME]``; writes
docs/benchmarks/kronecker.md when it ran every problem.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvhooks
from benchmarks.common import (
    backpack_step,
    curvhooks_per_step,
    optional,
    plain_backward,
    problems_parser,
    run_problems,
)
from benchmarks.dense import tour
from benchmarks.problems import PROBLEMS, on_device

FISHERS = ("type-2", "empirical")
SETTINGS = ("visual-tour", "mlp", "cnn")


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    """Plain backward over the data, then the dataset-level and (``mlp``, ``cnn``) the
    hook-level methods of curvhooks and its peers."""
    if problem == "visual-tour":
        model, loss_fn, batches = tour()
        model = model.to(device)
        data = [(X.to(device), y.to(device)) for X, y in batches]
    else:
        model, loss_fn, X, y = on_device(PROBLEMS[problem], device)
        data = [(X, y)]

    methods = {
        "backward": plain_backward(model, loss_fn, data),
        **_dataset_methods(model, loss_fn, data, device),
    }
    if problem != "visual-tour":
        methods.update(_hook_methods(model, loss_fn, *data[0]))
    else:
        methods["hand-written floor, empirical"] = lambda: _empirical_floor(model, loss_fn, data)
    return methods


def _empirical_floor(model: nn.Sequential, loss_fn: nn.Module, data: list) -> list[Tensor]:
    """The work no empirical KFAC over ``data`` can skip, written out for a chain of
    ``Conv2d``/``Linear`` layers and other modules: per batch a forward pass keeping the
    layers' inputs and outputs, the loss gradient at every layer output by autograd, and per
    layer the two Gram products of the unfolded inputs and of the output gradients (no
    scaling, no bias, no operator). A floor to read the dataset times against."""
    factors: list[Tensor] = []
    for X, y in data:
        inputs, outputs, hidden = [], [], X
        for module in model:
            layer = isinstance(module, (nn.Conv2d, nn.Linear))
            inputs += [hidden] if layer else []
            hidden = module(hidden)
            outputs += [hidden] if layer else []
        gradients = torch.autograd.grad(loss_fn(hidden, y), outputs)
        layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
        for layer, x, g in zip(layers, inputs, gradients):
            if isinstance(layer, nn.Conv2d):
                x = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
                x, g = x.transpose(1, 2).flatten(0, 1), g.flatten(2).transpose(1, 2).flatten(0, 1)
            factors += [x.T @ x, g.T @ g]
    return factors


def _dataset_methods(model, loss_fn, data, device) -> dict[str, Callable[[], object]]:
    params = [p for p in model.parameters() if p.requires_grad]
    block = torch.randn(sum(p.numel() for p in params), 10, device=device)
    methods = {}
    for fisher in FISHERS:
        methods[f"curvhooks kfac {fisher}"] = lambda fisher=fisher: (
            curvhooks.kfac(model, loss_fn, data, fisher=fisher) @ block
        )
        if optional("curvlinops"):
            from curvlinops import KFACLinearOperator

            methods[f"curvlinops kfac {fisher}"] = lambda fisher=fisher: (
                KFACLinearOperator(
                    model,
                    loss_fn,
                    params,
                    data,
                    fisher_type=fisher,
                    separate_weight_and_bias=True,
                    check_deterministic=False,
                )
                @ block
            )
    operator = curvhooks.kfac(model, loss_fn, data)
    methods["curvhooks K @ V"] = lambda: operator @ block
    methods["torch.mm floor of K @ V"] = _mm_floor(lambda: operator @ block, device)
    return methods


MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def _mm_floor(product: Callable[[], Tensor], device: torch.device) -> Callable[[], Tensor]:
    """One ``torch.mm`` of two contiguous square ``[n, n]`` matrices with as many operations
    (``2 n^3``) as the matrix products of ``product`` (the floor of its arithmetic)."""
    with torch.profiler.profile(with_flops=True) as profile:
        product()
    flops = sum(e.flops for e in profile.key_averages() if e.key in MATRIX_PRODUCTS)
    side = max(1, round((flops / 2) ** (1 / 3)))
    first, second = torch.randn(2, side, side, device=device)
    return lambda: torch.mm(first, second)


def _hook_methods(model, loss_fn, X, y) -> dict[str, Callable[[], object]]:
    methods = {
        "curvhooks KFLR": curvhooks_per_step(model, loss_fn, X, y, curvhooks.KFLR),
        "curvhooks KFAC": curvhooks_per_step(model, loss_fn, X, y, curvhooks.KFAC),
    }
    if optional("backpack"):
        from backpack.extensions import KFAC, KFLR

        methods["backpack KFLR"] = backpack_step(model, loss_fn, X, y, KFLR)
        methods["backpack KFAC"] = backpack_step(model, loss_fn, X, y, KFAC)
    return methods


def _peers_of(method: str) -> tuple[str, ...]:
    if method.startswith("curvhooks kfac"):
        return (method.replace("curvhooks", "curvlinops"),)
    if method == "curvhooks K @ V":
        return ("torch.mm floor of K @ V",)
    if method.startswith("curvhooks K"):
        return (method.replace("curvhooks", "backpack"),)
    return ()


def main() -> None:
    args = problems_parser(list(SETTINGS), repeats=10).parse_args()
    groups = (
        ("curvhooks kfac", "curvlinops kfac", "hand-written"),
        ("curvhooks K @", "torch.mm"),
        ("curvhooks KF", "backpack K"),
    )
    doc = ("kronecker", "Kronecker factors (KFAC over a data set; KFLR, KFAC per step)")
    run_problems(args, __spec__.name, build_methods, _peers_of, list(SETTINGS), doc, groups)


if __name__ == "__main__":
    main()
