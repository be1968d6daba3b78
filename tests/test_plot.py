"""The plot functions on small matrices."""

from __future__ import annotations

from itertools import accumulate

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch import nn

import curvhooks
import curvhooks.plot


def _matrices():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    return {"A": a @ a.T, "B": a.T @ a * 10}


def _colorbar(figure, axes):
    (colorbar,) = [ax for ax in figure.axes if ax not in axes]
    return colorbar


def test_signed_entries_share_one_diverging_scale_centred_at_zero():
    named = _matrices()
    figure, axes = curvhooks.plot.matrices(named, layer_sizes=[2, 0, 3, 1], transform="none")
    assert [ax.get_title() for ax in axes] == ["A", "B"]
    bound = max(m.abs().max().item() for m in named.values())
    assert min(m.min().item() for m in named.values()) < 0  # entries of both signs
    for ax in axes:
        image = ax.images[0]
        assert image.get_clim() == pytest.approx((-bound, bound))
        assert image.get_cmap().name == "RdBu_r"
    assert _colorbar(figure, axes).get_ylabel() == "x: matrix entry"
    figure.canvas.draw()  # renders headless


def test_entries_of_one_sign_keep_a_sequential_scale():
    named = {title: matrix.abs() for title, matrix in _matrices().items()}
    _, axes = curvhooks.plot.matrices(named, transform="none")
    low = min(m.min().item() for m in named.values())
    high = max(m.max().item() for m in named.values())
    for ax in axes:
        assert ax.images[0].get_clim() == pytest.approx((low, high))
        assert ax.images[0].get_cmap().name == "viridis"


def test_every_panel_labels_its_axes():
    _, axes = curvhooks.plot.matrices(_matrices(), layer_sizes=[2, 4])
    for ax in axes:
        assert ax.get_xlabel() == ax.get_ylabel() == "parameter index"


def _dashed(ax):
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    horizontal = [line for line in dashed if line.get_ydata()[0] == line.get_ydata()[1]]
    return sorted(line.get_ydata()[0] for line in horizontal), {line.get_color() for line in dashed}


def test_boundary_lines_one_per_distinct_inner_boundary():
    _, axes = curvhooks.plot.matrices(_matrices(), layer_sizes=[2, 0, 3, 1])
    for ax in axes:  # boundaries after 2 and 5 parameters, none at 0 or 6; white on viridis
        assert _dashed(ax) == ([1.5, 4.5], {"white"})
    _, axes = curvhooks.plot.matrices(_matrices(), layer_sizes=[2, 0, 3, 1], transform="none")
    assert _dashed(axes[0]) == ([1.5, 4.5], {"black"})  # white is zero on the diverging map
    assert curvhooks.plot.layer_boundaries([0, 2, 0, 3, 1], 6) == [2, 5]


def _names(ax):
    (names,) = ax.child_axes
    ticks = names.get_yticks()
    return dict(zip((label.get_text() for label in names.get_yticklabels()), ticks))


def test_layer_names_at_the_middle_of_their_rows():
    names = ["first", "empty", "second", "last"]
    figure, axes = curvhooks.plot.matrices(_matrices(), layer_sizes=[2, 0, 3, 1], layer_names=names)
    for ax in axes:  # rows 0-1, 2-4, 5: middles 0.5, 3, 5; a layer of no rows gets no name
        assert _names(ax) == pytest.approx({"first": 0.5, "second": 3.0, "last": 5.0})
    with pytest.raises(ValueError, match="one name per size"):
        curvhooks.plot.matrices(_matrices(), layer_sizes=[2, 4], layer_names=["only"])
    with pytest.raises(ValueError, match="one name per size"):
        curvhooks.plot.matrices(_matrices(), layer_names=["no sizes"])


