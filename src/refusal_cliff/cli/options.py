"""Click flags built from the typed configs (`core/config.py`, each stage's own), `--config FILE`, and the
shared flags.

`config_options(GenerationConfig)` adds one flag per field (help and default from the field);
`resolve(GenerationConfig, kwargs)` pops those flags out of a command's kwargs and builds the
config with the precedence explicit flag > `--config` file > the field's default. Click only parses a
flag's text (its base type, or its choices); the range and finiteness checks are the config's own
(`core/config.py`, `check_field`), the same for a flag, a `--config` value and a default.
"""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from refusal_cliff.compute.activations import resolve_layers
from refusal_cliff.compute.backends import load_tokenizer_side
from refusal_cliff.compute.executors import check_executor, make_executor
from refusal_cliff.compute.generation import check_prompts_fit
from refusal_cliff.compute.labeling import ModelJudge
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import (
    ExecutorConfig,
    ModelConfig,
    build_config,
    config_fields,
    field_default,
    flag_name,
    suggest,
)
from refusal_cliff.core.errors import UserError, describe_file_error, require_regular_file
from refusal_cliff.core.models import BUILTIN_MODELS, DEFAULT_MODEL, embedded_checkpoint, load_model
from refusal_cliff.core.runs import check_out_dir

_CONFIG_KEY = "refusal_cliff.config_file"


class FieldOption(click.Option):
    """A flag built from a config field: it remembers the field and its config class, so that the
    `--config` file's keys and the tests can enumerate every verb's settings from the commands."""

    def __init__(self, *args, config_field=None, config_class=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_field = config_field
        self.config_class = config_class


def _flag_name(field) -> str:
    return flag_name(field)


def _base_type(field) -> type | None:
    if "type" in field.metadata:
        return field.metadata["type"]
    default = field.default if field.default is not MISSING else None
    return type(default) if default is not None else str


def _click_type(field, base: type):
    """How click parses the flag's text; its range is checked by the config (`check_field`)."""
    if "choices" in field.metadata:
        return click.Choice(field.metadata["choices"])
    if field.metadata.get("path"):
        return click.Path(dir_okay=False)
    return base


def _option_for(field, cls) -> typing.Callable:
    help_text = field.metadata.get("help", "")
    extra = {"cls": FieldOption, "config_field": field, "config_class": cls}
    name = _flag_name(field)
    default = field.default if field.default is not MISSING else None
    if "parse" in field.metadata:  # list-valued: typed as text, parsed by the config
        text = field.metadata.get(
            "show", ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in (default or ()))
        )
        return click.option(
            f"--{name}", field.name, default=text or None, show_default=bool(text), help=help_text, **extra
        )
    if field.metadata.get("multiple"):
        return click.option(f"--{name}", field.name, multiple=True, help=help_text, **extra)
    base = _base_type(field)
    if base is bool:
        decl = f"--{name}" if "/" not in name else "--" + name.replace("/", "/--")
        return click.option(
            decl, field.name, is_flag=True, default=default, help=help_text, show_default="/" in name, **extra
        )
    return click.option(
        f"--{name}",
        field.name,
        type=_click_type(field, base),
        default=default,
        show_default=default is not None,
        help=help_text,
        **extra,
    )


def config_options(*classes, exclude: tuple[str, ...] = ()):
    """A decorator adding one click option per CLI field of each config class."""

    def decorator(func):
        seen, chosen = set(exclude), []
        for cls in classes:  # a field two configs share (batch_size) is one flag filling both
            for field in config_fields(cls):
                if field.name not in seen:
                    seen.add(field.name)
                    chosen.append((field, cls))
        for field, cls in reversed(chosen):
            func = _option_for(field, cls)(func)
        return func

    return decorator


