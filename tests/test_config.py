"""Typed configs drive the flags: defaults and help written once, --config FILE, explicit flags win."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from refusal_cliff.cli import main
from refusal_cliff.cli.options import config_file_option, config_options, resolve
from refusal_cliff.core.config import GenerationConfig, build_config, config_fields
from refusal_cliff.core.errors import UserError
from refusal_cliff.stages.ablate import AblateConfig
from refusal_cliff.stages.heads import HeadsConfig
from refusal_cliff.stages.select import SelectConfig
from refusal_cliff.stages.trace import TraceConfig


def _command():
    @click.command("trace")
    @config_options(TraceConfig, GenerationConfig)
    @config_file_option
    def command(config_file, **options):
        trace = resolve(TraceConfig, options)
        generation = resolve(GenerationConfig, options)
        click.echo(
            f"{trace.plateau} {trace.batch_size} {generation.max_answer_tokens} {generation.end_template!r}"
        )

    return command


def test_every_config_field_has_help_and_becomes_a_flag():
    for cls in (TraceConfig, GenerationConfig, HeadsConfig, AblateConfig, SelectConfig):
        for field in config_fields(cls):
            assert field.metadata["help"], f"{cls.__name__}.{field.name} has no help"
    text = CliRunner().invoke(_command(), ["--help"]).output
    assert "--plateau [max|mean]" in text and "8-token moving average" in text and "[default: 256" in text


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".toml", 'batch_size = 3\nmax_answer_tokens = 7\n[trace]\nplateau = "mean"\n'),
        (".yaml", "batch-size: 3\nmax_answer_tokens: 7\ntrace:\n  plateau: mean\n"),
    ],
)
def test_flag_overrides_file_overrides_default(tmp_path, suffix, text):
    path = tmp_path / f"settings{suffix}"
    path.write_text(text)
    runner = CliRunner()
    assert runner.invoke(_command(), []).output.split()[:3] == ["max", "8", "96"]
    assert runner.invoke(_command(), ["--config", str(path)]).output.split()[:3] == ["mean", "3", "7"]
    result = runner.invoke(_command(), ["--config", str(path), "--batch-size", "5", "--plateau", "max"])
    assert result.output.split()[:3] == ["max", "5", "7"]
    escaped = runner.invoke(_command(), ["--end-template", "\\n</think>\\n\\n"]).output
    assert "'\\n</think>\\n\\n'" in escaped  # typed escapes become characters


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown TraceConfig settings: bogus"):
        build_config(TraceConfig, {"bogus": 1})
    with pytest.raises(UserError, match="thresholds"):
        build_config(HeadsConfig, {"thresholds": "0,0.5"})
    with pytest.raises(UserError, match="was not measured"):
        build_config(AblateConfig, {"thresholds": "0.01,0.03", "export_threshold": 0.5})
    with pytest.raises(UserError, match="at least 1"):
        build_config(SelectConfig, {"k": "0"})
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = [")
    result = CliRunner().invoke(_command(), ["--config", str(bad)])
    assert result.exit_code == 2 and "cannot be parsed" in result.output


def test_a_value_is_checked_the_same_from_a_flag_a_file_and_the_library(tmp_path):
    """Issue 21: one check per field (its annotation and metadata), whatever the source."""
    runner = CliRunner()
    generate = ["generate", "--prompts", "demo:harmful", "--out", str(tmp_path / "o")]
    flag = runner.invoke(main, [*generate, "--batch-size", "0"])
    assert flag.exit_code == 2 and "--batch-size 0: must be at least 1" in flag.output
    path = tmp_path / "settings.toml"
    path.write_text("batch_size = 0\n")
    from_file = runner.invoke(main, [*generate, "--config", str(path)])
    assert from_file.exit_code == 2
    assert f"{path}: batch_size = 0 (--batch-size): must be at least 1" in from_file.output
    with pytest.raises(UserError, match="--batch-size 0: must be at least 1"):
        TraceConfig(batch_size=0)
    for bad in (float("nan"), float("inf"), "abc"):
        with pytest.raises(UserError, match="--temperature"):
            GenerationConfig(temperature=bad)
    path.write_text('batch_size = "abc"\n')
    assert (
        "batch_size = 'abc' (--batch-size): must be a whole number"
        in runner.invoke(main, [*generate, "--config", str(path)]).output
    )
    assert GenerationConfig(batch_size="3").batch_size == 3  # text that is a number is converted


def test_a_key_the_verb_does_not_use_is_an_error_naming_the_verb(tmp_path):
    path = tmp_path / "settings.toml"
    for text, needles in (
        ("epochs = 3\n", ["`refusal-cliff trace` does not use the setting 'epochs'"]),
        ("bach_size = 3\n", ["'bach_size' (did you mean batch_size?)"]),
        ("[trace]\nlimit = 3\n", ["[trace] 'limit'"]),
    ):
        path.write_text(text)
        result = CliRunner().invoke(_command(), ["--config", str(path)])
        assert result.exit_code == 2, result.output
        assert all(needle in result.output for needle in needles), result.output
    label = ["label", "--generations", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]
    path.write_text("[bogus]\nx = 1\n")
    result = CliRunner().invoke(main, [*label, "--config", str(path)])
    assert "'bogus' (a [bogus] table must name a verb)" in result.output
    path.write_text("only_keywords = false\n[generate]\nmax_thinking_tokens = 3\n")  # another verb's table
    result = CliRunner().invoke(main, [*label, "--config", str(path)])
    assert result.exit_code == 2 and "file not found" in result.output  # the settings were fine
