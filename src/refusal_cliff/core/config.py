"""Typed configs: the machinery every verb's config is built with, and the configs several stages share.

Each verb's own config (`TraceConfig`, `AblateConfig`...) lives in its stage module (`stages/<verb>.py`);
the model, generation, backend and executor settings that several stages take are here. Every field's
default and help are written once, in its dataclass. The CLI builds its flags from these dataclasses
(`cli/options.py`), `--config FILE` (TOML or YAML) fills them, an explicit flag overrides the file,
and each stage records the resolved config in its `metadata.json`. Library users build them directly:

    run_trace(loaded, prober, inputs, "runs/trace", TraceConfig(batch_size=16))

A field's `metadata` holds its `help` and, where the CLI needs it, a `flag` name, a `parse`
function for list-valued flags, `choices`, or `cli=False` for fields that are not flags.
Fields that name inputs (files, runs) are not here: they are arguments of `run_<verb>`.

Every value is checked once, in one place (`check_field`, run by `Config.__post_init__` for every field
of every config, then the config's own cross-field `validate`), whatever its source: a library default, a
`--config` file, a flag. The checks come from the field's type annotation (int, float, bool, str, a tuple
of those, Optional) and its metadata: `min`, `max` (inclusive bounds; on a tuple, of every element),
`above` (an exclusive lower bound), `choices`, and finiteness: a float is refused when it is NaN or
infinite unless its metadata says what those mean (`allow_nonfinite="..."`). Integers must fit in 64
bits. `build_config` names the source of a bad value (the flag, or the key and the file).
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from refusal_cliff.core.errors import UserError


def option(default: Any = None, help: str = "", *, factory: Callable | None = None, **meta) -> Any:
    """A dataclass field with its CLI metadata (`help`, optional `flag`, `parse`, `choices`, `cli`...)."""
    meta = {"help": help, **meta}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def parse_floats(text: str | Any) -> tuple[float, ...]:
    """'0.01,0.03,0.1' -> (0.01, 0.03, 0.1); a list or tuple passes through as floats."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(float(part) for part in parts if str(part).strip())
    except ValueError:
        raise UserError(f"expected comma-separated numbers such as 0.01,0.03,0.1, got {text!r}") from None


def parse_ints(text: str | Any) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); a list or tuple passes through as ints."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(int(part) for part in parts if str(part).strip())
    except ValueError:
        raise UserError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def parse_layers(text: str | Any) -> tuple[int, ...] | None:
    """'auto' -> None (five evenly spaced layers); '5,11,-1' -> (5, 11, -1)."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(int(part) for part in parts if str(part).strip())
    except ValueError:
        raise UserError(f"expected 'auto' or comma-separated layer numbers, got {text!r}") from None


def parse_names(text: str | Any) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b')."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    return tuple(str(part).strip() for part in parts if str(part).strip())


COMPONENT_SPEC_HELP = "mlp:LAYER or head:LAYER.HEAD"


def parse_components(text: str | Any) -> tuple[str, ...]:
    """'mlp:5, head:3.1' -> ('mlp:5', 'head:3.1'): components to scale (syntax only; layers are
    checked against the model by `components.resolve_components`)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    specs = []
    for part in (str(p).strip().lower() for p in parts):
        if not part:
            continue
        match = re.fullmatch(r"(mlp):(-?\d+)|(head):(-?\d+)\.(\d+)", part)
        if match is None:
            raise UserError(f"unknown component {part!r}: use {COMPONENT_SPEC_HELP} (e.g. mlp:5,head:3.1)")
        specs.append(part)
    return tuple(dict.fromkeys(specs))


def _unescape(text: str | None) -> str | None:
    """Turn typed escapes ('\\n') into characters, leaving non-ASCII text intact."""
    if not text:
        return text
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


INT64_MAX = 2**63 - 1


SEED_BOUNDS = {"min": 0, "max": 2**32 - 1}  # what numpy, torch and python's random all accept