def _read_config_file(ctx: click.Context, param, value: str | None) -> str | None:
    if not value:
        return value
    path = Path(value)
    try:
        require_regular_file(path)
        text = path.read_text(encoding="utf-8")
    except UserError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    except UnicodeDecodeError as exc:
        raise click.BadParameter(describe_file_error(exc), ctx=ctx, param=param) from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise click.BadParameter(f"{value}: use a .toml, .yaml or .json file", ctx=ctx, param=param)
    except click.BadParameter:
        raise
    except Exception as exc:  # a syntax error of any of the three parsers
        raise click.BadParameter(f"{value} cannot be parsed ({exc})", ctx=ctx, param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a table of settings", ctx=ctx, param=param)
    ctx.meta[_CONFIG_KEY] = (str(path), data)
    return value


config_file_option = click.option(
    "--config",
    "config_file",
    default=None,
    callback=_read_config_file,
    expose_value=True,
    is_eager=True,
    help="TOML/YAML/JSON file of settings (keys are flag names; a [<verb>] table overrides the top level). "
    "An explicit flag overrides the file.",
)


def _verb_names(ctx: click.Context) -> set[str]:
    """Every verb's table name a --config file may hold: `trace`, `probe`, `probe_train`, `train`..."""
    names: set[str] = set()
    stack = [("", ctx.find_root().command)]
    while stack:
        prefix, command = stack.pop()
        for name, sub in getattr(command, "commands", {}).items():
            names.update({name, f"{prefix}{name}"})
            stack.append((f"{prefix}{name}_", sub))
    return names


def _settings(ctx: click.Context) -> dict[str, str]:
    """The settings this verb reads from a --config file: each field's name and flag -> the field's name."""
    keys: dict[str, str] = {}
    for param in ctx.command.params:
        if isinstance(param, FieldOption):
            spec = param.config_field
            for key in (spec.name, flag_name(spec).split("/")[0].replace("-", "_")):
                keys[key] = spec.name
    return keys


def _file_values(ctx: click.Context) -> tuple[dict, str | None]:
    """The settings of the --config file that apply to this verb (its top level, then its own table), by
    field name, and the file's name. A key this verb does not use is an error naming the verb and the key
    (never silently ignored); a table named after another verb is that verb's and is skipped."""
    source, data = ctx.meta.get(_CONFIG_KEY, (None, {}))
    if not data:
        return {}, source
    verb = ctx.command_path.split(" ", 1)[-1].replace(" ", "_") if ctx.command_path else ""
    own_tables = {key for key in (ctx.info_name, verb) if key}
    settings, verbs = _settings(ctx), _verb_names(ctx)
    values: dict[str, Any] = {}
    tables = [(key, data[key]) for key in data if key in own_tables and isinstance(data[key], dict)]
    for table, items in [(None, data), *tables]:
        for key, value in items.items():
            name = str(key).replace("-", "_")
            if table is None and isinstance(value, dict) and (key in verbs or key in own_tables):
                continue  # a verb's table: this verb's is read below, another verb's is not ours
            flags = {p.name: p.opts[0] for p in ctx.command.params if isinstance(p, click.Option)}
            if name not in settings and name in flags:  # an input or a run flag, not a setting
                raise click.UsageError(
                    f"{source}: {key!r} is not a setting a --config file can give; pass {flags[name]} on the "
                    "command line",
                    ctx=ctx,
                )
            if name not in settings:
                where = f"[{table}] " if table else ""
                hint = suggest(name, settings) or (
                    f" (a [{key}] table must name a verb)" if isinstance(value, dict) else ""
                )
                raise click.UsageError(
                    f"{source}: `refusal-cliff {verb.replace('_', ' ')}` does not use the setting "
                    f"{where}{key!r}{hint}; "
                    "settings another verb uses go in a table named after that verb, e.g. [trace]",
                    ctx=ctx,
                )
            if table is not None or settings[name] not in values:  # the verb's table wins
                values[settings[name]] = value
    return values, source


def resolve(cls, kwargs: dict, **overrides) -> Any:
    """Build `cls` from a command's kwargs (flag > --config file > default); kwargs are left as they are, so a
    flag shared by two configs fills both. Every value is checked by the config (`core/config.py`), and one
    from the file is named by its key and the file."""
    ctx = click.get_current_context()
    from_file, source = _file_values(ctx)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field in config_fields(cls):
        if field.name not in kwargs:
            continue
        value = kwargs[field.name]
        origin = ctx.get_parameter_source(field.name)
        explicit = origin in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        if not explicit and field.name in from_file:
            value = from_file[field.name]
            sources[field.name] = str(source)
        elif value is None and "parse" in field.metadata:
            value = field_default(field)
        values[field.name] = value
    values.update(overrides)
    return build_config(cls, values, sources)


def model_options(func):
    """--model/--device/--dtype/--revision/--trust-remote-code, from `ModelConfig`."""
    return config_options(ModelConfig)(func)


def executor_from(options: dict, model: ModelConfig | None):
    """The executor the command's --executor flags name (`executors.make_executor`), checked first
    (`executors.check_executor`: Ray installed, address reachable, GPUs there), so call it before any
    loading. Nothing starts until it is used; use it as `with executor:` to release it afterwards.
    `model`: how Ray workers load the model."""
    config = resolve(ExecutorConfig, options)
    check_executor(config)
    return make_executor(config, model)


def load_judge(judge: str | None, device: str = "auto"):
    """A `labeling.ModelJudge` for a judge model id, or None."""
    if not judge:
        return None

    return ModelJudge(load_model(judge, device=device))


out_option = click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder to write into (created if missing).",
)
overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a run with different settings already in --out (the old results "
    "are kept until the new run finishes).",
)


# -- checks every verb runs before it loads a model (issue 13) ----------------------------------------------


def check_out(out, expected_bytes: int = 0) -> None:
    """--out is (or can become) a folder on a writable disk with room for about `expected_bytes`."""
    check_out_dir(out, expected_bytes)


def model_n_layers(config: ModelConfig) -> int | None:
    """The number of decoder layers of a local folder or the embedded model, from its config.json alone (no
    weights loaded); None for a hub id or a .gguf file (those are checked once loaded)."""
    model = config.model or "default"
    if model in BUILTIN_MODELS:  # not made yet: checked once loaded, never built for a check
        folder = BUILTIN_MODELS[model].cached()
        if folder is None:
            return None
    else:
        folder = embedded_checkpoint() if model in ("default", DEFAULT_MODEL) else Path(model).expanduser()
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(str(folder))
    return get_adapter(model_config).geometry(model_config).n_layers


def check_layers(layers, config: ModelConfig) -> None:
    """Every requested layer exists (negative ones count from the end), before the model is loaded."""
    if layers is None:
        return
    n_layers = model_n_layers(config)
    if n_layers is not None:
        resolve_layers(list(layers) if not isinstance(layers, int) else layers, n_layers)


def check_prompts_fit_before_loading(config: ModelConfig, prompt_sets, generation) -> None:
    """Every prompt fits the model's context with the budgets, from its tokenizer and config alone (no
    weights) for a local folder or the embedded model; a hub id or a .gguf file is checked once loaded."""
    if model_n_layers(config) is None:  # not a local folder with a config.json
        return
    side = load_tokenizer_side(config)
    for prompts in prompt_sets:
        check_prompts_fit(side, prompts, generation)


def check_prober(path) -> None:
    """The prober file is a readable prober (it is matched against the model once that is loaded)."""
    load_prober(path)
