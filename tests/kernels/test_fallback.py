"""The pure-torch fallback: forced by the environment variable, or taken when the build fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec, dequantize_weight
from optimum_splitquant.kernels import _build
from optimum_splitquant.nn import SplitQuantLinear

SPEC = QuantSpec(2, 3)


@pytest.fixture
def fresh_load():
    """Forget the process-wide load result before and after the test (the library stays loaded)."""
    kernels._load.cache_clear()
    yield
    kernels._load.cache_clear()


def layer_and_plain_output(tokens: int = 3) -> tuple[SplitQuantLinear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    q = SplitQuantLinear.from_float(nn.Linear(40, 24), SPEC)
    x = torch.randn(tokens, 40)
    w = dequantize_weight(q.weight_packed, q.weight_scale, q.weight_offset, 40, SPEC)
    return q, x, F.linear(x, w, q.bias)


@pytest.mark.parametrize("value", ["0", "off", "false", "torch", "OFF"])
def test_env_var_forces_pure_torch(value: str, monkeypatch: pytest.MonkeyPatch, fresh_load) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, value)

    def no_build() -> Path:
        raise AssertionError("nothing may be compiled when the kernels are off")

    monkeypatch.setattr(kernels, "build_library", no_build)
    st = kernels.status()
    assert st.mode == "off" and not st.active and kernels.ENV_VAR in st.reason
    assert not kernels.available()
    q, x, expected = layer_and_plain_output()
    with torch.no_grad():
        assert torch.equal(q(x), expected)
        assert torch.equal(
            q.dequantize_weight(), dequantize_weight(q.weight_packed, q.weight_scale, q.weight_offset, 40, SPEC)
        )


def test_failed_build_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_load
) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)

    def broken() -> Path:
        raise _build.KernelBuildError("no C++ compiler found (test)")

    monkeypatch.setattr(kernels, "build_library", broken)
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant.kernels"):
        st = kernels.status()
    assert st.mode == "auto" and not st.loaded and "no C++ compiler" in st.reason
    assert any("pure-torch" in r.getMessage() for r in caplog.records)
    q, x, expected = layer_and_plain_output()
    with torch.no_grad():
        assert torch.equal(q(x), expected)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.dequantize(q.weight_packed, q.weight_scale, q.weight_offset, 40, SPEC.bits, SPEC.symbol_width)


def test_require_mode_raises_when_the_build_fails(monkeypatch: pytest.MonkeyPatch, fresh_load) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "require")

    def broken() -> Path:
        raise _build.KernelBuildError("compile error (test)")

    monkeypatch.setattr(kernels, "build_library", broken)
    with pytest.raises(RuntimeError, match="require"):
        kernels.status()


def test_status_without_loading(monkeypatch: pytest.MonkeyPatch, fresh_load) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    st = kernels.status(load=False)
    assert not st.loaded and st.reason == "not loaded yet"


def test_build_reports_a_missing_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(_build.KernelBuildError, match="no C\\+\\+ compiler"):
        _build.build_library()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(_build.KernelBuildError, match="cannot run"):
        _build.build_library()


def test_build_reports_a_compile_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if _build.find_compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    empty = tmp_path / "empty.cpp"  # the other sources: nothing to compile, so the error comes fast
    empty.write_text("")
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "SOURCE", bad)
    for name in ("KMEANS_SOURCE", "FIT_SOURCE", "KMEANS_DP_SOURCE", "CHECK_SOURCE", "RANGES_SOURCE"):
        monkeypatch.setattr(_build, name, empty)
    with pytest.raises(_build.KernelBuildError, match="compiling the kernels failed"):
        _build.build_library()
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-written is left


def test_missing_source_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_build, "SOURCE", tmp_path / "missing.cpp")
    with pytest.raises(_build.KernelBuildError, match="missing"):
        _build.build_library()


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path / "a"))
    assert _build.cache_dir() == tmp_path / "a" / "kernels"
    monkeypatch.delenv(_build.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_dir() == tmp_path / "xdg" / "optimum-splitquant" / "kernels"


@pytest.mark.slow
def test_fresh_build_is_cached_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A first build on an empty cache (about a minute), then the same file without compiling again."""
    if _build.find_compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path))
    first = _build.build_library()
    assert first.is_file() and first.parent == tmp_path / "kernels"
    stamp = first.stat().st_mtime_ns
    assert _build.build_library() == first and first.stat().st_mtime_ns == stamp