def test_titles_names_and_labels_fit_in_the_figure():
    torch.manual_seed(0)
    named = {title: torch.randn(683, 683) for title in ("GGN", "KFAC", "EKFAC")}
    sizes = [108, 4, 400, 4, 36, 1, 125, 5]  # the visual tour's weights and biases
    names = [f"{layer}.{kind}" for layer in (0, 2, 4, 6) for kind in ("weight", "bias")]
    figure, axes = curvhooks.plot.matrices(named, layer_sizes=sizes, layer_names=names)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in figure.axes:
        box = ax.get_tightbbox(renderer)
        assert 0 <= box.x0 and box.x1 <= figure.bbox.width
        assert 0 <= box.y0 and box.y1 <= figure.bbox.height


def test_logabs_transform_and_label():
    named = _matrices()
    named["A"][0, 1] = 0.0
    figure, axes = curvhooks.plot.matrices(named)
    image = axes[0].images[0]
    expected = np.log10(np.abs(named["A"].numpy()) + 1e-5)
    np.testing.assert_allclose(image.get_array(), expected)
    assert image.get_array()[0, 1] == pytest.approx(-5.0)  # log10(0 + 1e-5), as labelled
    assert image.get_cmap().name == "viridis"
    assert _colorbar(figure, axes).get_ylabel() == "log10(|x| + 1e-5), x: matrix entry"


def test_custom_transform_named_or_labelled():
    named = _matrices()
    figure, axes = curvhooks.plot.matrices(named, transform=torch.sign)
    np.testing.assert_array_equal(axes[1].images[0].get_array(), torch.sign(named["B"]).numpy())
    assert axes[1].images[0].get_clim() == (-1.0, 1.0)
    assert _colorbar(figure, axes).get_ylabel() == "sign(x), x: matrix entry"
    figure, axes = curvhooks.plot.matrices(named, transform=torch.sign, label="sign")
    assert _colorbar(figure, axes).get_ylabel() == "sign"


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
    """``import curvhooks`` then ``curvhooks.plot.matrices``, as the docs write it."""
    import subprocess
    import sys

    code = "import curvhooks; print(curvhooks.plot.matrices.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "matrices", result.stderr


def _nested() -> nn.Module:
    """Layers at three depths; the first is frozen, the last has a frozen bias."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5),
        nn.Sequential(nn.Tanh(), nn.Linear(5, 5), nn.Sequential(nn.Linear(5, 3), nn.Sigmoid())),
        nn.LayerNorm(3),
        nn.Linear(3, 2),
    ).double()
    model[0].requires_grad_(False)
    model[3].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("selected", ["default", "some"])
def test_layer_sizes_are_the_blocks_of_structure_layer(selected):
    """One entry per module holding trainable parameters, at any depth, in parameter order:
    the ``structure="layer"`` GGN is zero off exactly these blocks and equals the full GGN
    on them."""
    model = _nested()
    params = None
    sizes, names = [30, 18, 6, 6], ["1.1 (Linear)", "1.2.0 (Linear)", "2 (LayerNorm)", "3 (Linear)"]
    if selected == "some":
        params = [model[3].weight, model[1][1].bias, model[1][1].weight]
        sizes, names = [6, 30], ["3 (Linear)", "1.1 (Linear)"]
    assert curvhooks.layer_sizes(model, params) == sizes
    assert curvhooks.plot.layer_names(model, params) == names
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    loss_fn = nn.CrossEntropyLoss()
    blocks = curvhooks.ggn(model, loss_fn, (X, y), params=params, structure="layer")
    full = curvhooks.ggn(model, loss_fn, (X, y), params=params)
    starts = [0, *accumulate(sizes)]
    expected = torch.block_diag(*(full[a:b, a:b] for a, b in zip(starts, starts[1:])))
    torch.testing.assert_close(blocks, expected, rtol=1e-12, atol=1e-14)
    assert all(full[a:b, a:b].abs().max() > 1e-4 for a, b in zip(starts, starts[1:]))
    assert (full - expected).abs().max() > 1e-4  # the full GGN couples the layers


def test_a_model_holding_its_own_parameters_is_one_layer_named_by_its_class():
    model = nn.Linear(2, 3)
    assert curvhooks.layer_sizes(model) == [9]
    assert curvhooks.plot.layer_names(model) == ["Linear"]
