"""benchmarks/bench_load.py (reload time and peak memory of loading) and the one ``machine_info``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks import bench_kmeans, bench_load, output

BENCHMARKS = Path(bench_load.__file__).resolve().parent


def test_only_output_defines_machine_info():
    defining = [
        path.name
        for path in sorted(BENCHMARKS.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and node.name == "machine_info"
    ]
    assert defining == ["output.py"]


def test_machine_info_records_the_packages_asked_for():
    info = output.machine_info(bench_kmeans.PACKAGES)
    assert list(info["versions"]) == list(bench_kmeans.PACKAGES)
    assert info["versions"]["torch"] is not None
    assert {"date", "cpu", "cores", "torch_threads", "load_average_at_start", "platform", "python"} <= set(info)


def test_one_load_script_measures_reload_time_and_memory():
    assert not (BENCHMARKS / "bench_reload.py").exists()
    assert not (BENCHMARKS / "bench_load_memory.py").exists()
    reload = bench_load.parser().parse_args(["reload", "--quantized", "q"])
    assert (reload.func, reload.repeats, reload.float_dir, reload.quantized) == (
        bench_load.cmd_reload,
        7,
        None,
        Path("q"),
    )
    memory = bench_load.parser().parse_args(["memory", "--models", "minilm", "--json", "runs.json"])
    assert (memory.func, memory.repeats, memory.models, memory.configs, memory.json) == (
        bench_load.cmd_memory,
        3,
        "minilm",
        "int2,budget4.5",
        Path("runs.json"),
    )
    with pytest.raises(SystemExit):
        bench_load.parser().parse_args([])  # a measurement must be named


def test_memory_figures_come_from_the_status_before_and_after():
    run = {
        "before": {"VmHWM": 300.0, "VmRSS": 290.0, "RssAnon": 200.0, "RssFile": 90.0},
        "after": {"VmHWM": 800.0, "VmRSS": 700.0, "RssAnon": 450.0, "RssFile": 250.0},
        "seconds": 1.5,
    }
    assert bench_load.figures(run) == {
        "peak MiB": 800.0,
        "peak - before MiB": 510.0,
        "anon after MiB": 450.0,
        "anon growth MiB": 250.0,
        "rss after MiB": 700.0,
        "load s": 1.5,
    }
