"""Operators and spectra: curvhooks against curvlinops, PyHessian and ViViT.

On the CIFAR-sized residual CNN of ``benchmarks.problems`` (``resnet``, 51,690 parameters),
batches of 64 images (three for the products, one for the spectra: PyHessian's estimates
take a hundred products):

- ``GGNOperator @ V`` and ``HessianOperator @ V`` for ``V`` ``[D, 10]`` against curvlinops'
  ``GGNLinearOperator`` and ``HessianLinearOperator``;
- the top Hessian eigenvalue to a relative 1e-3 (Lanczos, stopping on the eigenvalue's error
  bound) against PyHessian's power iteration (``pyhessian`` 0.1, ``tol=1e-3``), each
  building its operator in the timed call;
- the GGN's trace, exact (its diagonal from the hooks), against PyHessian's Hutchinson
  estimate of the Hessian's trace from 100 samples;
- and, on one batch (ViViT computes a mini-batch's GGN only), the top 10 GGN eigenpairs,
  exact (the Gram method), against ViViT's ``EighComputation`` (``vivit-for-pytorch``
  1.0.0, given back the ``Tensor.symeig`` it calls) with BackPACK's converter.

And the memory of a model of millions of parameters (``resnet18-1024``): torchvision's
ResNet-18 (11.2M parameters, ``benchmarks.problems.resnet18``) over 1,024 CIFAR-sized images
in 16 batches of 64, float32: each operator's product with one vector, the GGN's exact trace,
the top Hessian eigenvalue and the top 10 GGN eigenvalues to a relative 1e-3 (Lanczos on
single vectors; no peers).

Run: ``python -m benchmarks.operators [--repeats 3] [--problem NAME] [--threads 1]``;
writes docs/benchmarks/operators.md when it ran every problem.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

import curvhooks
from benchmarks.common import (
    backpack_extended,
    failing_build,
    optional,
    plain_backward,
    problems_parser,
    run_problems,
)
from benchmarks.problems import resnet, resnet18

SETTINGS = ("resnet-products", "resnet-spectra", "resnet-batch-eigenpairs", "resnet18-1024")
COLUMNS = 10


def _data(batches: int) -> tuple[nn.Module, nn.Module, list]:
    """The ``resnet`` problem's model and loss, and ``batches`` batches of 64 images."""
    model, loss_fn, X, y = resnet()
    torch.manual_seed(1)
    data = [(X, y)] + [
        (torch.randn_like(X), torch.randint(0, 10, y.shape)) for _ in range(batches - 1)
    ]
    return model, loss_fn, data


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    if problem == "resnet18-1024":
        model, loss_fn, data = resnet18(batches=16)
    else:
        model, loss_fn, data = _data(3 if problem == "resnet-products" else 1)
    model = model.to(device)
    data = [(X.to(device), y.to(device)) for X, y in data]

    methods = {"backward": plain_backward(model, loss_fn, data)}
    if problem == "resnet-products":
        methods.update(_products(model, loss_fn, data))
    elif problem == "resnet-spectra":
        methods.update(_spectra(model, loss_fn, data))
    elif problem == "resnet18-1024":
        methods.update(_large(model, loss_fn, data))
    else:
        methods.update(_batch_eigenpairs(model, loss_fn, data))
    return methods


def _products(model, loss_fn, data) -> dict[str, Callable[[], object]]:
    size = sum(p.numel() for p in model.parameters())
    V = torch.randn(size, COLUMNS, generator=torch.Generator().manual_seed(0))
    ggn = curvhooks.GGNOperator(model, loss_fn, data)
    hessian = curvhooks.HessianOperator(model, loss_fn, data)
    methods = {"curvhooks GGN @ V": lambda: ggn @ V, "curvhooks Hessian @ V": lambda: hessian @ V}
    if optional("curvlinops"):
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        params = list(model.parameters())
        for name, operator in (("GGN", GGNLinearOperator), ("Hessian", HessianLinearOperator)):
            linear = operator(
                model, loss_fn, params, data, progressbar=False, check_deterministic=False
            )
            methods[f"curvlinops {name} @ V"] = lambda linear=linear: linear @ V
    return methods


