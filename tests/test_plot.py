"""The plot functions on small matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvhooks.plot


def _matrices():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    return {"A": a @ a.T, "B": a.T @ a * 10}


def test_panels_share_one_color_scale_and_one_colorbar():
    named = _matrices()
    figure, axes = curvhooks.plot.matrices(named, layer_sizes=[2, 0, 3, 1], transform="none")
    assert [ax.get_title() for ax in axes] == ["A", "B"]
    limits = {ax.images[0].get_clim() for ax in axes}
    assert len(limits) == 1
    low, high = limits.pop()
    assert low == pytest.approx(min(m.min().item() for m in named.values()))
    assert high == pytest.approx(max(m.max().item() for m in named.values()))
    colorbars = [ax for ax in figure.axes if ax not in axes]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "Unaltered matrix entries"
    figure.canvas.draw()  # renders headless


def test_boundary_lines_one_per_distinct_inner_boundary():
    figure, axes = curvhooks.plot.matrices(_matrices(), layer_sizes=[2, 0, 3, 1])
    for ax in axes:
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        horizontal = sorted(
            line.get_ydata()[0] for line in dashed if line.get_ydata()[0] == line.get_ydata()[1]
        )
        assert horizontal == [1.5, 4.5]  # boundaries after 2 and 5 parameters, none at 0 or 6
        assert all(line.get_color() == "white" for line in dashed)
    assert curvhooks.plot.layer_boundaries([0, 2, 0, 3, 1], 6) == [2, 5]


def test_logabs_transform_and_label():
    named = _matrices()
    figure, axes = curvhooks.plot.matrices(named)
    expected = np.log10(np.abs(named["A"].numpy()) + 1e-5)
    np.testing.assert_allclose(axes[0].images[0].get_array(), expected)
    colorbar = [ax for ax in figure.axes if ax not in axes][0]
    assert colorbar.get_ylabel() == "Logarithmic absolute entries"


def test_custom_transform_with_label():
    named = _matrices()
    figure, axes = curvhooks.plot.matrices(named, transform=torch.sign, label="sign")
    np.testing.assert_array_equal(axes[1].images[0].get_array(), torch.sign(named["B"]).numpy())
    assert [ax for ax in figure.axes if ax not in axes][0].get_ylabel() == "sign"


def test_bad_transform():
    with pytest.raises(ValueError, match="logabs"):
        curvhooks.plot.matrices(_matrices(), transform="log")


def test_block_shares_and_figure():
    matrix = torch.tensor([[1.0, 2.0, 0.0], [2.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    shares = curvhooks.plot.block_shares(matrix, [2, 0, 1])
    total = (matrix**2).sum().item()
    assert shares == pytest.approx([18 / total, 16 / total, 2 / total])
    figure, ax = curvhooks.plot.block_mass({"M": matrix, "N": matrix * 2}, [2, 0, 1])
    widths = [patch.get_width() for patch in ax.patches if patch.get_width() > 0]
    assert widths[:3] == pytest.approx(shares)


def test_plot_is_reachable_after_plain_import():
    """``import curvhooks`` then ``curvhooks.plot.matrices``, as API.md writes it."""
    import subprocess
    import sys

    code = "import curvhooks; print(curvhooks.plot.matrices.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "matrices", result.stderr
