"""Fig. 4 grid (srae.figures): sorting, contribution-weighted heat, muted ~0 panels, titles, the PNG."""

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


def _panels(fig) -> dict[str, np.ndarray]:
    """Drawn RGB arrays by panel name ("image", "ExcitationBP", "x1", ...); one-row figures."""
    return {ax.get_title().split(":")[0].split(" ")[0]: np.asarray(ax.images[0].get_array())
            for ax in fig.axes if ax.images}


def test_a_panel_is_as_bright_as_its_x_feature_contributes() -> None:
    """Fig. 4 tells the truth: x1 contributes 10.0, x2 0.01 (0.1% of it), x3 0.5 (5%), with
    maps of equal peak. x2's heat is <= 1% of x1's and its panel is muted (a grey image, no
    colour, "(~0)"); x3 peaks at 5% of the scale. (The old row scale drew all three alike.)"""
    from matplotlib import colormaps

    from srae.figures import overlay, muted_panels, panel_intensity, panel_values

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1, 24, 24, 3), dtype=np.uint8)
    ebp = rng.random((1, 24, 24))
    xm = rng.random((1, 3, 24, 24))
    xm[0, 1] = xm[0, 0]
    xm[0, 2] = xm[0, 0][::-1]  # equal peaks, x3 elsewhere
    contrib = np.array([[10.0, 0.01, 0.5]])
    np.testing.assert_allclose(panel_intensity(contrib), [[1.0, 0.001, 0.05]])
    np.testing.assert_array_equal(muted_panels(contrib), [[False, True, False]])
    values = panel_values(xm, contrib)
    assert values[0, 1].max() <= 0.01 * values[0, 0].max() and values[0, 0].max() == 1.0
    assert values[0, 2].max() == pytest.approx(0.05)

    fig = excitation_grid(images, ebp, xm, contrib, title="cat 0")
    titles = {ax.get_title(): ax.title.get_color() for ax in fig.axes if ax.get_title()}
    assert titles["x2: 0.01 (~0)"] == "0.45" and "x1: 10.00" in titles and "x3: 0.50" in titles
    shown = _panels(fig)
    cmap = colormaps["jet"]
    np.testing.assert_allclose(shown["x1"], overlay(images[0], values[0, 0], cmap), atol=1e-12)
    np.testing.assert_allclose(shown["x3"], overlay(images[0], values[0, 2], cmap), atol=1e-12)
    np.testing.assert_allclose(shown["ExcitationBP"], overlay(images[0], ebp[0] / ebp[0].max(), cmap), atol=1e-12)

    def heat(p):  # colour drawn over the grey image: spread between the RGB channels
        return float((p.max(axis=-1) - p.min(axis=-1)).max())

    assert heat(shown["x2"]) == 0.0 < 0.3 < heat(shown["x1"])  # muted: no colour at all
    assert not np.allclose(shown["x2"], shown["x1"], atol=0.05)
    assert heat(shown["x3"]) < 0.5 * heat(shown["x1"])
    assert "|v_i E_i|" in fig.get_suptitle()


def test_the_grid_draws_what_panel_values_returns(monkeypatch) -> None:
    """The drawing goes through panel_values/muted_panels (what the tests above check)."""
    from matplotlib import colormaps

    import srae.figures as F

    images, ebp, xm, contrib = _data(r=1, n=3)
    planted = np.full((1, 3, 24, 24), 0.25)
    monkeypatch.setattr(F, "panel_values", lambda maps, c, scale="row": planted)
    shown = _panels(F.excitation_grid(images, ebp, xm, contrib))
    for k in ("x1", "x2", "x3"):
        np.testing.assert_allclose(shown[k], F.overlay(images[0], planted[0, 0], colormaps["jet"]), atol=1e-12)


def test_row_scale_edge_cases() -> None:
    """A row that contributes nothing: every panel muted, no division by zero. Dead x-features
    keep their titles; a negative contribution is drawn by its size (its sign is in the title)."""
    from srae.figures import panel_intensity

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    xm = rng.random((2, 3, 24, 24))
    xm[1, 0] = 0.0  # an all-zero map: no heat, no division by zero
    contrib = np.array([[0.0, 0.0, 0.0], [4.0, -2.0, 0.0]])
    np.testing.assert_allclose(panel_intensity(contrib), [[0, 0, 0], [1.0, 0.5, 0.0]])
    fig = excitation_grid(images, rng.random((2, 24, 24)), xm, contrib, dead=[2])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "ExcitationBP", "x1: 0.00 (~0)", "x2: 0.00 (~0)", "x3: dead (0 on training)",
                      "image", "ExcitationBP", "x1: 4.00", "x2: -2.00", "x3: dead (0 on training)"]
    shown = [np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images]
    for p in shown[2:5] + shown[9:10]:  # row 1 all muted; row 2's dead x3 contributes 0
        assert np.ptp(p, axis=-1).max() == 0.0
    assert np.isfinite(np.stack(shown)).all()
    with pytest.raises(InputError, match="scale 'col'"):
        excitation_grid(images, rng.random((2, 24, 24)), xm, contrib, scale="col")
    with pytest.raises(InputError, match="NaN"):
        excitation_grid(images, rng.random((2, 24, 24)), xm, contrib * np.nan)


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
    # a ~0 x-feature keeps its map here (the shape shows), its grey title says it adds ~nothing
    fig = excitation_grid(images, ebp, xm, np.array([[3.0, 0.001, 1.0]]), scale="map")
    titled = {ax.get_title(): ax.images[0].get_array() for ax in fig.axes if ax.images}
    np.testing.assert_allclose(titled["x2: 0.00 (~0)"], titled["x1: 3.00"], atol=1e-12)


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