class FieldError(UserError):
    """A value one field cannot take: `problem` says why; the message names the flag."""

    def __init__(self, name: str, flag: str, value: Any, problem: str):
        self.name, self.flag, self.value, self.problem = name, flag, value, problem
        super().__init__(f"--{flag} {_show(value)}: {problem}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if not value or value != value.strip() or " " in value else value
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    return repr(value)


def flag_name(spec: Field) -> str:
    """The CLI flag of a config field (without the leading dashes)."""
    return spec.metadata.get("flag") or spec.name.replace("_", "-")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (annotation, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("must be a whole number")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError("must be a whole number")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
    if abs(value) > INT64_MAX:
        raise ValueError("is too large (it must fit in 64 bits)")
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("must be a number")
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except OverflowError:
        raise ValueError("is too large for a floating-point number") from None
    except ValueError:
        raise ValueError("must be a number") from None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("must be true or false")


def _to_str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("must be text")
    return value if isinstance(value, str) else str(value)


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def _check_scalar(kind: Any, value: Any, meta: typing.Mapping) -> Any:
    """Convert one scalar to `kind` and check it against the field's bounds; ValueError says why not."""
    converter = _CONVERTERS.get(kind)
    if converter is None:  # a nested config (EvalConfig.generation) or another object: its own checks ran
        if isinstance(kind, type) and not isinstance(value, kind):
            raise ValueError(f"must be a {kind.__name__}")
        return value
    value = converter(value)
    if kind is float and not math.isfinite(value) and not meta.get("allow_nonfinite"):
        raise ValueError("must be a finite number (not NaN or infinity)")
    low, high, above = meta.get("min"), meta.get("max"), meta.get("above")
    if above is not None and not value > above:
        raise ValueError(
            f"must be more than {above:g}" if high is None else f"must lie in ({above:g}, {high:g}]"
        )
    if low is not None and value < low:
        raise ValueError(f"must be at least {low:g}" if high is None else f"must lie in [{low:g}, {high:g}]")
    if high is not None and value > high:
        raise ValueError(f"must be at most {high:g}" if low is None else f"must lie in [{low:g}, {high:g}]")
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"must be one of {', '.join(map(str, meta['choices']))}")
    return value


def check_field(cls: type, spec: Field, value: Any) -> Any:
    """`value` converted to the type `spec` declares and checked against its metadata (the one place a
    config value is checked). Raises FieldError naming the flag."""
    meta = spec.metadata
    annotation, optional = _unwrap(_hints(cls)[spec.name])
    try:
        if value is None:
            if optional:
                return None
            raise ValueError("needs a value")
        if typing.get_origin(annotation) is tuple:
            (element, *_) = typing.get_args(annotation) or (str,)
            parsed = "parse" in meta and isinstance(value, str)
            if parsed:  # a flag's text ("0.01,0.03"): split by the field's parse function
                value = meta["parse"](value)
                if value is None:  # "auto"
                    return check_field(cls, spec, None)
            elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
                value = (value,)
            if not isinstance(value, (tuple, list)):
                raise ValueError("must be a list of values")
            items = tuple(_check_scalar(element, item, meta) for item in value)
            if "parse" in meta and element is str and not parsed:  # a list's texts get the same syntax check
                items = meta["parse"](items)
            return items
        return _check_scalar(annotation, value, meta)
    except UserError as exc:  # a parse function's own message
        if isinstance(exc, FieldError):
            raise
        raise FieldError(spec.name, flag_name(spec).split("/")[0], value, str(exc)) from None
    except ValueError as exc:
        raise FieldError(spec.name, flag_name(spec).split("/")[0], value, str(exc)) from None


class Config:
    """Shared behaviour of the configs: every field checked on construction, a JSON-able dict."""

    def __post_init__(self) -> None:
        for spec in fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, spec.name, check_field(type(self), spec, getattr(self, spec.name)))
        self.validate()

    def to_dict(self) -> dict:
        data = asdict(self)  # type: ignore[call-overload]
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    def validate(self) -> None:
        """Raise UserError on a combination of values no stage can use (each value alone has been checked
        by `check_field`); runs on construction, before any model is loaded."""


@dataclass
class ModelConfig(Config):
    """Which model to load, and how."""

    model: str = option(
        "default", "Hub id, local folder, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)."
    )
    device: str = option("auto", "cpu, cuda, cuda:N or auto.")
    dtype: str = option(
        "auto",
        "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit).", type=str)
    trust_remote_code: bool = option(False, "Allow model code from the hub (off by default).")

    def fingerprint(self) -> dict:
        """The fields that change results (the device does not, beyond float noise)."""
        return {"model": self.model, "dtype": self.dtype, "revision": self.revision}


@dataclass
class GenerationConfig(Config):
    """Thinking and answer generation (every verb that generates)."""

    max_thinking_tokens: int = option(
        256, "Thinking budget; the thinking is clipped when it runs out.", min=0
    )
    max_answer_tokens: int = option(96, "Answer budget.", min=1)
    batch_size: int = option(8, "Prompts per batch.", min=1)
    system_prompt: str | None = option(None, "Optional system message.", type=str)
    temperature: float = option(0.0, "0 = greedy decoding.", min=0.0)
    top_p: float = option(1.0, "Nucleus sampling (with --temperature > 0).", above=0.0, max=1.0)
    seed: int = option(
        0, "Sampling seed (per example: seed + hash of its id; the answer uses seed + 1).", **SEED_BOUNDS
    )
    end_template: str | None = option(
        None,
        "Override the thinking-end template (default: read from the chat "
        "template, else '\\n</think>\\n\\n'); escapes such as \\n are read.",
        type=str,
        convert=_unescape,
    )
    start_marker: str | None = option(
        None, "Override the thinking-start marker (default <think>).", type=str, convert=_unescape
    )
    end_marker: str | None = option(
        None, "Override the thinking-end marker (default </think>).", type=str, convert=_unescape
    )

    def results_dict(self) -> dict:
        """The settings that change generated text (batch size does not)."""
        return {key: value for key, value in self.to_dict().items() if key != "batch_size"}


