"""Damaged or crafted safetensors header metadata ends in a ``ValueError`` naming the file and the field."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from optimum_splitquant.checkpoint import check_consistency, header_metadata, read_checkpoint_index
from optimum_splitquant.checkpoint.format import FORMAT_VERSION, METADATA_FORMAT_KEY, METADATA_SETTINGS_KEY
from optimum_splitquant.checkpoint.headers import MAX_SETTINGS_CHARS, parse_format_version
from optimum_splitquant.core import QuantSpec
from optimum_splitquant.nn import SplitQuantLinear

SETTINGS = {"bits": 2, "clustering": "tensor", "group_size": None, "num_clusters": 3}
FILE = "model.safetensors"


def _write(tmp_path, **overrides: str):
    """A one-layer SplitQuant checkpoint whose header metadata has ``overrides``; returns its path."""
    tensors = {f"fc.{k}": v.contiguous() for k, v in SplitQuantLinear(8, 4, spec=QuantSpec(2)).state_dict().items()}
    metadata = {**header_metadata(FORMAT_VERSION, SETTINGS), **overrides}
    path = tmp_path / FILE
    save_file(tensors, str(path), metadata=metadata)
    return path


def _check(path) -> None:
    check_consistency(read_checkpoint_index([path]), FORMAT_VERSION, SETTINGS)


def test_intact_header_is_accepted(tmp_path):
    path = _write(tmp_path)
    index = read_checkpoint_index([path])
    assert index.quantized_modules() == {"fc"}
    check_consistency(index, FORMAT_VERSION, SETTINGS)
    assert parse_format_version(str(FORMAT_VERSION), FILE, FORMAT_VERSION) == FORMAT_VERSION


# ---- splitquant_settings ---------------------------------------------------------------------------


def test_deeply_nested_settings_over_the_length_bound(tmp_path):
    path = _write(tmp_path, **{METADATA_SETTINGS_KEY: "[" * 100000 + "]" * 100000})
    with pytest.raises(ValueError, match=rf"{FILE}: header field {METADATA_SETTINGS_KEY} is implausibly long") as exc:
        _check(path)
    assert len(str(exc.value)) < 400


def test_deeply_nested_settings_under_the_length_bound(tmp_path):
    value = "[" * 30000 + "]" * 30000
    assert len(value) <= MAX_SETTINGS_CHARS
    with pytest.raises(RecursionError):  # what an unguarded json.loads does with it
        json.loads(value)
    path = _write(tmp_path, **{METADATA_SETTINGS_KEY: value})
    with pytest.raises(ValueError, match=rf"{FILE}: header field {METADATA_SETTINGS_KEY} is JSON nested too deeply"):
        _check(path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("{bits: 2", "is not valid JSON"), ("[2, 3]", "is a JSON list, not an object"), ("2", "is a JSON int")],
    ids=["invalid", "list", "number"],
)
def test_settings_that_are_not_a_json_object(tmp_path, value, expected):
    path = _write(tmp_path, **{METADATA_SETTINGS_KEY: value})
    with pytest.raises(ValueError, match=rf"{FILE}: header field {METADATA_SETTINGS_KEY} {expected}"):
        _check(path)


def test_settings_from_another_save_still_say_so(tmp_path):
    path = _write(tmp_path, **{METADATA_SETTINGS_KEY: json.dumps({**SETTINGS, "bits": 4})})
    with pytest.raises(ValueError, match=r"config\.json and the weights come from different saves"):
        _check(path)


# ---- splitquant_format_version ---------------------------------------------------------------------

# "01" is refused: header_metadata never writes a leading zero, so one means the header was edited.
DAMAGED_VERSIONS = {
    "zero": "0",
    "negative": "-1",
    "plus-sign": "+1",
    "leading-zero": "01",
    "fullwidth-digit": "\uff11",
    "arabic-indic-digit": "\u0661",
    "superscript": "\u00b9",
    "decimal-point": "1.0",
    "space": " 1",
    "newline": "1\n",
    "empty": "",
    "5000-digits": "9" * 5000,
}


@pytest.mark.parametrize("value", DAMAGED_VERSIONS.values(), ids=DAMAGED_VERSIONS.keys())
def test_damaged_format_version_is_refused(tmp_path, value):
    path = _write(tmp_path, **{METADATA_FORMAT_KEY: value})
    with pytest.raises(
        ValueError, match=rf"{FILE}: header field {METADATA_FORMAT_KEY} is .*not a format version"
    ) as exc:
        _check(path)
    message = str(exc.value)
    assert "save the model again" in message
    assert len(message) < 400  # 5,000 digits are cut, not echoed (nor Python's int-limit message)


def test_newer_format_version_asks_to_upgrade(tmp_path):
    newer = str(FORMAT_VERSION + 1)
    path = _write(tmp_path, **{METADATA_FORMAT_KEY: newer})
    with pytest.raises(ValueError, match=rf"{FILE}: checkpoint format version '{newer}' \(header field .*upgrade"):
        _check(path)


def test_missing_format_version(tmp_path):
    tensors = {f"fc.{k}": v for k, v in SplitQuantLinear(8, 4, spec=QuantSpec(2)).state_dict().items()}
    path = tmp_path / FILE
    save_file(tensors, str(path), metadata={METADATA_SETTINGS_KEY: json.dumps(SETTINGS)})
    with pytest.raises(ValueError, match=rf"{FILE}: header has no {METADATA_FORMAT_KEY}"):
        _check(path)
