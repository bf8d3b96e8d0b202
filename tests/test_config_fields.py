"""Every field of every verb's config refuses a bad value, from a flag or a `--config` file alike (issue 21).

The fields are read from the click commands themselves (each flag built from a config field is a
`FieldOption` that knows its field), so a new field is covered without anyone adding a case. Each field
gets a wrong type, NaN, +-infinity, 0, a negative and a huge value, as a flag and as a key of a TOML, YAML or
JSON `--config` file. What to expect is derived from the field's annotation and metadata (a 0 is valid for a
`min=0` field), not from a hand list: a bad value must exit 2 with exactly one `error:` line naming the flag
(and, from a file, the key), with no traceback and before any model loads (the model loaders are patched to
raise); a valid one must not give a traceback either (it reaches the patched loader, or a later check's
one-line error). The sweep runs in-process with click's CliRunner, and prints its counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import typing
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refusal_cliff.cli import main
from refusal_cliff.cli.options import FieldOption
from refusal_cliff.core.config import Config, flag_name
from refusal_cliff.core.errors import UserError

INT64_MAX = 2**63 - 1
TRUE_FALSE = ("true", "false", "yes", "no", "on", "off", "1", "0")


class ModelLoadAttempt(Exception):
    """Raised by the patched model loaders: the command got past every check of its values."""


def _commands(group: click.Group, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _fields():
    """(verb path, command, FieldOption) for every config-field flag of every verb."""
    return [
        (path, command, param)
        for path, command in _commands(main)
        for param in command.params
        if isinstance(param, FieldOption)
    ]


FIELDS = _fields()
KINDS = ("wrong type", "nan", "inf", "-inf", "zero", "negative", "huge")
SOURCES = ("flag", "toml", "yaml", "json")


def _annotation(param: FieldOption):
    hint = typing.get_type_hints(param.config_class)[param.config_field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    return (args[0] if optional and len(args) == 1 else hint), optional


def _scalar_ok(kind, value, meta) -> bool:
    """Whether one scalar is valid for a field of type `kind`, from the metadata alone."""
    if kind is bool:
        return isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in TRUE_FALSE)
    if kind is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return ok and ("choices" not in meta or str(value) in meta["choices"])
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    if kind is int:
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                return False
            value = int(value)
        elif isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                return False
        if abs(value) > INT64_MAX:
            return False
    else:
        try:
            value = float(value)
        except (ValueError, OverflowError):
            return False
        if not math.isfinite(value) and not meta.get("allow_nonfinite"):
            return False
    if meta.get("above") is not None and not value > meta["above"]:
        return False
    if meta.get("min") is not None and value < meta["min"]:
        return False
    if meta.get("max") is not None and value > meta["max"]:
        return False
    return "choices" not in meta or value in meta["choices"]


def expected_valid(param: FieldOption, value, source: str) -> bool:
    """What the field's annotation and metadata say of `value` (as the flag's text, or the file's value)."""
    meta = param.config_field.metadata
    kind, _ = _annotation(param)
    if source == "flag":
        if param.is_flag:
            return False  # a flag takes no value: `--lora=nan` is an error
        value = _text(value)
    if typing.get_origin(kind) is tuple:
        (element, *_) = typing.get_args(kind)
        if isinstance(value, str) and "parse" in meta:  # text is split by the field's parse function
            try:
                items = meta["parse"](value)
            except UserError:
                return False
            if items is None:
                return True
        else:
            items = value if isinstance(value, list) else [value]
            if not all(_scalar_ok(element, item, meta) for item in items):
                return False
            if element is str and "parse" in meta:
                try:
                    meta["parse"](items)
                except UserError:
                    return False
        return all(_scalar_ok(element, item, meta) for item in items)
    return _scalar_ok(kind, value, meta)


def _text(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (dict, list)):
        return "abc"
    return str(value)


def _value(kind: str, number=None):
    return {
        "wrong type": ["abc", 1],
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "zero": 0,
        "negative": number if number is not None else -1,
        "huge": number if number is not None else 10**30,
    }[kind]


def _toml(value) -> str:
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else str(value)


