"""Every command's --help describes it, documents every option and its default, and points to
docs/config.md rather than to source names; TensorFlow's CPU-only cuInit noise stays off stderr."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def parsers():
    from csearch.cli import build_parser as csearch_parser
    from csearch.evaluate import build_parser as evaluate_parser
    from csearch.train.cli import build_parser as train_parser

    return {"csearch": csearch_parser(), "csearch.evaluate": evaluate_parser(), "csearch.train": train_parser()}


def commands(parser: argparse.ArgumentParser, path=()):
    """(path, parser) of the parser and of every subcommand under it, nested ones included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, (*path, name))


ALL = [(entry, path, parser) for entry, top in parsers().items() for path, parser in commands(top)]
SUBCOMMANDS = [case for case in ALL if case[1]]
IDS = [" ".join((entry, *path)) for entry, path, _ in SUBCOMMANDS]


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def shown(action) -> str:
    return "/".join(action.option_strings) or action.dest


@pytest.mark.parametrize("entry, path, parser", SUBCOMMANDS, ids=IDS)
def test_every_subcommand_has_help_a_description_and_documented_options(entry, path, parser, capsys):
    with pytest.raises(SystemExit) as info:
        parsers()[entry].parse_args([*path, "--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out
    assert (parser.description or "").strip(), f"{' '.join(path)}: no description"
    undocumented = [shown(a) for a in options(parser) if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not undocumented, f"{' '.join(path)}: options without help: {undocumented}"
    hidden_defaults = [
        shown(a)
        for a in options(parser)
        if a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in (a.help or "")
    ]
    assert not hidden_defaults, f"{' '.join(path)}: help does not show the default of {hidden_defaults}"


@pytest.mark.parametrize("module", ["csearch", "csearch.evaluate", "csearch.train"])
def test_help_of_each_entry_point_exits_zero(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and not result.stderr


def class_names() -> set[str]:
    """csearch's own class names with two or more capitalised parts (TrainConfig, IndexStore):
    names a user cannot look up, unlike plain words such as Engine."""
    found = set()
    for path in (REPO / "csearch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and re.fullmatch(r"_?[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+", node.name):
                found.add(node.name.lstrip("_"))
    return found


def help_texts():
    for entry, path, parser in ALL:
        where = " ".join((entry, *path))
        for text in (parser.description, parser.epilog):
            yield where, text or ""
        for action in parser._actions:
            yield f"{where} {shown(action)}", action.help or ""
        for group in parser._action_groups:
            yield f"{where} [{group.title}]", group.description or ""


def test_help_names_no_source_classes_or_modules():
    names = class_names()
    assert "TrainConfig" in names  # the check sees the package's classes
    offenders = []
    for where, text in help_texts():
        words = set(re.findall(r"\b\w+\b", text))
        # a module (csearch.search) or a source file (csearch/train/config.py); `-m csearch.train` is a command
        sources = re.findall(r"(?<![\w/.~-])(?<!-m )csearch(?:\.[a-z_.]+|/[\w/]+\.py)", text)
        if words & names or sources:
            offenders.append(f"{where}: {sorted(words & names) + sources}")
    assert not offenders, "help should point to docs/config.md, not to source names:\n" + "\n".join(offenders)


def test_top_level_help_describes_the_default_pipeline():
    from csearch.cli import build_parser

    parser = build_parser()
    description = parser.description.lower()
    assert "rerank" not in description and "re-rank" not in description  # off by default
    assert "knn" in description and "docs/config.md" in description
    assert "docs/config.md" in parser.epilog


def test_demo_defaults_to_a_temporary_folder():
    from csearch.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.out is None


@pytest.mark.slow
def test_cpu_only_machine_shows_no_cuinit_line(tmp_path):
    """TensorFlow logs "failed call to cuInit" when it looks for a GPU on a machine without one;
    the entry points set its log level before it is imported. Here through a 1-epoch training
    run (TensorFlow, no weights to download)."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed")
    from conftest import write_catalogue

    catalogue = write_catalogue(tmp_path / "catalogue", products=1, images=2, size=(32, 32))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    result = subprocess.run(
        [
            *(sys.executable, "-m", "csearch.train", "classifier", "--data", str(catalogue)),
            *("--out", str(tmp_path / "run"), "--backbone", "mobilenet", "--weights", "none"),
            *("--epochs", "1", "--image-size", "32", "--batch-size", "2", "--set", "val_fraction=0.5"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cuInit" not in result.stderr, result.stderr[-2000:]
