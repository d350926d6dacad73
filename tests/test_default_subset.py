"""The default suite keeps a covering subset of each big end-to-end grid (tests/default_subset.py)."""

import pytest

import default_subset


@pytest.mark.parametrize("grid", sorted(default_subset.DEFAULT_CASES))
def test_default_cases_cover_every_axis_value_and_exist(grid):
    collected = default_subset.COLLECTED.get(grid)
    if not collected:
        pytest.skip(f"{grid.split('::')[0]} was not collected in this run: run the whole suite to check its subset")
    assert default_subset.uncovered(grid, collected) == []
    assert default_subset.DEFAULT_CASES[grid] <= set(collected), "a kept id that no longer exists"


def test_uncovered_names_a_missing_value(monkeypatch):
    grid = "tests/x.py::test_f"
    monkeypatch.setitem(default_subset.DEFAULT_CASES, grid, {"load-ttn"})
    assert default_subset.uncovered(grid, ["load-ttn", "fold-mera"]) == ["fold (position 0)", "mera (position 1)"]