@dataclass
class BackendConfig(Config):
    """Which engine generates text (`backends.py`): HF `generate` in this process, or vLLM's offline engine."""

    backend: str = option(
        "hf",
        "hf: transformers generate; vllm: the vLLM offline engine, prefix caching on (a GPU "
        "host: the `vllm` extra; a CPU: `make setup-vllm`).",
        choices=("hf", "vllm"),
    )
    tensor_parallel_size: int = option(1, "vLLM: GPUs one model is split over.", min=1)
    gpu_memory_utilization: float = option(
        0.9, "vLLM: fraction of each GPU's memory the engine may take.", min=0.05, max=1.0
    )
    max_model_len: int | None = option(
        None, "vLLM: longest sequence in tokens (default: the model's context).", type=int, min=16
    )

    def validate(self) -> None:
        if self.backend == "hf" and (self.tensor_parallel_size != 1 or self.max_model_len is not None):
            raise UserError(
                "--tensor-parallel-size and --max-model-len are vLLM settings: add --backend vllm"
            )


@dataclass
class ExecutorConfig(Config):
    """Where the forward-only stages run their forward passes (`compute/executors.py`)."""

    executor: str = option(
        "local",
        "local: this process; ray: a Ray Data pipeline over --workers workers, each "
        "loading the model once (needs the `ray` extra).",
        choices=("local", "ray"),
    )
    workers: int = option(2, "Ray workers (model replicas).", min=1)
    ray_address: str | None = option(
        None,
        "Ray cluster to join (host:port or ray://host:port; 'auto' = the one "
        "on this machine). Default: start a local cluster.",
        type=str,
    )
    gpus_per_worker: float = option(
        0.0, "GPUs per Ray worker (0: CPU workers, one torch thread each).", min=0.0
    )
    shard_size: int | None = option(
        None,
        "Examples per shard file (the unit of resumption under Ray; default: the stage's own chunk).",
        type=int,
        min=1,
    )

    def validate(self) -> None:
        if self.executor == "local" and (self.ray_address or self.gpus_per_worker):
            raise UserError("--ray-address and --gpus-per-worker are Ray settings: add --executor ray")


THRESHOLDS_HELP = "Comma-separated fractions of all n_layers × n_heads heads (1%, 3%, 10% in the paper)."


THRESHOLDS_BOUNDS = {"above": 0.0, "max": 1.0}  # each threshold is a fraction in (0, 1]


def check_thresholds(thresholds) -> None:
    """At least one threshold (each one's range is the field's `THRESHOLDS_BOUNDS`)."""
    if not thresholds:
        raise UserError("--thresholds is empty: give fractions of all heads in (0, 1], e.g. 0.01,0.03,0.1")


def config_fields(cls) -> list:
    """The fields of a config class that are CLI flags."""
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def suggest(name: str, known: typing.Iterable[str]) -> str:
    """' (did you mean x?)' for the closest of `known`, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def build_config(cls, values: dict, sources: dict[str, str] | None = None) -> Any:
    """An instance of `cls` from a dict of field values (unknown keys are an error), converted and checked
    by the config itself (`Config.__post_init__`). `sources` maps a field to the `--config` file it came
    from, so that a bad value from a file names its key and the file as well as the flag."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(
            f"unknown {cls.__name__} settings: {', '.join(unknown)}{suggest(unknown[0], known)}; "
            f"known: {', '.join(known)}"
        )
    for name, value in values.items():  # text typed by a user: escapes such as \\n read
        if "convert" in known[name].metadata and isinstance(value, str):
            values = {**values, name: known[name].metadata["convert"](value)}
    try:
        return cls(**values)
    except FieldError as exc:
        source = (sources or {}).get(exc.name)
        if source is None:
            raise
        shown = repr(exc.value) if isinstance(exc.value, str) else _show(exc.value)
        raise UserError(f"{source}: {exc.name} = {shown} (--{exc.flag}): {exc.problem}") from None


def field_default(spec: Field) -> Any:
    """A field's default value (None if it has none)."""
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return None
