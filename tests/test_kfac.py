"""``curvhooks.kfac`` against ``tests.reference.kronecker_factors`` and curvlinops."""

from __future__ import annotations

import importlib.util
from functools import partial

import pytest
import torch

import curvhooks
from curvhooks import SqrtGGN
from curvhooks.operators.kronecker import Kronecker
from tests import reference
from tests.problems import assert_close, by_name, run_with
from tests.test_kronecker_extensions import _layers

PROBLEMS = ["mlp", "linear-extra-dims-output", "conv-groups-no-bias", "conv-residual", "conv1d"]
CASES = [
    (name, loss, fisher, approx)
    for name in PROBLEMS
    for loss in by_name(name).losses[:2] + by_name(name).losses[-1:]
    for fisher in ("type-2", "empirical")
    for approx in ("expand", "reduce")
]
BATCHES = (3, 2)


def _data(name: str, loss: str, batches: tuple[int, ...] = BATCHES):
    model, loss_fn, X, y = by_name(name).make(loss, num_samples=sum(batches))
    return model, loss_fn, X, y, list(zip(X.split(batches), y.split(batches)))


@pytest.mark.parametrize(
    "name, loss, fisher, approx", CASES, ids=["-".join(case) for case in CASES]
)
def test_factors_over_unequal_batches(name, loss, fisher, approx):
    """The factors, and the product with factors kept as thin roots (before ``factors``
    forms them) against the formed matrix."""
    model, loss_fn, X, y, data = _data(name, loss)
    K = curvhooks.kfac(model, loss_fn, data, fisher=fisher, approx=approx)
    v = torch.randn(K.shape[0], 3, dtype=X.dtype, generator=torch.Generator().manual_seed(0))
    product = K @ v
    assert_close(product, K.to_dense() @ v)
    for layer in _layers(model):
        B, A = reference.kronecker_factors(model, loss_fn, X, y, layer, fisher, approx)
        assert_close(K.factors[f"{layer}.weight"][0], B)
        assert_close(K.factors[f"{layer}.weight"][1], A)
        if f"{layer}.bias" in K.factors:
            assert_close(K.factors[f"{layer}.bias"][0], B)


