"""The pictures people look at: curves that show every point, the guarantee over the sites, a legend that stays readable."""

from __future__ import annotations

from PIL import Image

import fedpggan.plots as plots


def captured_axes(monkeypatch):
    """The axes save_curves drew, kept for inspection (the figure is closed once written)."""
    seen = []
    real = plots.plt.subplots

    def subplots(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        seen.append(axes)
        return fig, axes

    monkeypatch.setattr(plots.plt, "subplots", subplots)
    return seen


def test_a_one_round_curve_is_drawn_and_the_guarantee_is_named_among_many_sites(tmp_path, monkeypatch):
    seen = captured_axes(monkeypatch)
    sites = [f"epsilon_site_{i}" for i in range(100)]
    one_round = [{"round": 1, **{k: 0.5 + i / 100 for i, k in enumerate(sites)}, "epsilon_max": 1.49}]
    path = tmp_path / "curves" / "epsilon.png"
    plots.save_curves(one_round, "round", {"epsilon per site": sites + ["epsilon_max"]}, path,
                      y_label="cumulative epsilon", highlight={"epsilon_max": "guarantee (max over sites)"})
    ax = seen[-1][0][0]
    assert all(line.get_marker() == "." for line in ax.lines)  # a single point is visible
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["guarantee (max over sites)"]  # not 101 entries
    assert ax.get_ylabel() == "cumulative epsilon"
    with Image.open(path) as img:
        assert img.format == "PNG"
    assert [p.name for p in path.parent.iterdir()] == ["epsilon.png"]  # written via a temp file, none left behind

    few = [{"round": r, "epsilon_site_a": r / 10, "epsilon_site_b": r / 20, "epsilon_max": r / 10} for r in (1, 2)]
    plots.save_curves(few, "round", {"epsilon per site": ["epsilon_site_a", "epsilon_site_b", "epsilon_max"]}, path,
                      highlight={"epsilon_max": "guarantee (max over sites)"})
    assert [t.get_text() for t in seen[-1][0][0].get_legend().get_texts()] == [
        "epsilon_site_a", "epsilon_site_b", "guarantee (max over sites)"]
