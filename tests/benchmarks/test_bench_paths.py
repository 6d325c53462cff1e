"""The quality benchmark's code paths on tiny random models and tiny slices of the real data.

Every task (embedding cosine, SMS accuracy, BBC News probe, perplexity) and every method kind
(FP32, plain, optimum-quanto, split + quanto, SplitQuant, HQQ) runs once with ``--quick``; the real
models are replaced by tiny random ones through the path options (no SmolLM download or conversion).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from benchmarks import bench_quality, methods, output
from optimum_splitquant.cli.data import minilm_path

pytest.importorskip("optimum.quanto")
pytest.importorskip("matplotlib")
pytest.importorskip("hqq")


def _bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        **kwargs,
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    llama = LlamaConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    made = {
        "minilm": BertModel(_bert_config()),
        "classifier": BertForSequenceClassification(_bert_config(num_labels=2)),
        "smollm": LlamaForCausalLM(llama),
    }
    out = {}
    for name, model in made.items():
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def quick_run(tiny_models, tmp_path_factory) -> tuple[int, Path]:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("results")
    argv = ["--quick", "--out", str(out)] + [f"--{k}={v}" for k, v in tiny_models.items()]
    return bench_quality.main(argv), out


def test_quick_run_writes_json_markdown_and_png(quick_run):
    status, out = quick_run
    assert status == 0
    result = json.loads((out / "quality.json").read_text())
    assert result["quick"] and result["machine"]["cores"] >= 1
    assert result["machine"]["versions"]["torch"] == torch.__version__
    assert [t["task"] for t in result["tasks"]] == [
        "minilm-embedding-cosine",
        "sms-spam-accuracy",
        "bbc-news-probe",
        "smollm2-perplexity",
    ]
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "quality.md").read_text()
    assert "| method | mean cosine to FP32 | bits/weight | size MB | quantize s | forward vs FP32 |" in md
    assert "| method | perplexity |" in md and result["machine"]["cpu"] in md


def test_every_method_ran_and_is_accounted_honestly(quick_run):
    result = json.loads((quick_run[1] / "quality.json").read_text())
    for task in result["tasks"]:
        rows = {r["method"]: r for r in task["rows"]}
        assert set(rows) == {m.name for m in methods.quick_methods()}
        assert not [r["error"] for r in rows.values() if r.get("error")]
        assert rows["FP32"]["effective_bits"] == 32 and rows["FP32"]["forward_ratio"] == 1.0
        # 2-bit codes + per-row ranges < 2-bit codes + 2-bit ids + per-cluster ranges < quanto int4 on 3 branches
        plain, split = rows["plain INT2 (k=1)"]["effective_bits"], rows["SplitQuant INT2 (k=3)"]["effective_bits"]
        assert 2 < plain < split < rows["split + quanto qint4"]["effective_bits"]
        assert 4 < rows["quanto qint4"]["effective_bits"] < 8
        assert (
            rows["quanto qint4"]["size_kind"] == "in memory"
            and rows["SplitQuant INT2 (k=3)"]["size_kind"] == "safetensors"
        )
        # HQQ: packed 4-bit codes and a float16 scale and zero per group of 64, counted from the layers.
        hqq = rows["HQQ 4-bit g64"]
        assert hqq["effective_bits"] == pytest.approx(4.5) and hqq["nominal_bits"] == pytest.approx(4.5)
        assert hqq["size_kind"] == "in memory" and hqq["kind"] == "hqq"
        for r in rows.values():
            assert r["value"] is not None and r["forward_ratio"] > 0 and r["size_bytes"] > 0


def test_quanto_bits_count_codes_and_scales():
    from optimum.quanto import freeze, qint4, quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    quantize(model, weights=qint4, exclude=["2"])
    freeze(model)
    # 4-bit codes, plus a float32 scale and shift per group of 128 weights: 4 + 64 / 128 bits.
    assert methods._quanto_bits(model, 256 * 64) == pytest.approx(4.5)
    # In memory: codes, scales and shifts, the float bias, quanto's two scalar activation scales, the float head.
    assert methods._model_bytes(model) == 256 * 64 // 2 + 2 * 4 * 128 + 64 * 4 + 2 * 4 + (64 * 2 + 2) * 4


def test_method_list_covers_the_comparison():
    names = [m.name for m in methods.all_methods()]
    assert names[0] == "FP32"
    for bits in (2, 3, 4, 8):
        assert f"plain INT{bits} (k=1)" in names and f"SplitQuant INT{bits} (k=3)" in names
    for bits in (2, 4, 8):
        assert f"quanto qint{bits}" in names and f"split + quanto qint{bits}" in names
    assert "SplitQuant INT2 (k=4)" in names
    extras = methods.extra_methods()
    assert {m.group_size for m in extras} == {128, 64} and {m.group_size for m in methods.all_methods()} == {None}
    everything = list(methods._universe().values())  # every set; a name means one method everywhere
    assert len({m.slug for m in everything}) == len({m.name for m in everything}) == len(everything)
    assert methods.select_methods("default") == methods.all_methods()
    assert [m.name for m in methods.select_methods("FP32,HQQ 4*,FP32")] == ["FP32"] + [
        f"HQQ 4-bit g{g}" for g in (128, 64, 32, 16)
    ]


def test_hqq_on_a_tiny_bert_reports_stored_bits_and_stays_close(tmp_path):
    from hqq.core.quantize import HQQLinear

    torch.manual_seed(0)
    fp32 = BertModel(_bert_config()).eval()
    ids = torch.randint(0, 1000, (2, 7))

    def load():
        model = BertModel(_bert_config()).eval()
        model.load_state_dict(fp32.state_dict())
        return model

    with torch.no_grad():
        ref = fp32(input_ids=ids).last_hidden_state
        for bits, group in ((2, 16), (4, 32), (4, 128), (3, 64)):
            # 128 does not divide the width 64: HQQ groups the flattened weights (groups straddle two rows)
            method = methods.Method(f"HQQ {bits}-bit g{group}", "HQQ", "hqq", bits, 1, group)
            assert methods.unsupported(method, fp32) is None
            applied = methods.apply_method(method, load, tmp_path)
            layers = [m for m in applied.model.modules() if isinstance(m, HQQLinear)]
            assert len(layers) == 6 and all(m.meta["scale"].dtype == torch.float16 for m in layers)
            assert applied.nominal_bits == pytest.approx(bits + 32 / group)
            if bits == 3:  # ten 3-bit codes per int32 (3.2 bits), the group count padded to a multiple of 10
                numels = [m.meta["shape"].numel() for m in layers]
                stored = sum(32 * group * math.ceil(n / group / 10) + 32 * n / group for n in numels)
                assert applied.effective_bits == pytest.approx(stored / sum(numels))
                assert applied.effective_bits > 3.2 + 32 / group
            else:
                assert applied.effective_bits == pytest.approx(bits + 32 / group)
            out = applied.model(input_ids=ids).last_hidden_state  # HQQLinear.forward on (batch, seq, in) float32
            assert out.dtype == torch.float32 and out.shape == ref.shape
            cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
            assert cosine > (0.9 if bits == 2 else 0.98)


def test_a_group_size_that_does_not_divide_a_width_is_na_not_a_crash(tiny_models, tmp_path):
    grid = [m for m in methods.frontier_methods() if m.kind == "splitquant" and m.group_size == 128][:1]
    names = ["FP32", "SplitQuant INT3 k=2 g192 mse", grid[0].name, "SplitQuant INT2 k=2 mse"]
    argv = ["--quick", "--tasks", "minilm", "--methods", ",".join(names), "--out", str(tmp_path), "--name", "f"]
    assert bench_quality.main([*argv, f"--minilm={tiny_models['minilm']}"]) == 0  # n/a is not a failure
    rows = {r["method"]: r for r in json.loads((tmp_path / "f.json").read_text())["tasks"][0]["rows"]}
    assert "does not divide the input width 64" in rows["SplitQuant INT3 k=2 g192 mse"]["na"]
    assert "does not divide the input width 64" in rows[grid[0].name]["na"]
    assert rows["SplitQuant INT2 k=2 mse"]["value"] > 0.5 and rows["SplitQuant INT2 k=2 mse"]["fit"] == "mse"
    md = (tmp_path / "f.md").read_text()
    assert "| SplitQuant INT3 k=2 g192 mse | n/a: group_size=192 does not divide the input width 64" in md
    assert "## Best at a bits-per-weight budget" in md


def test_markdown_shows_a_failed_method():
    result = {
        "machine": output.machine_info(),
        "command": "python benchmarks/bench_quality.py",
        "tasks": [
            {
                "task": "t",
                "metric": "accuracy",
                "model": "m",
                "data": "d",
                "rows": [{"method": "quanto qint2", "error": "RuntimeError: boom"}],
            }
        ],
    }
    assert "| quanto qint2 | error: RuntimeError: boom | | | | |" in output.markdown(result)


def test_unknown_task_or_method_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown task"):
        bench_quality.main(["--quick", "--tasks", "imagenet", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown method"):
        bench_quality.main(["--quick", "--methods", "GPTQ", "--out", str(tmp_path)])


def test_classifier_tasks_keep_labels_and_predictions_that_give_their_accuracy(quick_run):
    result = json.loads((quick_run[1] / "quality.json").read_text())
    tasks = {t["task"]: t for t in result["tasks"]}
    assert "labels" not in tasks["minilm-embedding-cosine"] and "labels" not in tasks["smollm2-perplexity"]
    for name in ("sms-spam-accuracy", "bbc-news-probe"):
        labels = tasks[name]["labels"]
        assert labels and set(labels) <= set("01234")
        for row in tasks[name]["rows"]:
            right = sum(p == t for p, t in zip(row["predictions"], labels, strict=True))
            assert row["value"] == pytest.approx(right / len(labels)), row["method"]
    assert set(result["for_budget"]) == {f"{b:g}" for b in output.BUDGETS}
    assert "paired" in result