@pytest.mark.parametrize("batches", [(5, 4), (5, 30)], ids=["stays-thin", "formed-later"])
def test_thin_output_factors(batches):
    """A layer of 40 outputs under the empirical Fisher: its B has a row per sample, so it stays
    a thin root over 9 samples (divided by the sample count at the end as a root) and is
    formed by the second batch of 30; factors and products as the reference says."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 40)).double()
    loss_fn = torch.nn.CrossEntropyLoss()
    X, y = torch.randn(sum(batches), 3, dtype=torch.float64), torch.randint(0, 40, (sum(batches),))
    data = list(zip(X.split(batches), y.split(batches)))
    K = curvhooks.kfac(model, loss_fn, data, fisher="empirical")
    v = torch.randn(K.shape[0], 2, dtype=torch.float64)
    product = K @ v
    B, A = reference.kronecker_factors(model, loss_fn, X, y, "0", "empirical")
    assert_close(product, torch.block_diag(torch.kron(B, A), B) @ v)
    assert_close(K.factors["0.weight"][0], B)
    assert_close(K.factors["0.weight"][1], A)
    assert_close(K.factors["0.bias"][0], B)


def test_forward_only_and_params():
    model, loss_fn, X, y, data = _data("mlp", "ce-mean")
    chosen = [model[2].weight, model[4].bias]
    K = curvhooks.kfac(model, loss_fn, data, fisher="forward-only", params=chosen)
    assert list(K.factors) == ["2.weight", "4.bias"]
    B, A = reference.kronecker_factors(model, loss_fn, X, y, "2")
    assert_close(K.factors["2.weight"][0], torch.eye(4, dtype=torch.float64))
    assert_close(K.factors["2.weight"][1], A)
    assert K.to_dense().shape == (4 * 5 + 3, 4 * 5 + 3)


def test_mc_tends_to_type_2_and_leaves_the_random_state():
    model, loss_fn, X, y, data = _data("mlp", "ce-mean")
    exact = curvhooks.kfac(model, loss_fn, data).to_dense()
    state = torch.random.get_rng_state()
    sampled = curvhooks.kfac(model, loss_fn, data, fisher="mc", mc_samples=20000, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(sampled.to_dense(), exact, rtol=0.05, atol=0.03 * exact.abs().max())
    again = curvhooks.kfac(model, loss_fn, data, fisher="mc", mc_samples=20000, seed=1)
    assert torch.equal(again.to_dense(), sampled.to_dense())


def test_ekfac_eigenvalues_are_the_gradients_second_moments_in_the_eigenbasis():
    """Without weight sharing the type-2 stack is a square root of the GGN, so EKFAC's
    eigenvalues are ``sum (Q_B^T V Q_A)^2`` over the vectors V of ``SqrtGGN``."""
    model, loss_fn, X, y = by_name("mlp").make("ce-sum")
    K = curvhooks.kfac(model, loss_fn, (X, y), eigen_correction=True)
    results = run_with(model, loss_fn, X, y, SqrtGGN())
    for name in K.factors:
        (Q_B, *Q_A) = (torch.linalg.eigh(f).eigenvectors for f in K.factors[name])
        factor = results[name]["sqrt_ggn"].flatten(0, 1)  # [C N, *p]
        rotated = Q_B.T @ factor @ Q_A[0] if Q_A else factor @ Q_B
        assert_close(K.corrected[name], rotated.square().sum(0))
    dense = K.to_dense()
    assert_close(K.trace(), sum(e.sum() for e in K.corrected.values()))
    assert_close(K.logdet(), sum(e.log().sum() for e in K.corrected.values()))
    assert_close(K.diag(), dense.diagonal())
    assert_close(K.frobenius_norm(), torch.linalg.matrix_norm(dense))


@pytest.mark.parametrize("eigen_correction", [False, True])
def test_operator_on_a_real_network(eigen_correction):
    model, loss_fn, _, _, data = _data("conv-residual", "ce-mean")
    K = curvhooks.kfac(model, loss_fn, data, eigen_correction=eigen_correction)
    dense = K.to_dense()
    v = torch.randn(len(dense), 3, dtype=dense.dtype)
    assert_close(K @ v, dense @ v)
    assert_close(K @ v[:, 0], dense @ v[:, 0])
    damping = 0.1
    assert_close(K.inverse(damping) @ (K @ v + damping * v), v)
    assert_close(K.trace(), dense.trace())
    assert_close(K.diag(), dense.diagonal())


OTHERS_CASES = [
    ("cnn-batchnorm", "ce-mean", "type-2"),
    ("cnn-batchnorm", "mse-sum", "empirical"),
    ("mlp-layernorm-gelu", "ce-sum", "type-2"),
    ("mlp-layernorm-gelu", "ce-mean", "empirical"),
    ("cnn-batchnorm", "ce-sum", "mc"),
    ("recurrent", "mse-mean", "empirical"),
    ("class-token", "ce-mean", "type-2"),  # parameters used in the model's own forward
]


@pytest.mark.parametrize(
    "name, loss, fisher", OTHERS_CASES, ids=["-".join(c) for c in OTHERS_CASES]
)
@pytest.mark.parametrize("others", ["diag", "dense"])
@pytest.mark.parametrize("eigen_correction", [False, True], ids=["kfac", "ekfac"])
def test_exact_blocks_of_parameters_without_factors(name, loss, fisher, others, eigen_correction):
    """Norm layers' parameters get the exact GGN (empirical Fisher) block or its diagonal,
    also under the Monte-Carlo Fisher; the Kronecker blocks are those without them, and
    every method covers both."""
    model, loss_fn, X, y, data = _data(name, loss)
    K = curvhooks.kfac(
        model,
        loss_fn,
        data,
        fisher=fisher,
        others=others,
        eigen_correction=eigen_correction,
        seed=0,
    )
    reference_of = reference.empirical_fisher if fisher == "empirical" else reference.ggn
    exact, start = reference_of(model, loss_fn, X, y), 0
    dense = K.to_dense()
    assert K.others and K.params == [p for p in model.parameters() if p.requires_grad]
    for param_name, param in zip(K.names, K.params):
        rows = slice(start, start + param.numel())
        start += param.numel()
        if param_name in K.others:
            block = exact[rows, rows]
            expected = block.diagonal() if others == "diag" else block
            assert_close(K.others[param_name], expected)
            assert_close(dense[rows, rows], expected.diag() if others == "diag" else expected)
    skipped = curvhooks.kfac(
        model,
        loss_fn,
        data,
        fisher=fisher,
        others="skip",
        eigen_correction=eigen_correction,
        seed=0,
    )
    assert skipped.names == [n for n in K.names if n not in K.others]
    for factors, expected in zip(K.factors.values(), skipped.factors.values(), strict=True):
        for factor, expected_factor in zip(factors, expected, strict=True):
            assert_close(factor, expected_factor)
    v = torch.randn(K.shape[0], 3, dtype=X.dtype, generator=torch.Generator().manual_seed(0))
    assert_close(K @ v, dense @ v)
    assert_close(K.trace(), dense.trace())
    assert_close(K.diag(), dense.diagonal())
    assert_close(K.frobenius_norm(), dense.norm())
    assert_close(K.inverse(0.1) @ (K @ v + 0.1 * v), v)
    eye = partial(torch.eye, dtype=X.dtype)
    assert_close(K.inverse(0.1).to_dense(), torch.linalg.inv(dense + 0.1 * eye(len(dense))))
    shifted = Kronecker(  # positive definite: its logdet against the dense one's
        {n: tuple(f + eye(len(f)) for f in fs) for n, fs in K.factors.items()},
        K.params,
        K.names,
        others={n: b + (1 if b.dim() == 1 else eye(len(b))) for n, b in K.others.items()},
    )
    assert_close(shifted.logdet(), torch.linalg.slogdet(shifted.to_dense())[1])


@pytest.mark.parametrize(
    "name, loss", [("mlp", "ce-mean"), ("conv1d", "mse-sum"), ("cnn-batchnorm", "ce-mean")]
)
@pytest.mark.parametrize("eigen_correction", [False, True], ids=["kfac", "ekfac"])
def test_return_loss(name, loss, eigen_correction):
    """``return_loss=True``: the operator as without it, and the whole-dataset loss of all
    the samples as one batch, over unequal batches; also where only exact blocks are asked
    for (the BatchNorm's parameters alone)."""
    model, loss_fn, X, y, data = _data(name, loss)
    options = {"eigen_correction": eigen_correction, "others": "dense"}
    operator, found = curvhooks.kfac(model, loss_fn, data, return_loss=True, **options)
    assert_close(operator.to_dense(), curvhooks.kfac(model, loss_fn, data, **options).to_dense())
    assert found.dim() == 0 and not found.requires_grad
    with torch.no_grad():
        assert_close(found, loss_fn(model(X), y))
    if name == "cnn-batchnorm":
        norms = [model[1].weight, model[1].bias]
        _, alone = curvhooks.kfac(model, loss_fn, data, params=norms, return_loss=True)
        assert_close(alone, found)


def test_bad_input():
    model, loss_fn, _, _, data = _data("cnn-batchnorm", "ce-mean")
    with pytest.raises(curvhooks.UnsupportedError, match="BatchNorm2d.*others='skip' or params="):
        curvhooks.kfac(model, loss_fn, data, others="raise")
    with pytest.raises(ValueError, match="others must be one of"):
        curvhooks.kfac(model, loss_fn, data, others="exact")
    with pytest.raises(ValueError, match="forward-only' has no exact blocks.*others='skip'"):
        curvhooks.kfac(model, loss_fn, data, fisher="forward-only")
    assert len(curvhooks.kfac(model, loss_fn, data, fisher="forward-only", others="skip").names)
    with pytest.raises(ValueError, match="twice here.*not a one-shot iterator"):
        curvhooks.kfac(model, loss_fn, iter(data))
    norms = [model[1].weight, model[1].bias]
    with pytest.raises(ValueError, match="none of the parameters has Kronecker factors"):
        curvhooks.kfac(model, loss_fn, data, params=norms, others="skip")
    assert len(curvhooks.kfac(model, loss_fn, data, params=norms).others) == 2
    wide = torch.nn.Sequential(torch.nn.Linear(2, 12000), torch.nn.LayerNorm(12000)).double()
    X, y = torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 12000, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"others='dense'.*\[24000, 24000\].*others='diag'"):
        curvhooks.kfac(wide, torch.nn.MSELoss(), (X, y), others="dense")
    model, loss_fn, _, _, data = _data("mlp", "ce-mean")
    with pytest.raises(ValueError, match="mc_samples=3 applies to fisher='mc' only"):
        curvhooks.kfac(model, loss_fn, data, mc_samples=3)
    with pytest.raises(ValueError, match="fisher must be one of"):
        curvhooks.kfac(model, loss_fn, data, fisher="type-1")
    with pytest.raises(ValueError, match="eigen_correction needs the per-sample gradients"):
        curvhooks.kfac(model, loss_fn, data, fisher="forward-only", eigen_correction=True)
    with pytest.raises(ValueError, match="approx must be one of"):
        curvhooks.kfac(model, loss_fn, data, approx="expanded")
    K = curvhooks.kfac(model, loss_fn, data)
    for damping in (0.0, -1.0):
        with pytest.raises(ValueError, match="damping must be positive"):
            K.inverse(damping)
    with pytest.raises(ValueError, match="data is empty"):
        curvhooks.kfac(model, loss_fn, [])


