"""Click flags built from the typed configs (`core/config.py`, each stage's own), `--config FILE`, and the
shared flags.

`config_options(GenerationConfig)` adds one flag per field (help and default from the field);
`resolve(GenerationConfig, kwargs)` pops those flags out of a command's kwargs and builds the
config with the precedence explicit flag > `--config` file > the field's default.
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
from refusal_cliff.compute.executors import check_executor, make_executor
from refusal_cliff.compute.labeling import ModelJudge
from refusal_cliff.compute.prober import load_prober
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import Config, ExecutorConfig, ModelConfig, build_config, config_fields
from refusal_cliff.core.models import DEFAULT_MODEL, embedded_checkpoint, load_model
from refusal_cliff.core.runs import check_out_dir

_CONFIG_KEY = "refusal_cliff.config_file"


def _flag_name(field) -> str:
    return field.metadata.get("flag") or field.name.replace("_", "-")


def _base_type(field) -> type | None:
    if "type" in field.metadata:
        return field.metadata["type"]
    default = field.default if field.default is not MISSING else None
    return type(default) if default is not None else str


def _click_type(field, base: type):
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if "choices" in field.metadata:
        return click.Choice(field.metadata["choices"])
    if base is int and (low is not None or high is not None):
        return click.IntRange(min=low, max=high)
    if base is float and (low is not None or high is not None):
        return click.FloatRange(min=low, max=high)
    if field.metadata.get("path"):
        return click.Path(dir_okay=False)
    return base


def _option_for(field) -> typing.Callable:
    help_text = field.metadata.get("help", "")
    name = _flag_name(field)
    default = field.default if field.default is not MISSING else None
    if "parse" in field.metadata:  # list-valued: typed as text, parsed by the config
        text = field.metadata.get(
            "show", ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in (default or ()))
        )
        return click.option(
            f"--{name}", field.name, default=text or None, show_default=bool(text), help=help_text
        )
    if field.metadata.get("multiple"):
        return click.option(f"--{name}", field.name, multiple=True, help=help_text)
    base = _base_type(field)
    if base is bool:
        decl = f"--{name}" if "/" not in name else "--" + name.replace("/", "/--")
        return click.option(
            decl, field.name, is_flag=True, default=default, help=help_text, show_default="/" in name
        )
    return click.option(
        f"--{name}",
        field.name,
        type=_click_type(field, base),
        default=default,
        show_default=default is not None,
        help=help_text,
    )


def config_options(*classes, exclude: tuple[str, ...] = ()):
    """A decorator adding one click option per CLI field of each config class."""

    def decorator(func):
        seen, chosen = set(exclude), []
        for cls in classes:  # a field two configs share (batch_size) is one flag filling both
            for field in config_fields(cls):
                if field.name not in seen:
                    seen.add(field.name)
                    chosen.append(field)
        for field in reversed(chosen):
            func = _option_for(field)(func)
        return func

    return decorator


def _read_config_file(ctx: click.Context, param, value: str | None) -> str | None:
    if not value:
        return value
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"file not found: {value}", ctx=ctx, param=param)
    text = path.read_text(encoding="utf-8")
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


def _known_settings() -> set[str]:
    """Every setting any verb reads from a --config file: the fields of every config class."""
    names, classes = set(), list(Config.__subclasses__())
    while classes:  # every stage's config (the CLI imports every stage) and their subclasses
        cls = classes.pop()
        classes += cls.__subclasses__()
        names.update(f.name for f in config_fields(cls))
    return names


def _check_file_keys(ctx: click.Context, source: str, data: dict, verb: str) -> None:
    """A misspelt setting is an error, not silently ignored: top-level keys must be some verb's setting
    (one file may serve several verbs), keys of this verb's table must be flags of this verb."""
    known = _known_settings()
    own = {p.name for p in ctx.command.params}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if isinstance(value, dict):
            if key in (ctx.info_name, verb):
                unknown = sorted(k for k in value if str(k).replace("-", "_") not in own)
                if unknown:
                    raise click.UsageError(
                        f"{source}: [{key}] sets {', '.join(unknown)}, which "
                        f"`{ctx.command_path}` does not have",
                        ctx=ctx,
                    )
        elif name not in known:
            raise click.UsageError(
                f"{source}: unknown setting {key!r} (settings are flag names, e.g. max_thinking_tokens)",
                ctx=ctx,
            )


def _file_values(ctx: click.Context) -> dict:
    source, data = ctx.meta.get(_CONFIG_KEY, (None, {}))
    if not data:
        return {}
    verb = ctx.command_path.split(" ", 1)[-1].replace(" ", "_") if ctx.command_path else ""
    _check_file_keys(ctx, source, data, verb)
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for key in (ctx.info_name, verb):
        if key and isinstance(data.get(key), dict):
            flat.update(data[key])
    return {str(k).replace("-", "_"): v for k, v in flat.items()}


def resolve(cls, kwargs: dict, **overrides) -> Any:
    """Build `cls` from a command's kwargs (flag > --config file > default); kwargs are left as they are, so a
    flag shared by two configs fills both."""
    ctx = click.get_current_context()
    from_file = _file_values(ctx)
    values: dict[str, Any] = {}
    for field in config_fields(cls):
        if field.name not in kwargs:
            continue
        value = kwargs[field.name]
        source = ctx.get_parameter_source(field.name)
        explicit = source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        if not explicit and field.name in from_file:
            value = from_file[field.name]
        if value is None and "parse" in field.metadata:
            if field.default is not MISSING:
                value = field.default
            elif field.default_factory is not MISSING:  # type: ignore[misc]
                value = field.default_factory()  # type: ignore[misc]
        values[field.name] = value
    values.update(overrides)
    return build_config(cls, values)


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


def check_prober(path) -> None:
    """The prober file is a readable prober (it is matched against the model once that is loaded)."""
    load_prober(path)
