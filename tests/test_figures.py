"""Fig. 4 grid (srae.figures): sorting, per-map normalisation, panel titles and the PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from srae.errors import InputError
from srae.figures import excitation_grid, map_scales, order_features, save_excitation_grid


def test_order_and_scales() -> None:
    c = np.array([[1.0, 5.0, -2.0], [3.0, 0.5, 4.0]])
    np.testing.assert_array_equal(order_features(c, "row"), [[1, 0, 2], [2, 0, 1]])
    np.testing.assert_array_equal(order_features(c, "mean"), [[1, 0, 2], [1, 0, 2]])  # means 2, 2.75, 1
    np.testing.assert_array_equal(order_features(c, "none"), [[0, 1, 2], [0, 1, 2]])
    ebp = np.zeros((3, 2, 2))
    ebp[0, 0, 0] = 7.0
    xm = np.zeros((3, 2, 2, 2))
    xm[0, 1, 1, 1], xm[1, 0, 0, 1] = 2.0, 3.0
    np.testing.assert_array_equal(map_scales(ebp), [7.0, 1.0, 1.0])
    np.testing.assert_array_equal(map_scales(xm), [[1.0, 2.0], [3.0, 1.0], [1.0, 1.0]])
    with pytest.raises(InputError, match="sort"):
        order_features(c, "sideways")


def _data(r=2, n=3, s=24):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (r, s, s, 3), dtype=np.uint8)
    ebp = rng.random((r, s // 2, s // 2))  # other resolution: resized to the image
    xm = rng.random((r, n, s, s))
    contrib = np.array([[0.5, 12.25, -1.0], [3.0, 2.0, 8.5]])[:r, :n]
    return images, ebp, xm, contrib


def test_panel_titles_sorted_by_contribution() -> None:
    images, ebp, xm, contrib = _data()
    fig = excitation_grid(images, ebp, xm, contrib, predictions=[10.0, 4.5], title="cat 3")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "ExcitationBP ŷ=10.00", "x2: 12.25", "x1: 0.50", "x3: -1.00",
                      "image", "ExcitationBP ŷ=4.50", "x3: 8.50", "x1: 3.00", "x2: 2.00"]
    contrib[0, 0] = -0.001  # rounds to zero: no "-0.00"; under 1% of the row: grey, "(~0)"
    fig = excitation_grid(images, ebp, xm, contrib)
    titled = {ax.get_title(): ax.title.get_color() for ax in fig.axes if ax.get_title()}
    assert "x1: 0.00 (~0)" in titled and titled["x1: 0.00 (~0)"] == "0.45"
    assert titled["x2: 12.25"] != "0.45"


def test_dead_x_features_are_marked_not_numbered() -> None:
    images, ebp, xm, contrib = _data()
    contrib[:, 1] = 0.0  # a dead x-feature contributes nothing anywhere
    fig = excitation_grid(images, ebp, xm, contrib, dead=[1])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    # dead panels come last, after the negative contributions
    assert titles == ["image", "ExcitationBP", "x1: 0.50", "x3: -1.00", "x2: dead (0 on training)",
                      "image", "ExcitationBP", "x3: 8.50", "x1: 3.00", "x2: dead (0 on training)"]
    with pytest.raises(InputError, match="dead: x-feature indices must be in 0..2"):
        excitation_grid(images, ebp, xm, contrib, dead=[3])


def test_png_is_written_and_not_blank(tmp_path) -> None:
    images, ebp, xm, contrib = _data()
    out = save_excitation_grid(tmp_path / "fig" / "cat.png", images, ebp, xm, contrib)
    with Image.open(out) as img:
        arr = np.asarray(img.convert("RGB"))
    assert img.format == "PNG" and arr.shape[1] > arr.shape[0] > 200
    assert arr.reshape(-1, 3).std(axis=0).min() > 10
    with pytest.raises(InputError, match="disagree"):
        excitation_grid(images, ebp, xm, contrib[:, :2])


def test_a_row_shares_one_colour_scale_by_default() -> None:
    """Issue 4: 'shared colour scale per row': of a row's x-feature maps one 100x weaker is
    drawn faint, one 50x stronger saturates the scale; each panel equals the overlay at the
    row's maximum. ExcitationBP on y-hat keeps its own (far more concentrated: on the demo it
    left every x-feature panel near-blank when it shared the scale)."""
    from matplotlib import colormaps

    from srae.figures import _overlay

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    ebp = rng.random((2, 24, 24))
    xm = rng.random((2, 3, 24, 24))
    xm[0, 1] = xm[0, 0] * 0.01
    xm[0, 2] = xm[0, 0] * 50.0
    xm[1] = 0.0  # a row of all-zero x-feature maps: scale 1, no division by zero
    ebp[0] *= 1e3
    fig = excitation_grid(images, ebp, xm, np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), title="cat 0")
    assert "share one colour scale" in fig.get_suptitle()
    shown = [ax.images[0].get_array() for ax in fig.axes if ax.images]  # row by row, panels in order
    row0 = xm[0].max()
    cmap = colormaps["jet"]
    np.testing.assert_allclose(shown[1], _overlay(images[0], ebp[0], ebp[0].max(), cmap), atol=1e-12)
    np.testing.assert_allclose(shown[5 + 1], _overlay(images[1], ebp[1], ebp[1].max(), cmap), atol=1e-12)
    np.testing.assert_allclose(shown[5 + 2], _overlay(images[1], xm[1, 0], 1.0, cmap), atol=1e-12)
    x1, x2, x3 = shown[2], shown[3], shown[4]  # sorted by contribution: 3.0, 2.0, 1.0
    for panel, k in ((x1, 0), (x2, 1), (x3, 2)):
        np.testing.assert_allclose(panel, _overlay(images[0], xm[0, k], row0, cmap), atol=1e-12)
    assert np.abs(x3 - x1).max() > 0.2  # the 50x map is bright where the others are faint
    # a dead x-feature does not set the scale (its map shows only what would excite it)
    dead = excitation_grid(images, ebp, xm, np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), dead=[2])
    shown = [ax.images[0].get_array() for ax in dead.axes if ax.images]
    live_max = max(xm[0, 0].max(), xm[0, 1].max())
    np.testing.assert_allclose(shown[2], _overlay(images[0], xm[0, 0], live_max, cmap), atol=1e-12)
    with pytest.raises(InputError, match="scale 'col'"):
        excitation_grid(images, ebp, xm, np.ones((2, 3)), scale="col")


def test_each_map_can_be_drawn_relative_to_its_own_max() -> None:
    images, ebp, xm, _ = _data(r=1, n=3)
    xm[0, 1] = xm[0, 0] * 0.01  # the same pattern, 100x weaker
    xm[0, 2] = xm[0, 0] * 50.0  # and 50x stronger
    fig = excitation_grid(images, ebp * 1e-3, xm, np.array([[3.0, 2.0, 1.0]]), title="cat 0", scale="map")
    panels = {ax.get_title().split(":")[0]: ax.images[0].get_array() for ax in fig.axes if ax.images}
    np.testing.assert_allclose(panels["x2"], panels["x1"], atol=1e-12)  # not faint: same picture
    np.testing.assert_allclose(panels["x3"], panels["x1"], atol=1e-12)
    ref = excitation_grid(images, ebp, xm[:, :1].repeat(3, axis=1), np.array([[3.0, 2.0, 1.0]]), scale="map")
    ref_panels = {ax.get_title().split(":")[0]: ax.images[0].get_array() for ax in ref.axes if ax.images}
    np.testing.assert_allclose(panels["ExcitationBP"], ref_panels["ExcitationBP"], atol=1e-6)  # float32 resize
    assert "normalised to its own max" in fig.get_suptitle() and "cat 0" in fig.get_suptitle()


def test_report_charts_leave_matplotlib_global_state_alone() -> None:
    """Report charts draw on bare Figures: the user's backend and pyplot's figure list stay as
    they were (a notebook's inline backend must survive building a report)."""
    import io

    import matplotlib
    import pandas as pd

    from srae.report_figures import lasso_chart, metric_charts

    before = matplotlib.get_backend()
    matplotlib.use("svg", force=True)  # anything but Agg: the old code forced Agg
    try:
        import matplotlib.pyplot as plt

        open_before = plt.get_fignums()
        main = pd.DataFrame({"SRAE": [0.1, 1.0], "NN": [0.2, 0.9]},
                            index=pd.MultiIndex.from_tuples([("F_reg", "test"), ("F_cls", "test")]))
        sweep = pd.DataFrame([[0.1, 0.3], [0.12, 0.31], [9, 3]], index=["F_reg train", "F_reg test", "Num_x"],
                             columns=[0.01, 0.1])
        for png in (metric_charts(main), lasso_chart(sweep)):
            img = Image.open(io.BytesIO(png))
            assert img.format == "PNG" and img.size[0] > 100
            assert np.asarray(img.convert("L")).std() > 1  # not blank
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == open_before
    finally:
        matplotlib.use(before, force=True)
