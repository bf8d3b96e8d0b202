"""Shorthands kept for `evaluate` while it moves to the typed-config flags of `options.py`."""

from __future__ import annotations

from ..config import GenerationConfig
from .options import config_options, load_model_from, model_options, out_option, overwrite_option, resolve

generation_options = config_options(GenerationConfig)


def generation_config_from(options: dict) -> GenerationConfig:
    """Pop the generation flags out of a command's kwargs into a GenerationConfig."""
    return resolve(GenerationConfig, options)


def load_from_options(options: dict, require_chat_template: bool = True):
    """Pop the model flags out of a command's kwargs and load the model."""
    from ..config import ModelConfig

    return load_model_from(resolve(ModelConfig, options), require_chat_template)


__all__ = ["generation_options", "generation_config_from", "load_from_options", "model_options", "out_option",
           "overwrite_option"]
