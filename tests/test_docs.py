"""README.md and docs/ stay short and true: every command in their code blocks parses with the real
parser (commands that need a hub model or a GPU are parsed, not run; the README's own two commands are
what CI runs), every option of every command is in docs/CLI.md's table for it, and every local link
and image exists."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from dit_accel.bench.options import build_parser as bench_parser
from dit_accel.cli import build_parser
from dit_accel.ui import build_parser as ui_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
MAX_README_LINES = 200


def _commands(text: str) -> list[list[str]]:
    """Every `dit-accel ...` and `... -m dit_accel.bench ...` line of the text's bash blocks, continuation
    lines joined, as the argument list after the command name."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word == "dit-accel":
                    found.append(words[i + 1:])
                elif word == "-m" and words[i + 1:i + 2] == ["dit_accel.bench"]:
                    found.append(["bench", *words[i + 2:]])
    return found


def _parse(words: list[str]) -> None:
    command, rest = words[0], [w for w in words[1:] if w != "--"]
    parser = {"bench": bench_parser, "ui": ui_parser}.get(command)
    if parser is None:
        build_parser().parse_args(words)
    else:
        parser().parse_args(rest)


def test_readme_is_short_and_shows_the_plot():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    assert re.search(r"!\[[^\]]*\]\([^)]*pareto[^)]*\.png\)", text), "the README shows the Pareto plot"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_parses(doc, capsys):
    for words in _commands(doc.read_text()):
        try:
            _parse(words)
        except SystemExit as exit:
            assert exit.code == 0, f"{doc.name}: `dit-accel {' '.join(words)}` does not parse: {capsys.readouterr().err}"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for option in action.option_strings}


def test_every_option_is_in_the_cli_doc():
    sections = {title: body for title, body in re.findall(r"^## ([\w-]+)\n(.*?)(?=^## |\Z)",
                                                           (ROOT / "docs" / "CLI.md").read_text(), re.S | re.M)}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    parsers = {name: commands[name] for name in ("generate", "calibrate", "finetune", "tune", "gpu-check")}
    parsers |= {"bench": bench_parser(), "ui": ui_parser()}
    for name, parser in parsers.items():
        rows = [line.split(" | ")[0] for line in sections[name].splitlines() if line.startswith("| `--")]
        documented = {option for row in rows for option in re.findall(r"`(--[\w-]+)`", row)}
        assert documented == _options(parser), f"{name}: options table differs from the parser's options"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_exist(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