def _spectra(model, loss_fn, data) -> dict[str, Callable[[], object]]:
    def top_eigenvalue() -> object:
        hessian = curvhooks.HessianOperator(model, loss_fn, data)  # made anew, as PyHessian's
        return curvhooks.eigenpairs(hessian, 1, tolerance=1e-3, converge="values")

    methods = {
        "curvhooks top Hessian eigenvalue": top_eigenvalue,
        "curvhooks GGN trace, exact": lambda: curvhooks.trace(
            curvhooks.GGNOperator(model, loss_fn, data)
        ),
    }
    if optional("pyhessian"):
        from pyhessian import hessian as pyhessian

        def top() -> object:
            return pyhessian(model, loss_fn, dataloader=data, cuda=False).eigenvalues(
                top_n=1, tol=1e-3
            )

        def trace() -> object:
            torch.manual_seed(0)  # PyHessian's Rademacher vectors
            return pyhessian(model, loss_fn, dataloader=data, cuda=False).trace(
                maxIter=100, tol=0.0
            )

        methods["pyhessian top Hessian eigenvalue"] = top
        methods["pyhessian Hessian trace, 100 samples"] = trace
    return methods


def _large(model, loss_fn, data) -> dict[str, Callable[[], object]]:
    """One product with each operator, the exact GGN trace and the top eigenvalues."""
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    operators = {
        "GGN": curvhooks.GGNOperator(model, loss_fn, data),
        "Hessian": curvhooks.HessianOperator(model, loss_fn, data),
        "empirical Fisher": curvhooks.EmpiricalFisherOperator(model, loss_fn, data),
    }
    methods = {f"curvhooks {name} @ v": lambda op=op: op @ v for name, op in operators.items()}
    top = {"tolerance": 1e-3, "converge": "values", "block_size": 1, "method": "lanczos"}
    methods.update(
        {
            "curvhooks GGN trace, exact": lambda: curvhooks.trace(operators["GGN"]),
            "curvhooks top Hessian eigenvalue": lambda: curvhooks.eigenpairs(
                operators["Hessian"], 1, **top
            ),
            "curvhooks top 10 GGN eigenvalues": lambda: curvhooks.eigenpairs(
                operators["GGN"], 10, **top
            ),
        }
    )
    return methods


def _batch_eigenpairs(model, loss_fn, data) -> dict[str, Callable[[], object]]:
    ggn = curvhooks.GGNOperator(model, loss_fn, data)
    methods = {
        "curvhooks top 10 GGN eigenpairs": lambda: curvhooks.eigenpairs(ggn, 10, method="gram")
    }
    if optional("vivit") and optional("backpack"):
        methods["vivit top 10 GGN eigenpairs"] = _vivit(model, loss_fn, *data[0])
    return methods


@failing_build
def _vivit(model, loss_fn, X, y) -> Callable[[], object]:
    """ViViT's exact top 10 GGN eigenpairs of the mini-batch, through BackPACK's converter."""
    from backpack import backpack
    from vivit import EighComputation

    model, loss_fn = backpack_extended(copy.deepcopy(model), loss_fn, use_converter=True)

    def run() -> object:
        torch.Tensor.symeig = _symeig  # removed from torch; ViViT 1.0.0 still calls it
        computation = EighComputation()
        group = {
            "params": [p for p in model.parameters() if p.requires_grad],
            "criterion": lambda evals: list(range(len(evals) - 10, len(evals))),
        }
        hook = computation.get_extension_hook([group])
        with backpack(computation.get_extension(), extension_hook=hook):
            loss_fn(model(X), y).backward()
        return computation.get_result(group)

    return run


def _symeig(matrix: torch.Tensor, eigenvectors: bool = False, upper: bool = True):
    """``Tensor.symeig`` as it was, from ``torch.linalg.eigh``."""
    values, vectors = torch.linalg.eigh(matrix, UPLO="U" if upper else "L")
    return values, vectors if eigenvectors else vectors.new_zeros(0)


def _peers_of(method: str) -> tuple[str, ...]:
    pairs = {
        "curvhooks GGN @ V": ("curvlinops GGN @ V",),
        "curvhooks Hessian @ V": ("curvlinops Hessian @ V",),
        "curvhooks top Hessian eigenvalue": ("pyhessian top Hessian eigenvalue",),
        "curvhooks GGN trace, exact": ("pyhessian Hessian trace, 100 samples",),
        "curvhooks top 10 GGN eigenpairs": ("vivit top 10 GGN eigenpairs",),
    }
    return pairs.get(method, ())


def main() -> None:
    parser = problems_parser(list(SETTINGS), repeats=3)
    args = parser.parse_args()
    doc = ("operators", "Operators and spectra (resnet and ResNet-18, batches of 64)")
    run_problems(args, __spec__.name, build_methods, _peers_of, list(SETTINGS), doc)


if __name__ == "__main__":
    main()
