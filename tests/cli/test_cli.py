"""The ``optimum-splitquant`` command line end to end on tiny random BERT models, and the default demo job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from huggingface_hub import ModelCard, constants
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
)

from optimum_splitquant import SplitQuantConfig, SplitQuantLinear, size_report
from optimum_splitquant.cli import commands, demo, output_folder, quantize
from optimum_splitquant.cli.console import CliError
from optimum_splitquant.cli.data import LabeledTexts, minilm_path, sms_spam, split
from optimum_splitquant.cli.models import resolve_task


def _bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **kwargs,
    )


def _save(model: torch.nn.Module, path: Path) -> str:
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return _save(BertModel(_bert_config()), tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = _bert_config(num_labels=2, id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1})
    return _save(BertForSequenceClassification(config), tmp_path_factory.mktemp("tiny-classifier"))


@pytest.fixture(scope="module")
def quantized_dir(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "int2"
    assert commands.main(["quantize", tiny_base, "--bits", "2", "--output", str(out)]) == 0
    return out


def _assert_one_error_line(err: str, expected: str) -> None:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("optimum-splitquant: error: ")
    assert expected in errors[0]
    assert err.rstrip("\n").splitlines()[-1] == errors[0]


# ---- quantize ------------------------------------------------------------------------------------


def test_quantize_writes_model_tokenizer_and_card(quantized_dir, capsys):
    files = {p.name for p in quantized_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"} <= files
    saved = json.loads((quantized_dir / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "splitquant" and saved["bits"] == 2 and saved["num_clusters"] == 3
    model = AutoModel.from_pretrained(quantized_dir)
    layers = [m for m in model.modules() if isinstance(m, SplitQuantLinear)]
    assert len(layers) == 12  # 2 layers x 6 Linear; the pooler (last Linear) stays float
    meta = ModelCard.load(quantized_dir / "README.md").data.to_dict()
    assert meta["tags"] == ["splitquant", "quantized", "int2"]
    assert "base_model" not in meta  # a local folder has no Hub id
    assert meta["splitquant"]["effective_bits_per_weight"] == pytest.approx(size_report(model).effective_bits, abs=1e-4)
    assert meta["splitquant"]["size_bytes_after"] == (quantized_dir / "model.safetensors").stat().st_size


def test_quantize_summary_and_progress(tiny_base, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", tiny_base, "--bits", "4", "--num-clusters", "4", "--group-size", "16", "--output", str(out)]
    assert commands.main(args) == 0
    captured = capsys.readouterr()
    assert "SplitQuant INT4 (k=4)" in captured.out
    assert "effective bits per weight" in captured.out and "smaller" in captured.out
    assert "import optimum_splitquant" in captured.out
    assert "Loading weights" in captured.err and "100%" in captured.err  # quantized as the weights stream in
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (saved["bits"], saved["num_clusters"], saved["group_size"]) == (4, 4, 16)


def test_quantize_with_coded_ranges(tiny_base, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", tiny_base, "--bits", "4", "--num-clusters", "1", "--group-size", "16", "--fit", "mse"]
    assert commands.main([*args, "--range-bits", "6", "--output", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (saved["range_bits"], saved["range_block"], saved["format_version"]) == (6, 8, 3)
    assert "| coded ranges | 6-bit codes, steps shared by 8 ranges |" in (out / "README.md").read_text()


# ---- --budget ----------------------------------------------------------------------------------------


def _resolved(*argv: str) -> SplitQuantConfig:
    return quantize.resolve_config(commands._parser().parse_args(["quantize", "M", "--output", "o", *argv]))


@pytest.mark.parametrize("budget", [3.5, 4.0, 4.25, 4.5, 5.0, 6.0, 7.5])
def test_budget_is_for_budget(budget):
    assert _resolved("--budget", str(budget)) == SplitQuantConfig.for_budget(budget)


def test_budget_replaces_five_flags():
    flags = ["--bits", "4", "--num-clusters", "1", "--group-size", "32", "--fit", "mse", "--range-bits", "7"]
    flags += ["--range-block", "32", "--column-scales"]
    assert _resolved(*flags) == _resolved("--budget", "4.5") == SplitQuantConfig.for_budget(4.5)
    assert _resolved("--budget", "4.5", "--no-column-scales") == SplitQuantConfig.for_budget(4.5, column_scales=False)


def test_bits_alone_keeps_the_config_defaults():
    assert _resolved("--bits", "2") == SplitQuantConfig(bits=2)
    assert _resolved("--bits", "3", "--group-size", "64", "--range-block", "16") == SplitQuantConfig(
        bits=3, group_size=64, range_block=16
    )


def test_budget_settings_override_its_fields():
    assert _resolved("--budget", "4.5", "--range-block", "64") == SplitQuantConfig.for_budget(4.5, range_block=64)
    assert _resolved("--budget", "5", "--clustering", "channel") == SplitQuantConfig.for_budget(5, clustering="channel")


@pytest.mark.parametrize(
    "argv",
    [[], ["--bits", "4", "--budget", "4.5"], ["--budget", "4.5", "--bits", "4"]],
    ids=["neither", "both", "both-reversed"],
)
def test_bits_or_budget_exactly_one(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        commands.main(["quantize", "M", "--output", "o", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: optimum-splitquant quantize")
    assert "--budget" in err.splitlines()[-1] and "--bits" in err.splitlines()[-1], err


def test_quantize_with_a_budget(tiny_base, tmp_path, capsys):
    out = tmp_path / "q"
    assert commands.main(["quantize", tiny_base, "--budget", "4.5", "--range-block", "64", "--output", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = SplitQuantConfig.for_budget(4.5, range_block=64).to_dict()
    assert {k: v for k, v in saved.items() if k != "modules_to_not_convert"} == {
        k: v for k, v in expected.items() if k != "modules_to_not_convert"
    }
    stdout = capsys.readouterr().out
    assert "budget     4.5 bits per weight asked for: SplitQuantConfig.for_budget(4.5, range_block=64)" in stdout
    assert "settings   bits=4, num_clusters=1, group_size=32, clustering='tensor', fit='mse', range_bits=7," in stdout
    card = (out / "README.md").read_text()
    assert "| bits budget asked for | 4.5 stored bits per weight on layers of 512 inputs and outputs" in card
    assert "`SplitQuantConfig.for_budget(4.5, range_block=64)`" in card
    assert "| coded ranges | 7-bit codes, steps shared by 64 ranges |" in card
    assert "| code bits per weight | 4 |" in card and "group of 32 input columns" in card
    block = ModelCard.load(out / "README.md").data.to_dict()["splitquant"]
    assert block["budget_bits_per_weight"] == 4.5 and block["budget_overrides"] == {"range_block": 64}
    assert block["quantization_config"] == saved


def test_quantize_with_bits_has_no_budget_in_the_card(quantized_dir):
    assert "budget" not in (quantized_dir / "README.md").read_text()


def test_quantize_with_evaluate_puts_results_in_the_card(tiny_classifier, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        commands.main(["quantize", tiny_classifier, "--bits", "8", "--output", str(out), "--evaluate", "--limit", "16"])
        == 0
    )
    captured = capsys.readouterr()
    assert "accuracy" in captured.out
    assert "SplitQuant:" in captured.err and "13/13" in captured.err  # bar over the layers (12 + the pooler)
    evaluation = ModelCard.load(out / "README.md").data.to_dict()["splitquant"]["evaluation"]
    assert evaluation[0]["name"] == "accuracy" and evaluation[0]["dataset"].endswith("16 held-out messages")
    assert 0.0 <= evaluation[0]["value"] <= 1.0 and "base_value" in evaluation[0]
    assert ModelCard.load(out / "README.md").data.to_dict()["pipeline_tag"] == "text-classification"


def test_task_is_inferred_from_the_architecture():
    assert resolve_task(BertConfig(architectures=["BertModel"])) == "feature-extraction"
    assert resolve_task(BertConfig(architectures=["BertForSequenceClassification"])) == "text-classification"
    assert resolve_task(BertConfig(architectures=["LlamaForCausalLM"])) == "text-generation"
    assert resolve_task(BertConfig(architectures=["GPT2LMHeadModel"])) == "text-generation"
    assert resolve_task(BertConfig(architectures=["BertForMaskedLM"]), "feature-extraction") == "feature-extraction"
    with pytest.raises(CliError, match="pass --task"):
        resolve_task(BertConfig(architectures=["BertForMaskedLM"]))


# ---- evaluate ------------------------------------------------------------------------------------


def test_evaluate_embedding_cosine_against_the_base(quantized_dir, tiny_base, capsys):
    assert commands.main(["evaluate", str(quantized_dir), "--base", tiny_base, "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "SplitQuant INT2 (k=3)" in out
    row = next(line for line in out.splitlines() if line.startswith("mean cosine to float embeddings"))
    assert 0.5 < float(row.split()[-2]) <= 1.0 and row.split()[-1] == "1.0000"


def test_evaluate_without_a_known_base_says_so(quantized_dir, capsys):
    assert commands.main(["evaluate", str(quantized_dir)]) == 0
    captured = capsys.readouterr()
    assert "no metric computed" in captured.out and "--base" in captured.err


def test_evaluate_a_float_classifier(tiny_classifier, capsys):
    assert commands.main(["evaluate", tiny_classifier, "--limit", "16"]) == 0
    out = capsys.readouterr().out
    assert "float" in out.splitlines()[0]
    assert any(line.startswith("accuracy") and "16 held-out messages" in line for line in out.splitlines())


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["quantize", "/no/such/model", "--bits", "2"], "model path '/no/such/model' does not exist"),
        (["quantize", "nobody/unknown-model", "--bits", "2"], "offline mode (HF_HUB_OFFLINE=1)"),
        (["quantize", "{base}", "--bits", "9"], "bits must be one of (2, 3, 4, 5, 6, 7, 8), got 9"),
        (["quantize", "{base}", "--bits", "2", "--num-clusters", "17"], "num_clusters must be an integer in [1, 16]"),
        (["quantize", "{base}", "--bits", "2", "--clustering", "rows"], "clustering must be one of"),
        (["quantize", "{base}", "--bits", "2", "--group-size", "7"], "group_size=7 does not divide"),
        (["quantize", "{base}", "--bits", "2", "--range-bits", "6"], "range_bits=6 needs fit='mse'"),
        (["quantize", "{base}", "--budget", "3"], "--budget 3.0: no SplitQuant configuration fits in 3.0 bits"),
        (["quantize", "{base}", "--budget", "nan"], "--budget nan: bits_per_weight must be finite"),
        (["quantize", "{base}", "--budget", "4.5", "--fit", "minmax"], "range_bits=7 needs fit='mse'"),
        (
            ["quantize", "{base}", "--budget", "4.5", "--group-size", "16"],
            "--budget 4.5 with --group-size 16 stores 4.969 bits per weight (layers of 512 inputs and outputs), over the "
            "budget",
        ),
        (["quantize", "{quantized}", "--bits", "2"], "is already quantized"),
        (["quantize", "{base}", "--bits", "2", "--push-to-hub", "me/x"], "cannot push: offline mode is on"),
        (["evaluate", "/no/such/model"], "does not exist"),
    ],
    ids=[
        "missing-path",
        "offline-hub-id",
        "bits-5",
        "clusters-17",
        "clustering",
        "group-size",
        "range-bits-minmax",
        "budget-too-small",
        "budget-nan",
        "budget-override-invalid",
        "budget-override-over",
        "requantize",
        "push-offline",
        "evaluate-missing",
    ],
)
def test_user_errors_end_with_one_line(args, expected, tiny_base, quantized_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = [a.format(base=tiny_base, quantized=quantized_dir) for a in args]
    if argv[0] == "quantize":
        argv += ["--output", str(tmp_path / "out")]
    assert commands.main(argv) == 1
    _assert_one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unwritable_output_dir(tiny_base, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert commands.main(["quantize", tiny_base, "--bits", "2", "--output", str(blocker / "out")]) == 1
    _assert_one_error_line(capsys.readouterr().err, "cannot write to output directory")
    assert commands.main(["quantize", tiny_base, "--bits", "2", "--output", str(blocker)]) == 1
    _assert_one_error_line(capsys.readouterr().err, "exists and is not a directory")


def test_push_without_a_token(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(quantize, "get_token", lambda: None)
    argv = ["quantize", tiny_base, "--bits", "2", "--output", str(tmp_path / "o"), "--push-to-hub", "me/x"]
    assert commands.main(argv) == 1
    _assert_one_error_line(capsys.readouterr().err, "no Hugging Face token")


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(CliError, match="does not exist"):
        commands.main(["quantize", "/no/such/model", "--bits", "2", "--output", str(tmp_path / "o"), "--verbose"])


@pytest.mark.slow  # a fresh process (~9 s); the in-process tests above check the same messages
def test_error_in_a_fresh_process_has_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "optimum_splitquant.cli", "quantize", str(tmp_path / "missing"), "--bits", "2"]
    proc = subprocess.run([*cmd, "--output", str(tmp_path / "o")], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"optimum-splitquant: error: model path '{tmp_path / 'missing'}' does not exist"
    ]


# ---- push to the Hub (faked offline) ---------------------------------------------------------------


class _FakeHub:
    """Stands in for huggingface_hub.HfApi: records the repository and the uploaded files."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.repos: list[tuple[str, bool]] = []
        self.files: dict[str, bytes] = {}
        self.commits = 0

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.repos.append((repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message="", **kwargs):
        if self.fail:
            raise OSError("503 Service Unavailable\nretry later")
        self.commits += 1
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                self.files[str(path.relative_to(folder_path))] = path.read_bytes()


@pytest.fixture
def fake_hub(monkeypatch):
    hub = _FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(quantize, "get_token", lambda: "hf_fake_token")
    monkeypatch.setattr(quantize, "_hub_api", lambda: hub)
    return hub


def test_push_uploads_model_tokenizer_and_card_in_one_commit(fake_hub, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "q"
    argv = [
        "quantize",
        tiny_classifier,
        "--bits",
        "2",
        "--output",
        str(out),
        "--push-to-hub",
        "me/tiny-int2",
        "--private",
    ]
    assert commands.main(argv) == 0
    assert "https://huggingface.co/me/tiny-int2" in capsys.readouterr().out
    assert fake_hub.repos == [("me/tiny-int2", True)] and fake_hub.commits == 1
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(fake_hub.files)
    assert 'from_pretrained("me/tiny-int2")' in fake_hub.files["README.md"].decode()
    downloaded = tmp_path / "downloaded"
    for rel, content in fake_hub.files.items():
        (downloaded / rel).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / rel).write_bytes(content)
    tokenizer = AutoTokenizer.from_pretrained(downloaded)
    inputs = tokenizer(["win a free prize now", "see you at lunch"], return_tensors="pt", padding=True)
    with torch.no_grad():
        remote = AutoModelForSequenceClassification.from_pretrained(downloaded)(**inputs).logits
        local = AutoModelForSequenceClassification.from_pretrained(out)(**inputs).logits
    assert torch.equal(remote, local)


def test_failed_push_keeps_the_saved_model(fake_hub, tiny_base, tmp_path, capsys):
    fake_hub.fail = True
    out = tmp_path / "q"
    assert commands.main(["quantize", tiny_base, "--bits", "2", "--output", str(out), "--push-to-hub", "me/x"]) == 1
    _assert_one_error_line(capsys.readouterr().err, "push to 'me/x' failed (503 Service Unavailable retry later)")
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


# ---- the default job (demo) --------------------------------------------------------------------------


def test_no_arguments_runs_the_demo(monkeypatch, tmp_path, capsys):
    rows = [
        demo.DemoRow("FP32", 0.98, 121, None, 43.1, 90.9, None, tmp_path / "fp32"),
        demo.DemoRow("SplitQuant INT2 (k=3)", 0.935, 122, 4.19, 5.6, 53.5, 12.0, tmp_path / "sms-spam-minilm-int2-k3"),
    ]
    result = demo.DemoResult(rows, 1000, 132, tmp_path / "fp32", built=False, build_s=80.0, total_s=40.0)
    calls = []

    def fake_run(**kwargs):
        calls.append(kwargs)
        return result

    monkeypatch.setattr(commands.demo, "run", fake_run)
    assert commands.main([]) == 0
    out = capsys.readouterr().out
    assert "1000 held-out real SMS (868 ham / 132 spam)" in out
    assert "SplitQuant INT2 (k=3)" in out and "93.5%" in out and "122/132" in out and "4.190" in out
    assert "always answering 'ham' scores 86.8%" in out and "(cached" in out
    assert commands.main(["demo", "--fresh"]) == 0
    assert calls == [{"fresh": False, "rebuild": False}, {"fresh": True, "rebuild": False}]


def test_train_head_learns_a_separable_problem():
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long().tolist()
    pooler = torch.nn.Linear(8, 8)
    dense, classifier = demo.train_head(x, y, pooler, steps=300, lr=1e-2, dropout=0.0)
    with torch.no_grad():
        pred = classifier(torch.tanh(dense(x))).argmax(-1)
    assert (pred == torch.tensor(y)).float().mean() > 0.97
    assert not torch.equal(dense.weight, pooler.weight), "the pooler is trained on a copy"


@pytest.fixture(scope="module")
def few_sms() -> LabeledTexts:
    return split(sms_spam(), 80, seed=3)[1]  # 80 real messages, about 11 spam


def test_demo_runs_and_caches_on_tiny_inputs(tiny_base, few_sms, tmp_path):
    variants = (("SplitQuant INT2 (k=3)", "int2-k3", {"bits": 2, "num_clusters": 3}),)
    kwargs = {"encoder_path": tiny_base, "data": few_sms, "n_test": 20, "head_steps": 5, "variants": variants}
    first = demo.run(tmp_path, **kwargs)
    assert first.built and first.n_test == 20 and first.n_spam in (2, 3)
    assert [r.name for r in first.rows] == ["FP32", "SplitQuant INT2 (k=3)"]
    fp32, int2 = first.rows
    assert fp32.effective_bits is None and 4.0 < int2.effective_bits < 32
    assert int2.layers_mb < fp32.layers_mb and int2.file_mb < fp32.file_mb
    assert json.loads((int2.path / "config.json").read_text())["quantization_config"]["bits"] == 2
    assert (int2.path / "tokenizer.json").is_file()
    meta = json.loads((first.classifier_dir / demo.METADATA_FILE).read_text())
    assert meta["n_test"] == 20 and meta["fp32_accuracy"] == fp32.accuracy
    assert not int2.cached
    second = demo.run(tmp_path, **kwargs)
    assert not second.built and second.rows[1].cached
    assert second.rows[1].quantize_s == int2.quantize_s  # the first run's measurement
    assert [(r.name, r.accuracy, r.spam_caught) for r in second.rows] == [
        (r.name, r.accuracy, r.spam_caught) for r in first.rows
    ]
    assert "measured when first quantized" in demo.format_report(second)
    again = demo.run(tmp_path, **kwargs, fresh=True)
    assert not again.built and not again.rows[1].cached
    assert demo.run(tmp_path, **{**kwargs, "head_steps": 6, "variants": ()}).built  # other recipe: rebuilt
    text = demo.format_report(second)
    assert "20 held-out real SMS" in text and "SplitQuant INT2 (k=3)" in text


def test_demo_classifier_is_a_normal_transformers_folder(tiny_base, few_sms, tmp_path):
    folder, meta, built = demo.ensure_classifier(
        tmp_path, encoder_path=tiny_base, data=few_sms, n_test=20, head_steps=2
    )
    assert built and meta["train_messages"] == 60
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.id2label == {0: "ham", 1: "spam"}
    base = BertModel.from_pretrained(tiny_base)
    torch.testing.assert_close(
        model.bert.encoder.layer[0].output.dense.weight, base.encoder.layer[0].output.dense.weight
    )
    assert not torch.equal(model.bert.pooler.dense.weight, base.pooler.dense.weight), "the pooler was trained"


def test_demo_refuses_an_encoder_without_pooler(tmp_path, few_sms):
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    path = _save(DistilBertModel(config), tmp_path / "no-pooler")
    with pytest.raises(ValueError, match="pooler"):
        demo.ensure_classifier(tmp_path / "cache", encoder_path=path, data=few_sms, n_test=20, head_steps=1)


@pytest.mark.slow
def test_demo_full_run(tmp_path):
    """The real job: MiniLM + 4,862 SMS, FP32 vs plain INT2 vs SplitQuant INT2 (a few minutes)."""
    result = demo.run(tmp_path)
    acc = {r.name: r.accuracy for r in result.rows}
    assert acc["FP32"] >= 0.97
    assert acc["plain INT2 (k=1)"] < acc["SplitQuant INT2 (k=3)"] <= acc["FP32"] + 0.01
    assert acc["SplitQuant INT2 (k=4)"] >= acc["SplitQuant INT2 (k=3)"] - 0.01


# ---- output folder checks --------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the output folder was checked")


@pytest.mark.parametrize("output", ["", "   "], ids=["empty", "blank"])
def test_quantize_refuses_an_empty_output(output, tiny_base, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "README.md").write_text("# my project\n")
    (work / "config.json").write_text('{"mine": true}\n')
    before = _snapshot(work)
    monkeypatch.chdir(work)
    monkeypatch.setattr(quantize, "load_config", _must_not_load)
    assert commands.main(["quantize", tiny_base, "--bits", "2", "--output", output]) == 1
    _assert_one_error_line(capsys.readouterr().err, "--output is empty (an unset shell variable?)")
    assert _snapshot(work) == before


@pytest.mark.parametrize("spelling", ["same", "trailing-slash", "dotdot", "symlink"])
def test_quantize_refuses_the_input_folder_as_output(spelling, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = Path(_save(BertModel(_bert_config()), tmp_path / "model"))
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    before = _snapshot(model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(quantize, "load_config", _must_not_load)
    output = {
        "same": str(model),
        "trailing-slash": f"{model}/",
        "dotdot": "./model/../model",
        "symlink": str(tmp_path / "link"),
    }[spelling]
    assert commands.main(["quantize", str(model), "--bits", "2", "--output", output]) == 1
    _assert_one_error_line(capsys.readouterr().err, "is the input model's folder")
    assert _snapshot(model) == before


def test_quantize_output_check_allows_other_folders(tiny_base, tmp_path):
    # A new folder, a sub-folder of the model, or a Hub id that merely looks like a path: all fine.
    assert output_folder.check_output(str(tmp_path / "out"), tiny_base) == tmp_path / "out"
    assert output_folder.check_output(str(Path(tiny_base) / "int2"), tiny_base) == Path(tiny_base) / "int2"
    hub_like = output_folder.check_output("nobody/unknown-model", "nobody/unknown-model")
    assert hub_like == Path.cwd() / "nobody" / "unknown-model"  # made absolute: `--output .` must name a real folder


def test_a_folder_without_tokenizer_files_has_no_tokenizer(tiny_base, tmp_path, caplog):
    from optimum_splitquant.cli.models import load_tokenizer

    assert load_tokenizer(tiny_base) is not None
    bare = tmp_path / "bare"
    BertModel(_bert_config()).save_pretrained(bare)  # config and weights, no tokenizer file
    with caplog.at_level("WARNING"):
        assert load_tokenizer(str(bare)) is None  # AutoTokenizer would build an empty tokenizer here
    assert "holds no tokenizer file" in caplog.text