needs_curvlinops = pytest.mark.skipif(
    importlib.util.find_spec("curvlinops") is None, reason="needs curvlinops"
)
PEER_CASES = [
    ("mlp", "ce-mean"),
    ("conv-stride-padding", "mse-sum"),
    ("sequence-classes-last-dims", "ce-mean"),
    ("conv-groups-no-bias", "ce-sum"),
]


@needs_curvlinops
@pytest.mark.parametrize("name, loss", PEER_CASES)
@pytest.mark.parametrize("fisher", ["type-2", "empirical", "forward-only"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_equals_curvlinops(name, loss, fisher, approx):
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    # enough samples for factors of distinct eigenvalues: EKFAC's eigenbasis is then unique
    model, loss_fn, _, _, data = _data(name, loss, batches=(12, 8))
    params = [p for p in model.parameters() if p.requires_grad]
    options = dict(fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=True)
    eye = torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    for eigen_correction, peer in ((False, KFACLinearOperator), (True, EKFACLinearOperator)):
        if eigen_correction and (
            fisher == "forward-only"
            or name.startswith(("sequence", "conv-groups"))
            or approx == "reduce"
        ):
            # curvlinops' EKFAC has no forward-only and no outputs with extra dimensions, and
            # takes a grouped convolution's gradients from group-averaged inputs (ours are the
            # per-sample gradients); a reduced convolution's A is singular (averaged patches
            # are linearly dependent), so its eigenbasis, and EKFAC with it, is not unique
            continue
        theirs = peer(model, loss_fn, params, data, check_deterministic=False, **options) @ eye
        ours = curvhooks.kfac(
            model, loss_fn, data, fisher, approx=approx, eigen_correction=eigen_correction
        )
        torch.testing.assert_close(ours.to_dense(), theirs, rtol=1e-10, atol=1e-10)
