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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
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


class Config:
    """Shared behaviour of the configs: a JSON-able dict, validation."""

    def to_dict(self) -> dict:
        data = asdict(self)  # type: ignore[call-overload]
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    def validate(self) -> None:
        """Raise UserError on a value no stage can use (called before any model is loaded)."""


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
    top_p: float = option(1.0, "Nucleus sampling (with --temperature > 0).", min=0.0, max=1.0)
    seed: int = option(0, "Sampling seed (per example: seed + hash of its id; the answer uses seed + 1).")
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
        "hf: transformers generate; vllm: the vLLM offline engine (needs the `vllm` "
        "extra and a GPU), prefix caching on.",
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
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker must be 0 (CPU) or more, got {self.gpus_per_worker:g}")
        if self.executor == "local" and (self.ray_address or self.gpus_per_worker):
            raise UserError("--ray-address and --gpus-per-worker are Ray settings: add --executor ray")


THRESHOLDS_HELP = "Comma-separated fractions of all n_layers × n_heads heads (1%, 3%, 10% in the paper)."


def check_thresholds(thresholds) -> None:
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        raise UserError(f"--thresholds must be fractions in (0, 1], got {list(thresholds)}")


def config_fields(cls) -> list:
    """The fields of a config class that are CLI flags."""
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def build_config(cls, values: dict) -> Any:
    """An instance of `cls` from a dict of field values (unknown keys are an error), converted and validated."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown {cls.__name__} settings: {', '.join(unknown)}; known: {', '.join(known)}")
    converted = {}
    for name, value in values.items():
        meta = known[name].metadata
        if "parse" in meta and value is not None and not isinstance(value, tuple):
            value = meta["parse"](value)
        if meta.get("multiple") and isinstance(value, (list, str)):  # from a config file
            value = (value,) if isinstance(value, str) else tuple(value)
        if "convert" in meta:
            value = meta["convert"](value)
        converted[name] = value
    config = cls(**converted)
    config.validate()
    return config
