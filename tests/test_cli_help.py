"""`batchproxy --help` and the README say the same, and the flags every command shares work
on either side of the subcommand's name."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from batchproxy.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
SUBCOMMANDS = ("serve", "replica", "bench", "simulate")


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def readme_flags() -> dict[str, tuple[str, str]]:
    """The README's `batchproxy serve` table: flag -> (default, meaning)."""
    text = README.read_text()
    table = text.split("## Flags of `batchproxy serve`", 1)[1].split("\n\n", 2)[1]
    rows: dict[str, tuple[str, str]] = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for flag in re.findall(r"`(--\w+)", cells[0]):
            rows[flag] = (cells[1], cells[2])
    return rows


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "")).strip()


def help_default(action: argparse.Action) -> str | None:
    """What the help text says the default is, "(default X)", with %(default)s filled in."""
    text = (action.help or "") % {"default": action.default}
    found = re.search(r"\(default (.+?)\)(?:[;,.]|$)", text) or re.search(
        r"\(default (.+)\)", text)
    return normalized(found.group(1)) if found else None


def same_default(said: str, documented: str) -> bool:
    """"30.0" is "30"; "0: off" is "0 (off)"; otherwise the README's words hold the help's."""
    said, documented = re.split("[:;]", normalized(said))[0], normalized(documented)
    try:
        return float(said) == float(documented.split()[0])
    except ValueError:
        return said in documented


def test_every_documented_flag_exists_with_the_documented_default() -> None:
    actions = {option: action for action in serve_parser()._actions
               for option in action.option_strings}
    rows = readme_flags()
    assert len(rows) > 20
    for flag, (default, _) in rows.items():
        assert flag in actions, f"README documents {flag}, which serve does not take"
        said = help_default(actions[flag])
        if said is not None:
            assert same_default(said, default), (
                f"{flag}: --help says default {said!r}, README says {default!r}")


def test_max_enqueued_rows_default_is_the_same_in_help_and_readme() -> None:
    action = next(a for a in serve_parser()._actions if "--max_enqueued_rows" in a.option_strings)
    documented = normalized(readme_flags()["--max_enqueued_rows"][0])
    assert normalized((action.help or "").split("(default ", 1)[1]).rstrip(")") == documented
    assert "max_enqueued_batches" in documented


def test_monitoring_port_names_what_it_serves_in_help_and_readme() -> None:
    action = next(a for a in serve_parser()._actions if "--monitoring_port" in a.option_strings)
    meaning = readme_flags()["--monitoring_port"][1]
    for path in ("/metrics", "/healthz", "/readyz"):
        assert path in (action.help or ""), path
        assert path in meaning, path


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_log_flags_before_the_subcommand(command: str) -> None:
    args = build_parser().parse_args(["--log_level", "DEBUG", "--log_format", "json",
                                      command])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_log_flags_after_the_subcommand(command: str) -> None:
    args = build_parser().parse_args([command, "--log_level", "DEBUG", "--log_format", "json"])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_log_flags_default_without_either(command: str) -> None:
    args = build_parser().parse_args([command])
    assert (args.log_level, args.log_format, args.no_uvloop) == ("INFO", "text", False)


def test_no_uvloop_on_either_side() -> None:
    assert build_parser().parse_args(["--no_uvloop", "serve"]).no_uvloop
    assert build_parser().parse_args(["serve", "--no_uvloop"]).no_uvloop


def test_readme_documents_log_level() -> None:
    assert "--log_level" in readme_flags()
