"""The supported-modules page is generated from the registry and lists every class in it;
every code block of the how-to guides runs on its own and computes what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from itertools import accumulate
from pathlib import Path

import pytest
import torch

import curvhooks
import curvhooks.plot
from curvhooks.derivatives import LOSS_DERIVATIVES, MODULE_DERIVATIVES
from docs import offline_math
from docs.supported import LOSS_ARGUMENTS, MODULE_ARGUMENTS, PAGE, render

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_registered_class_has_its_arguments_written_and_nothing_else_does():
    assert set(MODULE_ARGUMENTS) == set(MODULE_DERIVATIVES)
    assert set(LOSS_ARGUMENTS) == set(LOSS_DERIVATIVES)


def test_supported_page_is_the_generators_output():
    assert PAGE.read_text() == render(), "run `python docs/supported.py` to regenerate it"


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


HOW_TO = sorted(path.relative_to(DOCS).as_posix() for path in (DOCS / "how-to").glob("*.md"))
TORCHRUN = ["how-to/distributed.md"]
"""How-to pages whose blocks are scripts for ``torchrun``."""
BLOCKS = [
    (page, index) for page in HOW_TO if page not in TORCHRUN for index in range(len(_blocks(page)))
]


def _check_clipping(found: dict) -> None:
    """The norms are those of the per-sample gradients; the clipped ones are at most 1."""
    params = found["params"]
    squared = sum(p.grad_batch.flatten(1).square().sum(1) for p in params)
    torch.testing.assert_close(found["norms"], squared.sqrt())
    assert found["norms"].max() > found["max_norm"]  # some samples are clipped
    assert (found["scale"] * found["norms"]).max() <= found["max_norm"]


def _check_laplace(found: dict) -> None:
    """The last layer's block of the full GGN; the covariance inverts the precision."""
    full = curvhooks.ggn(found["model"], found["loss_fn"], found["train_loader"])
    torch.testing.assert_close(found["G"], full[-99:, -99:])
    identity = found["covariance"] @ found["precision"]
    torch.testing.assert_close(identity, torch.eye(99), atol=1e-4, rtol=0)


def _check_laplace_torch(found: dict) -> None:
    """laplace-torch's curvlinops backend fits the same precision; the MAP network is less
    calibrated on the noisy digits than on the clean ones, and the figure is written."""
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    options = {"subset_of_weights": "last_layer", "hessian_structure": "full"}
    peer = Laplace(found["model"], "classification", backend=CurvlinopsGGN, **options)
    peer.fit(found["train_loader"])
    torch.testing.assert_close(found["la"].H, peer.H, rtol=1e-4, atol=1e-4)  # float32 sums
    assert found["errors"]["MAP", 0.3] > found["errors"]["MAP", 0.0]
    assert Path("calibration.png").exists()


def _check_compare(found: dict) -> None:
    """The sizes frame the blocks of ``structure="layer"``; the shares are those blocks'
    squared Frobenius mass; the figures are written."""
    model, loss_fn, loader, sizes = (found[k] for k in ("model", "loss_fn", "loader", "sizes"))
    assert sizes == [144, 272, 51]
    ggn = found["found"]["ggn"]
    starts = [0, *accumulate(sizes)]
    framed = torch.block_diag(*(ggn[a:b, a:b] for a, b in zip(starts, starts[1:])))
    torch.testing.assert_close(curvhooks.ggn(model, loss_fn, loader, structure="layer"), framed)
    kept = framed.square().sum() / ggn.square().sum()
    shares = curvhooks.plot.block_shares(ggn, sizes)
    assert sum(shares[:-1]) == pytest.approx(kept.item(), rel=1e-5)
    assert Path("curvature.png").stat().st_size > 0 and Path("block_mass.png").exists()


def _check_sharpness(found: dict) -> None:
    """The top eigenvalues and the trace of the dense Hessian."""
    dense = curvhooks.hessian(found["model"], found["loss_fn"], found["data"])
    eigenvalues = torch.linalg.eigvalsh(dense.double()).flip(0)[:3]
    torch.testing.assert_close(found["values"].double(), eigenvalues, rtol=1e-3, atol=0)
    assert found["trace"].value == pytest.approx(dense.trace().item(), rel=1e-5)
    assert Path("sharpness.png").exists()


def _check_sequences(found: dict) -> None:
    """The per-sample gradients of every parameter against ``tests.reference`` (float32);
    the class token is named in a warning; the Kronecker operator's exact blocks are those
    of the parameters without factors."""
    from tests import reference

    model, loss_fn, X, y = (found[k] for k in ("model", "loss_fn", "X", "y"))
    expected = reference.per_sample_grads(model, loss_fn, X, y)
    for name, grads in found["per_sample"].items():
        torch.testing.assert_close(grads, expected[name], rtol=1e-4, atol=1e-6)
    assert any("cls_token" in str(w.message) for w in found["caught"])
    assert found["exact"] and "encoder.self_attn.in_proj_weight" not in found["exact"]
    assert "cls_token" in found["exact"] and "lstm.weight_hh_l0" in found["exact"]


