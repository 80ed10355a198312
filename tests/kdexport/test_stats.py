"""kdexport.stats: the paired t-test checked by hand and against scipy; Welch; the CSV reader; breakpoints."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats as sps

from kdexport.errors import DataError
from kdexport.stats import read_results_csv, run_stats


def rows_from(effs: dict[str, tuple[float, float]]) -> list[dict]:
    """One row per pair and method with params = 1M, so the efficiency (w1 = w2) equals the accuracy."""
    return [{"pair": pair, "method": m, "accuracy": acc, "params": 1_000_000}
            for pair, (w, c) in effs.items() for m, acc in (("weight", w), ("channel", c))]


def test_paired_t_test_by_hand():
    # channel - weight differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3, df 2
    res = run_stats(rows_from({"a": (90, 91), "b": (80, 82), "c": (70, 73)}))
    assert res["n_pairs"] == 3 and res["df"] == 2
    assert res["mean_diff"] == pytest.approx(2.0)
    assert res["t"] == pytest.approx(2 * math.sqrt(3))
    # Student t with 2 df: P(|T| > t) = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12 / 14)
    assert res["p"] == pytest.approx(1 - math.sqrt(12 / 14))
    # t_{0.975, 2} solves t / sqrt(2 + t^2) = 0.95: t^2 = 2 * 0.95^2 / (1 - 0.95^2)
    half = math.sqrt(2 * 0.9025 / 0.0975) / math.sqrt(3)
    assert res["ci95"] == pytest.approx([2 - half, 2 + half])
    assert res["effect_size"] == pytest.approx(2.0)  # d_z = mean / sd
    assert [p["pair"] for p in res["pairs"]] == ["a", "b", "c"]
    assert res["pairs"][1]["diff"] == pytest.approx(2.0)
    assert res["pairs"][1]["channel"]["efficiency"] == pytest.approx(82.0)
    assert res["pairs"][0]["welch"] is None  # one repeat per method
    json.dumps(res, allow_nan=False)


def test_paired_t_test_matches_scipy_with_weights_and_params():
    rng = np.random.default_rng(0)
    rows, w_eff, c_eff = [], [], []
    for i in range(6):
        for method, effs in (("weight", w_eff), ("channel", c_eff)):
            acc, params = float(rng.uniform(60, 95)), float(rng.integers(500_000, 20_000_000))
            rows.append({"pair": f"p{i}", "method": method, "accuracy": acc, "params": params})
            effs.append(0.7 * acc / (0.3 * params / 1e6))
    res = run_stats(rows, w1=0.7, w2=0.3)
    ref = sps.ttest_rel(c_eff, w_eff)
    assert res["t"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert res["ci95"] == pytest.approx([ci.low, ci.high])
    diff = np.subtract(c_eff, w_eff)
    assert res["effect_size"] == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert (res["w1"], res["w2"]) == (0.7, 0.3)


def test_repeats_are_averaged_and_welch_per_pair():
    rows = []
    effs = {"weight": [90.0, 92.0, 91.0], "channel": [85.0, 84.0, 88.0]}
    for pair, shift in (("a", 0), ("b", 5)):
        for method, accs in effs.items():
            for r, acc in enumerate(accs):
                rows.append({"pair": pair, "method": method, "accuracy": acc - shift, "params": 2_000_000,
                             "repeat": r})
    res = run_stats(rows)
    a = res["pairs"][0]
    assert a["weight"]["repeats"] == 3 and a["weight"]["efficiency"] == pytest.approx(91.0 / 2)
    assert a["channel"]["efficiencies"] == pytest.approx([42.5, 42.0, 44.0])
    ref = sps.ttest_ind(np.array(effs["channel"]) / 2, np.array(effs["weight"]) / 2, equal_var=False)
    assert a["welch"]["t"] == pytest.approx(ref.statistic) and a["welch"]["p"] == pytest.approx(ref.pvalue)
    # Welch-Satterthwaite df by hand: variances 1/4 and 13/12 (of halved values), n = 3 each
    v1, v2 = (1.0 / 4) / 3, (13.0 / 12) / 3
    assert a["welch"]["df"] == pytest.approx((v1 + v2) ** 2 / (v1**2 / 2 + v2**2 / 2))
    # both pairs differ by the same amount: the paired t is undefined, reported as null, not inf / NaN
    assert res["mean_diff"] == pytest.approx((257 / 3 - 91) / 2)
    assert res["t"] is None and res["p"] is None and res["effect_size"] is None
    assert res["ci95"] == pytest.approx([res["mean_diff"]] * 2)
    json.dumps(res, allow_nan=False)


def test_levels_pick_the_breakpoint_per_repeat():
    curve = [(0.0, 90.0), (0.5, 89.5), (0.7, 88.0), (0.9, 70.0)]  # tolerance 1 -> level 0.5
    rows = []
    for pair in ("a", "b"):
        for method, params in (("weight", 1_000_000), ("channel", 4_000_000)):
            for level, acc in reversed(curve):  # unsorted on purpose
                rows.append({"pair": pair, "method": method, "accuracy": acc, "level": level,
                             "params": params * (1 - level)})
    res = run_stats(rows, tolerance=1.0)
    w = res["pairs"][0]["weight"]
    assert w["level"] == 0.5 and w["accuracy"] == 89.5 and w["params"] == 500_000
    assert w["efficiency"] == pytest.approx(89.5 / 0.5)
    knee = run_stats(rows, breakpoint="knee")["pairs"][0]["weight"]
    assert knee["level"] == 0.7  # farthest above the chord of the normalised curve


def test_the_breakpoint_is_chosen_on_validation_and_test_only_reported():
    rows = []
    for pair in ("a", "b"):
        for method in ("weight", "channel"):
            for level, acc, val in ((0.0, 90.0, 90.0), (0.5, 80.0, 89.5), (0.9, 70.0, 60.0)):
                rows.append({"pair": pair, "method": method, "accuracy": acc, "val_accuracy": val, "level": level,
                             "params": 1e6 * (1 - level)})
    w = run_stats(rows, tolerance=1.0)["pairs"][0]["weight"]
    assert w["level"] == 0.5 and w["accuracy"] == 80.0  # test says 80 at 50%; val (89.5) chose it
    without_val = [{k: v for k, v in r.items() if k != "val_accuracy"} for r in rows]
    assert run_stats(without_val, tolerance=1.0)["pairs"][0]["weight"]["level"] == 0.0


@dataclass
class Record:
    pair: str
    method: str
    accuracy: float
    params: int


def test_records_with_attributes_are_accepted():
    recs = [Record(p, m, acc, 1_000_000) for p, m, acc in
            [("a", "weight", 90), ("a", "channel", 91), ("b", "weight", 80), ("b", "channel", 82.5)]]
    assert run_stats(recs)["mean_diff"] == pytest.approx(1.75)


ROW = {"pair": "a", "method": "weight", "accuracy": 80, "params": 1e6}


@pytest.mark.parametrize("rows, match", [
    (rows_from({"a": (90, 91)}), ">= 2 pairs"),
    (rows_from({"a": (90, 91)}) + [{**ROW, "pair": "b"}], ">= 2 pairs"),
    ([{"pair": "a", "method": "magnitude", "accuracy": 80, "params": 1e6}], "method must be"),
    ([{"pair": "a", "method": "weight", "accuracy": 80}], "lacks"),
    ([{"pair": "a", "method": "weight", "accuracy": "x", "params": 1e6}], "bad value"),
    ([{"pair": "a", "method": "weight", "accuracy": 80, "params": 0}], "params a count > 0"),
    ([{"pair": "a", "method": "weight", "accuracy": math.nan, "params": 1e6}], "accuracy must be"),
    (rows_from({"a": (90, 91)}) * 2, "no level column"),
    ([{**ROW, "level": 0.1}, {**ROW, "repeat": 1}], "some rows have a level"),
    ([{**ROW, "level": 0.1}, {**ROW, "accuracy": 70, "level": 0.1}], "duplicate"),
    ([], "no result rows"),
])
def test_bad_rows(rows, match):
    with pytest.raises(DataError, match=match):
        run_stats(rows)


# ---------------------------------------------------------------------------------------------- CSV
def test_read_results_csv(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("pair, method ,accuracy,params,repeat,notes\n"
                    "a,weight,90.5,1000000,0,x\na,channel,91,1000000,0,\n"
                    "b,weight,80,2e6,0,\nb,channel,82,2000000,0,\n", encoding="utf-8-sig")
    rows = read_results_csv(path)
    assert rows[0] == {"pair": "a", "method": "weight", "accuracy": 90.5, "params": 1e6, "repeat": 0}
    assert rows[2]["params"] == 2e6
    assert run_stats(rows)["mean_diff"] == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("text, match", [
    ("pair,method,acc,params\na,weight,90,1e6\n", "lacks column.*columns pair,method,accuracy,params"),
    ("pair,method,accuracy,params\na,weight,ninety,1e6\n", r"row 1 \(line 2\): bad value.*expected columns"),
    ("pair,method,accuracy,params,repeat\na,weight,90,1e6,0\na,weight,90,1e6,1.5\n", "line 3"),
    ("pair,method,accuracy,params,level\na,weight,90,1e6,\n", "line 2"),
    ("pair,method,accuracy,params\n", "no data rows"),
    ("", "lacks column"),
])
def test_read_results_csv_bad(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_results_csv(path)
    assert "\n" not in str(err.value)


def test_read_results_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_results_csv(tmp_path / "nope.csv")
