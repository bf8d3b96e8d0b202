"""Options shared by several verbs, and the model loader they call."""

from __future__ import annotations

import functools

import click

from ..generation import GenerationConfig


def model_options(func):
    """--model/--device/--dtype/--revision/--trust-remote-code."""

    @click.option("--model", "model", default="default", show_default=True,
                  help="Hub id, local folder, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct).")
    @click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
    @click.option("--dtype", default="auto", show_default=True,
                  help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16.")
    @click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
    @click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def generation_options(func):
    """The generation flags of `generate`, reused by verbs that regenerate answers."""
    defaults = GenerationConfig()

    @click.option("--max-thinking-tokens", type=click.IntRange(min=0), default=defaults.max_thinking_tokens,
                  show_default=True, help="Thinking budget; the thinking is clipped when it runs out.")
    @click.option("--max-answer-tokens", type=click.IntRange(min=1), default=defaults.max_answer_tokens,
                  show_default=True, help="Answer budget.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=defaults.batch_size, show_default=True,
                  help="Prompts per batch.")
    @click.option("--system-prompt", default=None, help="Optional system message.")
    @click.option("--temperature", type=click.FloatRange(min=0), default=defaults.temperature,
                  show_default=True, help="0 = greedy decoding.")
    @click.option("--top-p", type=click.FloatRange(0, 1), default=defaults.top_p, show_default=True,
                  help="Nucleus sampling (with --temperature > 0).")
    @click.option("--seed", type=int, default=defaults.seed, show_default=True, help="Sampling seed.")
    @click.option("--end-template", default=None,
                  help="Override the thinking-end template (default: read from the chat template, "
                       "else '\\n</think>\\n\\n').")
    @click.option("--start-marker", default=None, help="Override the thinking-start marker (default <think>).")
    @click.option("--end-marker", default=None, help="Override the thinking-end marker (default </think>).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _unescape(text: str) -> str:
    """Turn typed escapes ('\\n') into characters, leaving non-ASCII text intact."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


GENERATION_KEYS = ("max_thinking_tokens", "max_answer_tokens", "batch_size", "system_prompt", "temperature",
                   "top_p", "seed", "end_template", "start_marker", "end_marker")
MODEL_KEYS = ("model", "device", "dtype", "revision", "trust_remote_code")


def generation_config_from(options: dict) -> GenerationConfig:
    """Pop the generation flags out of a command's kwargs into a GenerationConfig."""
    values = {key: options.pop(key) for key in GENERATION_KEYS if key in options}
    for key in ("end_template", "start_marker", "end_marker"):
        if values.get(key):
            values[key] = _unescape(values[key])
    return GenerationConfig(**values)


def load_from_options(options: dict, require_chat_template: bool = True):
    """Pop the model flags out of a command's kwargs and load the model."""
    from ..models import load_model

    values = {key: options.pop(key) for key in MODEL_KEYS if key in options}
    return load_model(
        values.get("model") or "default",
        device=values.get("device", "auto"),
        dtype=values.get("dtype", "auto"),
        revision=values.get("revision"),
        trust_remote_code=values.get("trust_remote_code", False),
        require_chat_template=require_chat_template,
    )


out_option = click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                          help="Run folder to write into (created if missing).")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace a run with different settings already in --out.")
