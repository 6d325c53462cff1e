"""The best-at-budget table and the frontier method grid, on hand-made results (no model runs)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import methods, output


def _row(method: str, family: str, bits: float, value: float | None, kind: str = "splitquant", **extra) -> dict:
    timing = {"size_bytes": 1000, "size_kind": "safetensors", "quantize_s": 1.0, "forward_ratio": 1.5}
    return {"method": method, "family": family, "kind": kind, "effective_bits": bits, "value": value, **timing, **extra}


def _result() -> dict:
    cosine = [
        _row("FP32", "FP32", 32.0, 1.0, kind="fp32"),
        _row("HQQ 3-bit g64", "HQQ", 3.7, 0.95, kind="hqq"),
        _row("HQQ 4-bit g128", "HQQ", 4.25, 0.97, kind="hqq"),
        _row("HQQ 4-bit g64", "HQQ", 4.5, 0.99, kind="hqq"),
        _row("HQQ 4-bit g32", "HQQ", 5.0, 0.985, kind="hqq"),  # more bits, worse: never the best
        _row("SQ a", "SplitQuant mse (k>=2)", 3.5, 0.96),  # exactly on the 3.5 budget: counts
        _row("SQ b", "SplitQuant mse (k>=2)", 4.1875, 0.98),
        _row("SQ c", "SplitQuant mse (k>=2)", 4.0, 0.98),  # ties b with fewer bits: wins the tie
        _row("SQ d", "SplitQuant mse (k>=2)", 4.3, 0.999, error="RuntimeError: boom"),
        _row("SQ e", "SplitQuant mse (k>=2)", 4.4, 0.9999, na="group_size=128 does not divide 576"),
        _row("SQ f", "SplitQuant mse (k>=2)", 4.45, math.nan),
        _row("plain", "plain minmax (k=1)", 6.0625, 0.999),  # above every budget: none within budget
        {"method": "quanto qint4", "family": "optimum-quanto", "kind": "quanto", "error": "ValueError: x"},
    ]
    ppl = [
        _row("FP32", "FP32", 32.0, 24.9, kind="fp32"),
        _row("HQQ 4-bit g128", "HQQ", 4.25, 40.0, kind="hqq"),
        _row("HQQ 4-bit g64", "HQQ", 4.5, 30.0, kind="hqq"),
        _row("HQQ 4-bit g16", "HQQ", 6.0, 26.0, kind="hqq"),
        _row("SQ x", "SplitQuant mse (k>=2)", 4.1875, 35.0),
        _row("SQ y", "SplitQuant mse (k>=2)", 5.14, 1e5),  # higher perplexity: worse despite more bits
    ]
    return {
        "machine": output.machine_info(),
        "command": "python benchmarks/bench_quality.py --methods frontier",
        "tasks": [
            {
                "task": "cos",
                "metric": "mean cosine to FP32",
                "higher_is_better": True,
                "model": "M",
                "data": "d",
                "rows": cosine,
            },
            {"task": "ppl", "metric": "perplexity", "higher_is_better": False, "model": "L", "data": "d", "rows": ppl},
        ],
    }


def _names(cells: list) -> list:
    return [None if c is None else c["method"] for c in cells]


def test_best_config_per_budget_and_family():
    table = output.budget_table(_result(), (3.5, 4.0, 4.25, 4.5, 5.0, 6.0))
    cos, ppl = table["tasks"]
    assert cos["families"] == ["HQQ", "SplitQuant mse (k>=2)", "plain minmax (k=1)", "optimum-quanto"]
    assert cos["fp32"] == 1.0 and cos["higher_is_better"] and not ppl["higher_is_better"]
    best = cos["best"]
    hqq_cos = _names(best["HQQ"])
    assert hqq_cos == [None, "HQQ 3-bit g64", "HQQ 4-bit g128", *["HQQ 4-bit g64"] * 3]
    # errors, n/a and NaN rows never count; a tie goes to fewer bits
    assert _names(best["SplitQuant mse (k>=2)"]) == ["SQ a"] + ["SQ c"] * 5
    assert best["SplitQuant mse (k>=2)"][1] == {"method": "SQ c", "value": 0.98, "effective_bits": 4.0}
    assert _names(best["plain minmax (k=1)"]) == [None] * 6  # none within budget
    assert _names(best["optimum-quanto"]) == [None] * 6  # only a failed row
    # lower is better for perplexity
    hqq_ppl = _names(ppl["best"]["HQQ"])
    assert hqq_ppl == [None, None, "HQQ 4-bit g128", "HQQ 4-bit g64", "HQQ 4-bit g64", "HQQ 4-bit g16"]
    assert _names(ppl["best"]["SplitQuant mse (k>=2)"]) == [None, None] + ["SQ x"] * 4


def test_budget_markdown_bolds_the_best_family_and_marks_none():
    result = _result()
    md = output.budget_markdown(output.budget_table(result, (3.5, 4.5)))
    assert "### M: mean cosine to FP32 (higher is better; FP32 1.0000)" in md
    assert "| budget | HQQ | SplitQuant mse (k>=2) | plain minmax (k=1) | optimum-quanto |" in md
    assert "| <= 3.5 | - | **0.9600** SQ a (3.50) | - | - |" in md
    assert "| <= 4.5 | **0.9900** HQQ 4-bit g64 (4.50) | 0.9800 SQ c (4.00) | - | - |" in md
    assert "### L: perplexity (lower is better; FP32 24.90)" in md
    assert "| <= 4.5 | **30.00** HQQ 4-bit g64 (4.50) | 35.00 SQ x (4.19) |" in md
    assert "## Best at a bits-per-weight budget" in output.markdown(result)


def test_table_from_saved_json_regenerates_without_running(tmp_path):
    from benchmarks import bench_quality

    result = _result()
    first, second = dict(result, tasks=result["tasks"][:1]), dict(result, tasks=result["tasks"][1:])
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    assert bench_quality.main(["--table-from", str(tmp_path / "a.json"), "--budgets", "4,5"]) == 0
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["budget_table"]["budgets"] == [4.0, 5.0] and (tmp_path / "a.md").exists()
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="needs --name"):
        bench_quality.main(["--table-from", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    argv = ["--table-from", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--name", "ab"]
    assert bench_quality.main(argv) == 0
    merged = json.loads((tmp_path / "ab.json").read_text())
    assert [t["task"] for t in merged["tasks"]] == ["cos", "ppl"] and len(merged["merged_from"]) == 2
    assert merged["budget_table"]["budgets"] == list(output.BUDGETS)  # a merge starts from the defaults
    md = (tmp_path / "ab.md").read_text()
    assert "| SQ e | n/a: group_size=128 does not divide 576 | | | | |" in md
    assert "| <= 6 | **26.00** HQQ 4-bit g16 (6.00) |" in md


def test_frontier_grid_stays_in_range_and_small():
    assert methods.expected_bits(2, 4, None, 576) == pytest.approx(2 + 2 + 128 / 576)
    assert methods.expected_bits(3, 1, 64, 384) == 3.5
    assert methods.expected_bits(4, 1, 64, 576, range_bits=6) == 4.25
    frontier = methods.frontier_methods()
    sq = [m for m in frontier if m.kind == "splitquant"]
    hqq = [m for m in frontier if m.kind == "hqq"]
    coded = [m for m in sq if m.range_bits is not None]
    assert len(coded) == len(methods.FRONTIER_CODED) and all(m.name.endswith(" mse r6") for m in coded)
    assert all(m.fit == "mse" and m.range_bits == methods.CODED_RANGE_BITS for m in coded)
    sq = [m for m in sq if m.range_bits is None]
    assert len(sq) <= 48 and {m.fit for m in sq} == {"minmax", "mse"}
    per_row = [m for m in sq if m.clustering == "channel"]
    assert len(per_row) == len(methods.FRONTIER_PER_ROW) and all(m.name.endswith(" mse per-row") for m in per_row)
    assert all(m.num_clusters >= 2 and m.fit == "mse" for m in per_row)
    for m in sq:
        for width in (576, 384):
            assert 3 <= methods.expected_bits(m.bits, m.num_clusters, m.group_size, width) <= 6.5
        assert m.group_size in (None, 32, 64, 128, 192)
        # every group size divides MiniLM's widths; only 128 misses SmolLM2's 576 (n/a there)
        assert all(w % m.group_size == 0 for w in (384, 1536)) if m.group_size else True
        assert 576 % m.group_size == 0 or m.group_size == 128 if m.group_size else True
    assert {(m.bits, m.group_size) for m in hqq} == {(2, 16), (2, 32)} | {
        (b, g) for b in (3, 4) for g in (16, 32, 64, 128)
    }
    assert all(3 <= methods.hqq_expected_bits(m.bits, m.group_size) <= 6.5 for m in hqq)
    full = methods.frontier_methods(full=True)
    assert {(m.bits, m.num_clusters, m.group_size) for m in full if m.kind == "splitquant" and not m.range_bits} == set(
        methods.splitquant_grid()
    )
    assert set(methods.FRONTIER_SPLITQUANT) <= set(methods.splitquant_grid())
    for m in coded:  # coded ranges: the same budgets with groups half as large (16 divides every width here)
        for width in (576, 384):
            assert 3 <= methods.expected_bits(m.bits, m.num_clusters, m.group_size, width, m.range_bits) <= 6.5
        assert all(w % m.group_size == 0 for w in (384, 1536)) and (576 % m.group_size == 0 or m.group_size == 128)
    families = {m.family for m in frontier}
    assert families >= {"HQQ", "SplitQuant minmax (k>=2)", "SplitQuant mse (k>=2)", "plain mse (k=1)"}


def test_mcnemar_p_is_the_exact_binomial_test_on_discordant_examples():
    from scipy.stats import binomtest

    assert output.mcnemar_p(0, 0) == 1.0
    assert output.mcnemar_p(4, 0) == output.mcnemar_p(0, 4) == pytest.approx(2 / 16)
    assert output.mcnemar_p(3, 5) == pytest.approx(93 / 128)
    for a, b in [(1, 9), (5, 5), (12, 30), (40, 2)]:
        assert output.mcnemar_p(a, b) == pytest.approx(binomtest(a, a + b, 0.5).pvalue)
    with pytest.raises(ValueError, match=">= 0"):
        output.mcnemar_p(-1, 2)


def test_digits_keeps_class_indices_compactly_and_refuses_others():
    assert output.digits([0, 1, 9, 4]) == "0194"
    with pytest.raises(ValueError, match="0-9"):
        output.digits([1, 10])


def _classifier_result() -> dict:
    labels = "0000011111"
    rows = [
        _row("FP32", "FP32", 32.0, 0.9, kind="fp32", predictions="0000011110"),
        _row("HQQ 4-bit g128", "HQQ", 4.25, 0.8, kind="hqq", predictions="0000111110"),  # 8 right
        _row("HQQ 4-bit g64", "HQQ", 4.5, 1.0, kind="hqq", predictions="0000011111"),  # 10 right
        _row("ours 4.25", "plain mse coded ranges (k=1)", 4.25, 0.9, predictions="1000011111"),  # 9 right
        _row("ours 4.5", "plain mse coded ranges (k=1)", 4.5, 0.7, predictions="1110011111"),  # 7 right
        _row("ours 6", "plain mse coded ranges (k=1)", 6.0, 0.9, error="RuntimeError: boom"),
    ]
    task = {"task": "sms", "metric": "accuracy", "higher_is_better": True, "model": "C", "data": "d"}
    return {
        "machine": output.machine_info(),
        "command": "x",
        "for_budget": {"4": "absent", "4.25": "ours 4.25", "4.5": "ours 4.5", "6": "ours 6"},
        "tasks": [{**task, "rows": rows, "labels": labels}, _result()["tasks"][0]],
    }


def test_paired_table_compares_for_budget_with_the_best_anchor_example_by_example():
    table = output.paired_table(_classifier_result(), (4.0, 4.25, 4.5, 6.0))
    (task,) = table["tasks"]  # the cosine task has no labels: left out
    # 4.0: no for_budget row ran; 6.0: it failed
    assert [p["budget"] for p in task["pairs"]] == [4.25, 4.5]
    first, second = task["pairs"]
    assert (first["ours"], first["anchor"]) == ("ours 4.25", "HQQ 4-bit g128")
    # ours misses example 0, HQQ g128 misses 4 and 9
    assert (first["only_ours"], first["only_anchor"]) == (2, 1)
    assert first["p_value"] == pytest.approx(output.mcnemar_p(2, 1)) == 1.0
    assert first["ours_agree_fp32"] == pytest.approx(0.8) and first["anchor_agree_fp32"] == pytest.approx(0.9)
    assert (second["anchor"], second["only_ours"], second["only_anchor"]) == ("HQQ 4-bit g64", 0, 3)
    assert second["p_value"] == pytest.approx(0.25)
    md = output.paired_markdown(table)
    assert "### C: accuracy, 10 examples, against HQQ" in md
    assert "| <= 4.5 | ours 4.5 (4.50) | 70.0 % | HQQ 4-bit g64 (4.50) | 100.0 % | 0 | 3 | 0.25 | 60.0 / 90.0 % |" in md
    assert "## for_budget against the anchors, example by example" in output.markdown(_classifier_result())


def test_paired_table_compares_with_every_anchor_family_measured():
    result = _classifier_result()
    rows = result["tasks"][0]["rows"]
    rows.append(_row("NF4 b64", "bitsandbytes NF4", 4.13, 0.9, kind="nf4", predictions="0000011110"))  # 9 right
    table = output.paired_table(result, (4.25, 4.5))
    assert [t["anchor"] for t in table["tasks"]] == ["HQQ", "bitsandbytes NF4"]  # no SINQ row: no SINQ entry
    nf4 = table["tasks"][1]["pairs"]
    assert [(p["budget"], p["anchor"], p["only_ours"], p["only_anchor"]) for p in nf4] == [
        (4.25, "NF4 b64", 1, 1),
        (4.5, "NF4 b64", 1, 3),
    ]
    assert [t["anchor"] for t in output.paired_table(result, (4.25,), anchors=("HQQ",))["tasks"]] == ["HQQ"]


def test_paired_table_refuses_predictions_that_do_not_match_the_labels():
    result = _classifier_result()
    result["tasks"][0]["rows"][3]["predictions"] = "100001111"
    with pytest.raises(ValueError, match="9 and 10 predictions for 10 labels"):
        output.paired_table(result, (4.25,))
