"""Human-evaluation kit: blinded export, import round trip, win rates, Cohen's and Fleiss' kappa."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from esc_evolve.errors import DataFormatError
from esc_evolve.evaluation.human import agreement, export_sheets, fleiss_kappa, import_ratings
from tests.eval_fixtures import make_table


def _fill(sheet, out, rater, choose):
    """Write a filled copy of sheet.csv: choose(item_key) -> '1' | '2' | 'tie' for every criterion."""
    with sheet.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["rater"] = rater
        row["overall"] = choose(row["item_id"])
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_export_is_blinded(tmp_path):
    table = make_table(6, 1)
    paths = export_sheets(table, [("m2", "m0")], tmp_path, n_items=6, seed=3, criteria=("overall",))
    sheet = paths["sheet.csv"].read_text()
    key = json.loads(paths["key.json"].read_text())
    assert not re.search(r"\bm[02]\b|sample", sheet)
    assert len(key["items"]) == 6
    shown_first = [item["response_1"] for item in key["items"].values()]
    assert set(shown_first) == {"m2", "m0"}  # both sides are used
    form = paths["form.html"].read_text()
    assert "Download CSV" in form and "item0001" in form and not re.search(r"\bm[02]\b", form)


def test_round_trip_win_rate_and_cohen_kappa(tmp_path):
    table = make_table(6, 1)
    paths = export_sheets(table, [("m2", "m0")], tmp_path, n_items=6, seed=3, criteria=("overall",))
    key = json.loads(paths["key.json"].read_text())["items"]
    ids = sorted(key)
    side = {i: "1" if key[i]["response_1"] == "m2" else "2" for i in ids}  # the side m2 is shown on
    other = {"1": "2", "2": "1"}
    # unblinded labels: rater A = [m2, m2, m0, m0, tie, m2], rater B = [m2, m0, m0, m0, tie, m2]
    plan_a = ["first", "first", "second", "second", "tie", "first"]
    plan_b = ["first", "second", "second", "second", "tie", "first"]

    def chooser(plan):
        labels = dict(zip(ids, plan, strict=True))
        return lambda i: "tie" if labels[i] == "tie" else side[i] if labels[i] == "first" else other[side[i]]

    a = _fill(paths["sheet.csv"], tmp_path / "a.csv", "ann", chooser(plan_a))
    b = _fill(paths["sheet.csv"], tmp_path / "b.csv", "bob", chooser(plan_b))
    result = import_ratings(paths["key.json"], [a, b])
    (row,) = result["results"]
    assert (row["wins"], row["ties"], row["losses"]) == (5, 2, 5)
    assert row["win_rate"] == pytest.approx(0.5)
    # p_o = 5/6; p_e = (3*2 + 2*3 + 1*1) / 36 = 13/36 -> kappa = (30/36 - 13/36) / (23/36) = 17/23
    assert row["agreement_measure"] == "cohen" and row["agreement"] == pytest.approx(17 / 23)


def test_fleiss_kappa_known_example():
    # Fleiss (1971) / the standard textbook example: 10 subjects, 14 raters, 5 categories -> kappa 0.210
    counts = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert fleiss_kappa(counts) == pytest.approx(0.210, abs=1e-3)


def test_three_raters_use_fleiss():
    raters = [{"i1": "first", "i2": "second"}, {"i1": "first", "i2": "second"}, {"i1": "first", "i2": "tie"}]
    kappa, measure, n = agreement(raters)
    # counts per item (first, second, tie): [3, 0, 0] and [0, 2, 1]; P_bar = (1 + 1/3) / 2 = 2/3,
    # P_e = (3/6)^2 + (2/6)^2 + (1/6)^2 = 7/18 -> kappa = (2/3 - 7/18) / (1 - 7/18) = 5/11
    assert measure == "fleiss" and n == 2 and kappa == pytest.approx(5 / 11)


def test_bad_sheets_are_errors(tmp_path):
    table = make_table(3, 1)
    paths = export_sheets(table, [("m1", "m0")], tmp_path, n_items=3, criteria=("overall",))
    bad = _fill(paths["sheet.csv"], tmp_path / "bad.csv", "x", lambda i: "maybe")
    with pytest.raises(DataFormatError, match="expected 1, 2 or tie"):
        import_ratings(paths["key.json"], [bad])
