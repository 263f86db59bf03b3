"""One vocabulary on the command line: every concept has one visible flag name across all
commands of all packages, and each spelling of the previous release still works (hidden, with
a deprecation line)."""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from astrai_core.cli.aliases import rewrite_flags
from astrai_core.cli.main import app

# concept -> (the one name, the other names it has had or that the ecosystem uses for it).
CONCEPTS = {
    "training strategy": ("--strategy", {"--kind", "--train-type", "--mode"}),
    "random seed": ("--seed", {"--random-seed", "--rng-seed"}),
    "worker processes": ("--num-workers", {"--workers", "--jobs", "--n-workers"}),
    "replace existing output": ("--overwrite", {"--force", "--overwrite-output-dir"}),
    "progress display": ("--progress", {"--progress-bar", "--no-progress-bar"}),
    "device": ("--device", {"--device-type"}),
    "compute/storage dtype": ("--dtype", {"--precision", "--torch-dtype"}),
    "context window": ("--max-seq-len", {"--max-len", "--max-model-len", "--window-size",
                                         "--max-seq-length", "--context-length", "--seq-len"}),
    "tokens to generate": ("--max-tokens", {"--max-new-tokens", "--n-predict"}),
    "output folder": ("--out", {"--output", "--output-dir", "--ckpt-dir", "--save-dir"}),
    "corpus size": ("--corpus-size", {"--size", "--num-records"}),
}
# Prefixes that scope a flag to one part of a command (the rollouts of online RL, the KV cache).
SCOPES = ("--rollout-", "--grpo-", "--dpo-", "--kv-cache-")


def _commands(group: click.Command, path: str = "astrai") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in getattr(group, "commands", {}).items():
        found.append((f"{path} {name}", command))
        found += _commands(command, f"{path} {name}")
    return found


def _visible_flags(command: click.Command) -> set[str]:
    flags = set()
    for param in command.params:
        # By duck type: Typer carries its own copy of click, whose classes are not click's.
        if param.param_type_name == "option" and not param.hidden:
            flags.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return flags


def _unscoped(flag: str) -> str:
    for prefix in SCOPES:
        if flag.startswith(prefix):
            return "--" + flag.removeprefix(prefix)
    return flag


COMMANDS = _commands(typer.main.get_command(app))


def test_the_walk_finds_every_package_s_commands_and_their_flags():
    names = {name for name, _ in COMMANDS}
    flags = {name: _visible_flags(command) for name, command in COMMANDS}
    assert {"--seed", "--strategy", "--max-seq-len"} <= flags["astrai train"]
    assert {"--max-seq-len", "--dtype", "--device"} <= flags["astrai serve"]
    assert {"astrai train", "astrai quickstart", "astrai serve", "astrai generate", "astrai chat",
            "astrai data prepare", "astrai data synth", "astrai data inspect",
            "astrai model init", "astrai model info", "astrai tokenizer train"} <= names


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_no_command_uses_a_second_name_for_a_concept(name, command):
    for flag in _visible_flags(command):
        for concept, (canonical, others) in CONCEPTS.items():
            spelled = {flag, _unscoped(flag), "--" + flag.removeprefix("--no-")}
            assert not spelled & others, (
                f"`{name}` has {flag}, a second name for the {concept}; use {canonical} "
                "(keep the old spelling as a hidden alias: astrai_core.cli.aliases)")


def test_every_deprecated_flag_maps_to_a_visible_flag_of_its_command():
    checked = 0
    for name, command in COMMANDS:
        table = getattr(command, "deprecated_flags", {})
        visible = _visible_flags(command)
        for old, new in table.items():
            assert old not in visible, f"`{name}`: the old {old} still shows in --help"
            assert new in visible, f"`{name}`: {old} maps to {new}, which the command lacks"
            checked += 1
    assert checked >= 12


def test_an_old_flag_still_works_and_prints_a_deprecation_line(tmp_path):
    result = CliRunner().invoke(app, ["model", "init", "--preset", "tiny", "--out", str(tmp_path),
                                      "--force"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "--force is deprecated" in result.output and "use --overwrite" in result.output
    assert (tmp_path / "config.json").is_file()


def test_rewriting_keeps_values_and_stops_at_a_double_dash():
    table = {"--window-size": "--max-seq-len"}
    assert rewrite_flags(["--window-size=8", "--window-size", "4", "--", "--window-size"], table) \
        == ["--max-seq-len=8", "--max-seq-len", "4", "--", "--window-size"]
