"""The examples run to completion, and the visual tour's published facts hold."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curvhooks
import curvhooks.plot
from tests.problems import assert_close

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tour():
    visual_tour = _load("visual_tour")
    model, loss_fn, loader = visual_tour.setting()
    return model, loss_fn, loader, curvhooks.matrices(model, loss_fn, loader)


def test_tour_setting(tour):
    model, _, loader, _ = tour
    assert curvhooks.layer_sizes(model) == [112, 404, 37, 130]
    assert [len(X) for X, _ in loader] == [20, 20, 10]


def test_tour_facts_float32(tour):
    model, _, _, found = tour
    norms = {kind: m.norm().item() for kind, m in found.items()}
    traces = {kind: m.trace().item() for kind, m in found.items()}
    assert norms == pytest.approx(
        {"hessian": 1.387, "ggn": 1.154, "empirical_fisher": 1.143}, abs=1e-3
    )
    assert traces == pytest.approx(
        {"hessian": 2.084, "ggn": 2.084, "empirical_fisher": 2.077}, abs=1e-3
    )
    for matrix in found.values():
        torch.testing.assert_close(matrix, matrix.T)
        in_blocks = sum(curvhooks.plot.block_shares(matrix, curvhooks.layer_sizes(model))[:-1])
        assert 0.4 <= in_blocks <= 0.6
        last_convolution = matrix[516:553].square().sum() / matrix.square().sum()
        assert 0.565 <= last_convolution <= 0.625  # 57-62 %: the tour's unaltered figure
    assert torch.linalg.eigvalsh(found["hessian"].double())[0].item() == pytest.approx(
        -0.37, abs=0.01
    )


def test_tour_facts_float64(tour):
    """Ranks and the last layer's Hessian block, exactly, in float64."""
    model, loss_fn, loader, _ = tour
    model = model.double()
    data = [(X.double(), y) for X, y in loader]
    found = curvhooks.matrices(model, loss_fn, data)
    model.float()
    assert torch.linalg.matrix_rank(found["ggn"]).item() == 50 * (5 - 1)
    assert torch.linalg.matrix_rank(found["empirical_fisher"]).item() == 50
    assert torch.linalg.eigvalsh(found["hessian"])[0].item() < -0.3
    last = slice(683 - 130, 683)
    assert_close(found["hessian"][last, last], found["ggn"][last, last])


def _run(script: str, *arguments: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_visual_tour_runs(tmp_path):
    output = _run("visual_tour.py", "--out", str(tmp_path))
    assert "683 in total, per layer [112, 404, 37, 130]" in output
    assert "EKFAC" in output and "relative Frobenius distance to the GGN" in output
    assert {p.name for p in tmp_path.iterdir()} == {
        "visual_tour_logabs.png",
        "visual_tour_unaltered.png",
        "visual_tour_kfac.png",
    }


def test_per_sample_gradients_runs():
    assert "sums to p.grad: True" in _run("per_sample_gradients.py")


def test_digits_runs_reduced(tmp_path):
    """Reduced setting: 1 epoch, curvature on 64 samples."""
    output = _run("digits.py", "--out", str(tmp_path), "--epochs", "1", "--curvature-samples", "64")
    assert "test accuracy" in output
    assert len(list(tmp_path.glob("*.png"))) == 5


@pytest.mark.slow
def test_digits_runs_full(tmp_path):
    output = _run("digits.py", "--out", str(tmp_path))
    accuracy = float(output.split("test accuracy ")[1].split()[0].rstrip(","))
    assert accuracy > 0.85


def test_spectrum_runs_reduced(tmp_path):
    """Reduced setting: 1 epoch, curvature on 64 samples; the GGN's trace equals the
    Hessian's (a ReLU network is linear in each parameter alone), its top eigenvalues
    differ."""
    output = _run("spectrum.py", "--out", str(tmp_path), "--epochs", "1", "--samples", "64")
    rows = [line.split() for line in output.splitlines() if "top eigenvalues" in line]
    assert len(rows) == 4 and (tmp_path / "spectrum.png").exists()
    traces = [float(row[-1]) for row in rows]
    assert traces[0] == pytest.approx(traces[1]) and traces[2] == pytest.approx(traces[3])


@pytest.mark.slow
def test_spectrum_runs_full(tmp_path):
    output = _run("spectrum.py", "--out", str(tmp_path))
    assert output.count("top eigenvalues") == 4


def test_distributed_example_runs_under_torchrun():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # torchrun picks a free port itself
            "--nproc_per_node",
            "2",
            str(EXAMPLES / "distributed.py"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    dataset, model, loss_fn = _load("distributed").setting()
    found = curvhooks.matrices(model, loss_fn, dataset.tensors, kinds=("ggn", "empirical_fisher"))
    for kind, matrix in found.items():
        assert f"{kind}: (2117, 2117), trace {matrix.trace():.4f}" in result.stdout


def test_real_models_runs(tmp_path):
    """Both models print a row per layer whose two GGN traces (summed DiagGGN of the batches,
    and the dense layer block of ``curvhooks.ggn``) agree, and the figure is written."""
    output = _run("real_models.py", "--out", str(tmp_path))
    assert "ResNet-8" in output and "Transformer" in output
    rows = [line.split() for line in output.splitlines() if line.endswith(tuple("0123456789"))]
    rows = [row for row in rows if len(row) == 6 and row[1].endswith(")")]
    assert len(rows) == 19 + 20  # layers with parameters: ResNet-8, transformer
    for row in rows:
        assert float(row[3]) == pytest.approx(float(row[4]), abs=2e-4)
    assert (tmp_path / "real_models.png").exists()


@pytest.mark.parametrize(
    "script", sorted(p.stem for p in EXAMPLES.glob("*.py") if p.stem != "__init__")
)
def test_examples_import_as_modules(script):
    """Each example also runs as ``python -m examples.NAME`` (its imports resolve there)."""
    result = subprocess.run(
        [sys.executable, "-c", f"import examples.{script}"],
        capture_output=True,
        text=True,
        cwd=EXAMPLES.parent,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