CHECKS = {
    ("how-to/clipping.md", 0): _check_clipping,
    ("how-to/laplace.md", 0): _check_laplace,
    ("how-to/laplace.md", 1): _check_laplace_torch,
    ("how-to/compare.md", 0): _check_compare,
    ("how-to/sharpness.md", 0): _check_sharpness,
    ("how-to/sequences.md", 0): _check_sequences,
}
"""What each how-to block computes, checked on the names it defines."""
NEEDS = {("how-to/laplace.md", 1): ("laplace", "curvlinops")}
"""Optional packages a block needs (the block is skipped without them)."""


@pytest.mark.parametrize(("page", "index"), BLOCKS)
def test_how_to_blocks_run_on_their_own(page, index, tmp_path, monkeypatch):
    """Each block alone, in a fresh namespace (so it imports and defines all it uses)."""
    assert (page, index) in CHECKS, f"block {index} of {page} has no check; add one"
    for package in NEEDS.get((page, index), ()):
        pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    found: dict = {}
    exec(compile(_blocks(page)[index], page, "exec"), found)
    CHECKS[page, index](found)


def _torchrun(script: Path, processes: int, logs: Path) -> list[str]:
    """The lines ``rank r: ...`` that ``script`` prints under ``torchrun``, without the
    prefix, in rank order (each process's output goes to its own file under ``logs``, so
    that the processes' lines cannot interleave)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(processes), "--log-dir", str(logs), "--redirects", "1"]
    result = subprocess.run([*command, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = "".join(path.read_text() for path in logs.rglob("stdout.log"))
    lines = sorted(re.findall(r"^rank (\d+): (.*)$", printed, re.M))
    assert [int(rank) for rank, _ in lines] == list(range(processes)), printed
    return [line for _, line in lines]


def _numbers(line: str) -> list[float]:
    return [float(number) for number in re.findall(r"-?\d+\.?\d*", line)]


@pytest.mark.parametrize("page", TORCHRUN)
def test_torchrun_blocks_give_one_processs_results_on_two(page, tmp_path):
    """Each block, saved as a script, prints on each of two processes what one process
    prints (the shards, even or not, are weighted as one data set)."""
    blocks = _blocks(page)
    assert blocks, f"no code block in {page}"
    for index, block in enumerate(blocks):
        script = tmp_path / f"block_{index}.py"
        script.write_text(block)
        (alone,) = _torchrun(script, 1, tmp_path / f"logs_{index}_1")
        for line in _torchrun(script, 2, tmp_path / f"logs_{index}_2"):
            assert _numbers(line) == pytest.approx(_numbers(alone), rel=1e-5), (line, alone)


def test_quick_start_blocks_run_in_order(tmp_path, monkeypatch):
    """The quick start's blocks, one after the other: the batches weigh as one data set, and
    the layer blocks are those the sizes frame."""
    monkeypatch.chdir(tmp_path)
    found: dict = {}
    for block in _blocks("index.md"):
        exec(compile(block, "index.md", "exec"), found)
    model, loss_fn, X, y, G = (found[k] for k in ("model", "loss_fn", "X", "y", "G"))
    torch.testing.assert_close(G, curvhooks.ggn(model, loss_fn, (X, y)))
    assert found["sizes"] == [55, 18]
    framed = torch.block_diag(G[:55, :55], G[55:, 55:])
    torch.testing.assert_close(found["blocks"], framed)
    assert (G - framed).abs().max() > 1e-4


def test_docs_load_nothing_from_the_network():
    """mkdocs.yml names no URL; its MathJax is the one the hook copies into the site."""
    config = (DOCS.parent / "mkdocs.yml").read_text()
    assert "://" not in config
    assert f"extra_javascript:\n  - {offline_math.TARGET}/{offline_math.SCRIPT}" in config


def test_hook_copies_mathjax_with_its_fonts(tmp_path):
    pytest.importorskip("mathjax", reason="the docs extra (django-static-mathjax) is not installed")
    offline_math.on_post_build({"site_dir": str(tmp_path)})
    copied = tmp_path / offline_math.TARGET
    assert "MathJax" in (copied / offline_math.SCRIPT).read_text()[:100_000]
    assert (copied / "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff").stat().st_size > 0
    assert (copied / "input/tex/extensions/boldsymbol.js").exists()  # loaded on demand
    assert not (copied / "tex-svg.js").exists() and not (copied / "output/svg").exists()