def _config_file(folder: Path, source: str, key: str, value) -> Path:
    path = folder / f"settings.{source}"
    if source == "toml":
        if isinstance(value, int) and abs(value) > INT64_MAX:  # TOML integers are 64-bit: a float then
            value = float(value)
        path.write_text(f"{key} = {_toml(value)}\n")
    elif source == "yaml":
        path.write_text(yaml.safe_dump({key: value}))
    else:
        path.write_text(json.dumps({key: value}))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Runs one case: (verb path, param, source, value) -> None; asserts the expected outcome."""
    folder = tmp_path_factory.mktemp("fields")
    (folder / "input.jsonl").write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    runner = CliRunner()
    patch = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise ModelLoadAttempt("a model was loaded")

    for name, module in list(sys.modules.items()):
        if name.startswith("refusal_cliff"):
            for attribute in ("load_model", "load_model_from", "load_tokenizer_side"):
                if hasattr(module, attribute):
                    patch.setattr(module, attribute, refuse)
    import transformers

    patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    counts = {"cases": 0, "refused": 0, "reached the model": 0}

    def required(command) -> list[str]:
        args = []
        for param in command.params:
            if param.required:
                directory = isinstance(param.type, click.Path) and not param.type.file_okay
                args += [param.opts[0], str(folder / ("out" if directory else "input.jsonl"))]
        return args

    def run(path, command, param, source, value):
        meta_flag = param.opts[0]
        args = [*path, *required(command)]
        if source == "flag":
            args += [f"{meta_flag}={_text(value)}"]
        else:
            key = param.config_field.name
            args += ["--config", str(_config_file(folder, source, key, value))]
        result = runner.invoke(main, args)
        counts["cases"] += 1
        valid = expected_valid(param, value, source)
        where = f"{' '.join(args)} ({source}: {value!r})"
        if isinstance(result.exception, ModelLoadAttempt):
            counts["reached the model"] += 1
            assert valid, f"a bad value reached the model: {where}"
            return
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"traceback for {where}: {result.exception!r}"
        )
        lines = result.stderr.strip().splitlines()
        if not valid:
            counts["refused"] += 1
            assert result.exit_code == 2, f"exit {result.exit_code} for {where}: {result.output}"
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: {result.stderr}"
            flag = "--" + flag_name(param.config_field).split("/")[0]
            assert flag in lines[0] or meta_flag in lines[0], f"the error does not name {flag}: {lines[0]}"
            if source != "flag":
                assert param.config_field.name in lines[0], f"the error does not name the key: {lines[0]}"
        elif result.exit_code != 0:  # valid here, refused later (a missing input, a cross-field check)
            assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
                f"{where}: {result.stderr}"
            )

    run.counts = counts
    yield run
    patch.undo()


def test_every_field_of_every_verb_refuses_bad_values_from_flags_and_files(sweep, capsys):
    started = time.perf_counter()
    assert len(FIELDS) > 200  # every verb's flags, read from the commands
    for path, command, param in FIELDS:
        for kind in KINDS:
            for source in ("flag", SOURCES[1 + KINDS.index(kind) % 3]):  # and each file format in turn
                sweep(path, command, param, source, _value(kind))
    counts = sweep.counts
    with capsys.disabled():  # shown in every run, -q or not
        print(
            f"\n{len(FIELDS)} fields of {len({p for p, _, _ in FIELDS})} verbs: {counts['cases']} cases "
            f"({counts['refused']} refused, {counts['reached the model']} reached the model) in "
            f"{time.perf_counter() - started:.1f} s"
        )
    assert counts["refused"] > len(FIELDS) * 3


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case=st.sampled_from(FIELDS),
    source=st.sampled_from(SOURCES),
    value=st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=2**40, max_value=10**40),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["abc", "", "1e3", "-0", "0.5", "nan", "inf"]),
        st.lists(st.integers(), max_size=2),
        st.booleans(),
    ),
)
def test_random_values_are_checked_the_same_from_a_flag_and_a_file(sweep, case, source, value):
    path, command, param = case
    sweep(path, command, param, source, value)


def test_the_sweep_covers_the_fields_of_every_config_class():
    """Every config class that a verb's flags come from is here (the enumeration is not a hand list)."""
    classes = {param.config_class.__name__ for _, _, param in FIELDS}
    assert {"GenerationConfig", "ModelConfig", "FinetuneConfig", "GuardConfig", "AblateConfig"} <= classes


def test_every_config_class_defaults_pass_their_own_checks():
    """Library defaults go through the same checks as flags and files (a bad default fails here)."""
    classes, seen = list(Config.__subclasses__()), 0
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if dataclasses.is_dataclass(cls):
            cls()
            seen += 1
    assert seen >= 15
