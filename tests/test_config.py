"""Typed configs drive the flags: defaults and help written once, --config FILE, explicit flags win."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

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
