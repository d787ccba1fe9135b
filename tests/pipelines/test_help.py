"""``isa STAGE --help`` as a user reads it: every option of every stage shows its default."""

from __future__ import annotations

import re

import pytest

from isa.config import Config
from pipelines.cli import STAGES, stage_module
from pipelines.cli import main as isa

ENTRY = re.compile(r"^  (-\S|[^\s-])", re.M)  # an entry of the options / arguments listing starts here


def _entries(text: str) -> dict[str, str]:
    """Each listed option or positional (its first name) -> its whole entry, whitespace collapsed."""
    starts = [m.start() for m in ENTRY.finditer(text)] + [len(text)]
    entries = {}
    for start, end in zip(starts, starts[1:]):
        entry = " ".join(text[start:end].split())
        entries[entry.split()[0].rstrip(",")] = entry
    return entries


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_option_of_every_stage_shows_its_default(stage, capsys):
    with pytest.raises(SystemExit) as done:
        isa([stage, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    entries = _entries(text[text.index("\n\n") :])  # past the usage lines
    parser = stage_module(stage).parser()
    for action in parser._actions:
        name = action.option_strings[0] if action.option_strings else action.metavar or action.dest
        if name in ("-h", "--help") or action.required or (not action.option_strings and action.nargs != "?"):
            continue  # nothing to default: --help, required options and positionals, the overrides list
        entry = entries[name]
        assert re.search(r"\(default[: ]", entry), f"isa {stage} --help: {entry!r}"
        key = re.search(r"\((\w+)\.(\w+)\)", entry)
        if key and action.default is None and action.nargs != 0:  # a config key's option: the config's default
            value = getattr(getattr(Config(), key.group(1)), key.group(2))
            shown = (
                "none"
                if value in (None, "", ())
                else ",".join(map(str, value))
                if isinstance(value, tuple)
                else str(value)
            )
            # the config's default, or where the stage takes the value from saved work, "..., else DEFAULT"
            assert f"(default: {shown})" in entry or re.search(
                rf"\(default: [^)]*, else {re.escape(shown)}\)", entry
            ), entry
        elif action.nargs == 0 and isinstance(action.const, bool):  # a switch
            assert "(default: off)" in entry or "(default: on)" in entry, entry
        assert "(default: None)" not in entry and entry.count("(default") == 1, entry


def test_defaults_shown_are_the_values_a_run_gets(capsys):
    """Spot checks against the code that uses them: a config key, a stage's own option, a switch."""
    with pytest.raises(SystemExit):
        isa(["eval", "--help"])
    entries = _entries(capsys.readouterr().out)
    assert f"(default: {Config().eval.split})" in entries["--split"] and "(eval.split)" in entries["--split"]
    assert "(default: off)" in entries["--no-baselines"]
    with pytest.raises(SystemExit):
        isa(["world", "--help"])
    entries = _entries(capsys.readouterr().out)
    assert "(default: 600)" in entries["--num-images"]
    assert stage_module("world").parser().parse_args(["out"]).num_images == 600
