"""Two processes on loopback (gloo), each with part of an unevenly split data set, give
exactly the single-process matrices, operator products, eigenvalues and traces; mismatched
models give a clear error, not a hang."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvhooks
from tests.problems import CNN, assert_close

STRUCTURES = ("full", "layer", "param", "diag")
KINDS = ("ggn", "empirical_fisher", "hessian")
LOSSES = ("ce-mean", "mse-sum")
PROBLEM = CNN  # a CNN with Sigmoid and ReLU
OPERATORS = {
    "ggn": curvhooks.GGNOperator,
    "empirical_fisher": curvhooks.EmpiricalFisherOperator,
    "hessian": curvhooks.HessianOperator,
}


def _shards(X, y, rank):
    """9 samples: rank 0 holds batches of 4 and 2, rank 1 one batch of 3."""
    if rank == 0:
        return [(X[:4], y[:4]), (X[4:6], y[4:6])]
    return [(X[6:], y[6:])]


def _compute(model, loss_fn, data, group=None) -> dict[str, torch.Tensor]:
    results = {}
    for kind in KINDS:
        for structure in STRUCTURES:
            function = getattr(curvhooks, kind)
            results[f"{kind}-{structure}"] = function(
                model, loss_fn, data, structure=structure, process_group=group
            )
    found = curvhooks.matrices(model, loss_fn, data, process_group=group, return_loss=True)
    results.update({f"matrices-{kind}": matrix for kind, matrix in found.items()})
    for eigen_correction in (False, True):
        kronecker = curvhooks.kfac(
            model, loss_fn, data, eigen_correction=eigen_correction, process_group=group
        )
        results[f"kfac-{eigen_correction}"] = kronecker.to_dense()
    columns = torch.randn(
        sum(p.numel() for p in model.parameters()),
        3,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    for name, operator_class in OPERATORS.items():
        operator = operator_class(model, loss_fn, data, process_group=group)
        results[f"{name}-operator"] = operator @ columns
        results[f"{name}-eigenvalues"] = curvhooks.eigenpairs(operator, 3, tolerance=1e-12)[0]
        results[f"{name}-trace"] = curvhooks.trace(operator, samples=6).value
    return results


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    # A file store: no port to find free and then race for.
    store = f"file://{os.path.join(out_dir, 'store')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world_size)
    try:
        saved = {}
        for loss in LOSSES:
            model, loss_fn, X, y = PROBLEM.make(loss, num_samples=9)
            saved[loss] = _compute(model, loss_fn, _shards(X, y, rank))
        model, loss_fn, X, y = PROBLEM.make("ce-mean", num_samples=9)
        wrapped = nn.parallel.DistributedDataParallel(model)
        saved["ddp-ggn"] = curvhooks.ggn(wrapped, loss_fn, _shards(X, y, rank))
        if rank == 1:
            model = nn.Sequential(model, nn.Linear(4, 4)).double()
        try:
            curvhooks.ggn(model, loss_fn, _shards(X, y, rank))
            saved["mismatch"] = "no error"
        except ValueError as error:
            saved["mismatch"] = str(error)
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.start_processes(_worker, args=(2, str(out_dir)), nprocs=2, start_method="spawn")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("loss", LOSSES)
def test_every_rank_gets_the_single_process_matrices(ranks, loss):
    model, loss_fn, X, y = PROBLEM.make(loss, num_samples=9)
    expected = _compute(model, loss_fn, [(X, y)])
    for saved in ranks:
        assert saved[loss].keys() == expected.keys()
        for name, matrix in expected.items():
            assert_close(saved[loss][name], matrix)


def test_distributed_data_parallel_model_is_accepted(ranks):
    model, loss_fn, X, y = PROBLEM.make("ce-mean", num_samples=9)
    expected = curvhooks.ggn(model, loss_fn, [(X, y)])
    for saved in ranks:
        assert_close(saved["ddp-ggn"], expected)


def test_mismatched_models_raise_on_every_rank(ranks):
    for saved in ranks:
        assert "models differ" in saved["mismatch"] and "same model" in saved["mismatch"]
