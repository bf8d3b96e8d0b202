"""One typed config per verb: every field's default and help are written here, once.

The CLI builds its flags from these dataclasses (`commands/options.py`), `--config FILE`
(TOML or YAML) fills them, an explicit flag overrides the file, and each stage records the
resolved config in its `metadata.json`. Library users build them directly:

    run_trace(loaded, prober, inputs, "runs/trace", TraceConfig(batch_size=16))

A field's `metadata` holds its `help` and, where the CLI needs it, a `flag` name, a `parse`
function for list-valued flags, `choices`, or `cli=False` for fields that are not flags.
Fields that name inputs (files, runs) are not here: they are arguments of `run_<verb>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import UserError


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
    import re

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
    """Where the forward-only stages run their forward passes (`executors.py`)."""

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


@dataclass
class LabelConfig(Config):
    """Refusal labelling of answers."""

    keywords: str | None = option(
        None, "Extra refusal keywords, one per line (added to the built-in list).", type=str, path=True
    )
    only_keywords: bool = option(False, "Use only the --keywords file, not the built-in list.")
    tokenizer: str | None = option(
        None,
        "Model whose tokenizer counts the 32 answer tokens (default: the generation run's model).",
        type=str,
    )
    judge: str | None = option(None, "A LlamaGuard-style judge model (hub id, folder or .gguf).", type=str)

    def validate(self) -> None:
        if self.only_keywords and not self.keywords:
            raise UserError("--only-keywords needs --keywords FILE")


@dataclass
class ProbeConfig(Config):
    """The prober recipe (paper Appendix A)."""

    layer: int | None = option(
        None,
        "0-based decoder layer; negative counts from the end (-1 = last). "
        "Default: the last layer, final norm applied.",
        type=int,
    )
    lr: float = option(1e-3, "Adam learning rate.", min=0.0)
    train_batch_size: int = option(256, "Prober training mini-batch size.", min=1)
    epochs: int = option(5, "Training epochs (the best validation epoch is kept).", min=1)
    val_fraction: float = option(
        0.2, "Fraction of the balanced set held out for validation.", min=0.01, max=0.99
    )
    seed: int = option(0, "Seed of balancing, split and initialisation.")
    batch_size: int = option(8, "Sequences per forward pass when capturing activations.", min=1)


@dataclass
class DirectionConfig(Config):
    """Difference-in-means refusal directions (as in refusal_direction), from the prober's activations."""

    layers: tuple[int, ...] | None = option(
        None,
        "Comma-separated 0-based layers (negative: from the end); the "
        "prober's layer (the last layer without --prober) is always "
        "added.",
        parse=parse_layers,
        show="",
    )
    batch_size: int = option(8, "Sequences per forward pass when capturing activations.", min=1)


@dataclass
class TraceConfig(Config):
    """Per-token traces and cliff metrics."""

    plateau: str = option(
        "max",
        "Plateau: max of the 8-token moving average over the thinking, or its mean.",
        choices=("max", "mean"),
    )
    t_cliff: str = option(
        "last",
        "t_cliff: last token of the end template, or its largest one-step drop.",
        choices=("last", "max_drop"),
    )
    batch_size: int = option(8, "Sequences per forward pass.", min=1)
    direction_layer: int | None = option(
        None,
        "With --direction: the layer whose difference-in-means direction "
        "scores each token (default: the prober's layer).",
        type=int,
    )


@dataclass
class LayersConfig(Config):
    """The layer-wise study (Figure 5, left)."""

    layers: tuple[int, ...] | None = option(
        None,
        "Comma-separated 0-based layers (negative: from the end), or "
        "'auto' (5 evenly spaced); the last layer is always added.",
        parse=parse_layers,
        show="auto",
    )
    epochs: int = option(5, "Prober epochs per layer.", min=1)
    seed: int = option(0, "Seed of the probers' balancing, split and initialisation.")
    batch_size: int = option(8, "Sequences per forward pass.", min=1)


@dataclass
class ClipConfig(Config):
    """The thinking-clipping study (Figure 5, right)."""

    fractions: tuple[float, ...] = option(
        (0.0, 0.25, 0.5, 0.75, 1.0),
        "Fractions of the thinking's tokens kept before the end template is appended.",
        parse=parse_floats,
    )
    limit: int | None = option(None, "Use the first N examples.", type=int, min=1)
    max_answer_tokens: int = option(96, "Answer budget of the regenerated answers.", min=1)
    batch_size: int = option(8, "Sequences per batch.", min=1)

    def validate(self) -> None:
        if not self.fractions or any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise UserError(f"--fractions must lie in [0, 1], got {list(self.fractions)}")


THRESHOLDS_HELP = "Comma-separated fractions of all n_layers × n_heads heads (1%, 3%, 10% in the paper)."


def _check_thresholds(thresholds) -> None:
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        raise UserError(f"--thresholds must be fractions in (0, 1], got {list(thresholds)}")


@dataclass
class HeadsConfig(Config):
    """Suppression-head attribution at t_cliff (paper §4.1)."""

    group: str = option(
        "harmful_complied",
        "Examples to average over: harmful prompts the model complied with / refused, or all.",
        choices=("harmful_complied", "harmful_refused", "all", "harmful-complied", "harmful-refused"),
    )  # the old spelling is still read
    thresholds: tuple[float, ...] = option(
        (0.01, 0.03, 0.1), THRESHOLDS_HELP + " Marked in heads.png.", parse=parse_floats
    )
    rank_by: str = option(
        "contribution",
        "Rank by the paper's score w·Δh + b, or by the exact decomposition term.",
        choices=("contribution", "exact"),
    )
    batch_size: int = option(8, "Sequences per forward pass.", min=1)
    patterns: int | None = option(
        None,
        "Also save the attention weights of the top K suppression heads at t_cliff "
        "(patterns.json: top source tokens and mass per region).",
        type=int,
    )

    def validate(self) -> None:
        _check_thresholds(self.thresholds)
        if self.patterns is not None and self.patterns < 1:
            raise UserError(f"--patterns must be a number of heads of at least 1, got {self.patterns}")


@dataclass
class ComponentsConfig(Config):
    """Every component's term of the exact decomposition, at t_cliff and across the end template (issue 12)."""

    group: str = option(
        "harmful_complied",
        "Examples to average over: harmful prompts the model complied with / refused, or all.",
        choices=("harmful_complied", "harmful_refused", "all", "harmful-complied", "harmful-refused"),
    )  # the old spelling is still read
    top: int = option(
        20, "Components shown in components.png's ranking (the heat map shows half as many).", min=1
    )
    batch_size: int = option(8, "Sequences per forward pass.", min=1)


@dataclass
class AblateConfig(Config):
    """Head ablation by scaling (paper §4.2, Figure 8)."""

    thresholds: tuple[float, ...] = option((0.01, 0.03, 0.1), THRESHOLDS_HELP, parse=parse_floats)
    gamma: float = option(0.0, "Scale of the chosen heads' outputs: 0 removes them, >1 amplifies them.")
    renormalize: bool = option(
        False, "Rescale each token's o_proj input back to its original norm (cannot be exported)."
    )
    baseline: bool = option(
        True, "Also measure the unablated model (threshold 0).", flag="baseline/no-baseline"
    )
    export_threshold: float | None = option(
        None,
        "Threshold whose heads --export folds (default: the largest of "
        "--thresholds); must be one of --thresholds.",
        type=float,
    )
    limit: int | None = option(None, "Use the first N prompts of each set.", type=int, min=1)
    column: str | None = option(None, "Prompt column (detected when omitted).", type=str)
    judge: str | None = option(
        None, "LlamaGuard-style judge model for ASR (default: keyword labels).", type=str
    )
    control: str = option(
        "none",
        "random: also ablate, per threshold and seed, as many heads drawn at random "
        "from the heads outside the ranked top ones.",
        choices=("none", "random"),
    )
    control_seeds: tuple[int, ...] = option(
        (0, 1, 2), "Seeds of the random control (one draw per threshold and seed).", parse=parse_ints
    )
    boost_others: float | None = option(
        None,
        "Boosting control: also measure each threshold with its heads "
        "scaled by γ and every OTHER head scaled by FACTOR.",
        type=float,
    )
    components: tuple[str, ...] = option(
        (),
        "Scale these components instead of the heads of --heads: "
        f"comma-separated {COMPONENT_SPEC_HELP} (e.g. the top MLPs of "
        "components.json); --export folds them (MLPs into down_proj).",
        parse=parse_components,
        show="",
    )

    def validate(self) -> None:
        _check_thresholds(self.thresholds)
        if self.export_threshold is not None and not any(
            abs(self.export_threshold - t) < 1e-12 for t in self.thresholds
        ):
            raise UserError(
                f"--export-threshold {self.export_threshold:g} was not measured: pick one of "
                f"--thresholds ({','.join(f'{t:g}' for t in self.thresholds)})"
            )
        if self.renormalize and self.gamma == 1.0:
            pass  # scaling by 1 changes nothing; allowed
        if not self.control_seeds:
            raise UserError("--control-seeds is empty: give the random control's seeds, e.g. 0,1,2")
        if self.control == "random":
            if len(set(self.control_seeds)) != len(self.control_seeds):
                raise UserError(f"--control-seeds repeats a seed: {','.join(map(str, self.control_seeds))}")
            if any(t > 0.5 for t in self.thresholds):
                raise UserError(
                    "--control random draws as many heads from OUTSIDE the ranked ones, so every "
                    f"threshold must be at most 0.5, got {','.join(f'{t:g}' for t in self.thresholds)}"
                )
        if self.boost_others is not None and (
            self.boost_others < 0 or self.boost_others != self.boost_others
        ):
            raise UserError(f"--boost-others must be a factor of at least 0, got {self.boost_others}")


@dataclass
class GuardConfig(Config):
    """The cliff guard: flag examples whose refusal score falls off the cliff, act on their answers only."""

    action: str = option(
        "ablate",
        "What a flagged example's answer gets: ablate (regenerated with the suppression "
        "heads scaled by --gamma), steer (regenerated with --alpha times the prober "
        "direction added at the prober's layer), refuse (a fixed refusal, marked as "
        "the guard's).",
        choices=("ablate", "steer", "refuse"),
    )
    rule: str = option(
        "ms",
        "ms: flag when MS = plateau - final > tau; final: flag when plateau > --tau-plateau and final < tau.",
        choices=("ms", "final"),
    )
    taus: tuple[float, ...] = option(
        (0.05, 0.1, 0.2, 0.3),
        "Comma-separated thresholds in [0, 1] swept by one "
        "run (the thinking is generated once and reused for all).",
        parse=parse_floats,
    )
    tau_plateau: float = option(0.5, "Plateau threshold of --rule final.", min=0.0, max=1.0)
    threshold: float = option(
        0.03, "Fraction of all heads scaled by --action ablate (the top of heads.json).", min=0.0, max=1.0
    )
    gamma: float = option(0.0, "Scale of those heads under --action ablate: 0 removes them.")
    alpha: float = option(4.0, "Steering strength under --action steer (residual-stream units along w/|w|).")
    refusal_text: str = option(
        "I'm sorry, but I can't help with that.", "The fixed refusal of --action refuse."
    )
    limit: int | None = option(None, "Use the first N prompts of each set.", type=int, min=1)
    column: str | None = option(None, "Prompt column (detected when omitted).", type=str)

    def validate(self) -> None:
        import math

        if not self.taus or any(math.isnan(t) or not 0.0 <= t <= 1.0 for t in self.taus):
            raise UserError(f"--taus must be thresholds in [0, 1], got {list(self.taus)}")
        if not 0.0 <= self.tau_plateau <= 1.0:
            raise UserError(f"--tau-plateau must lie in [0, 1], got {self.tau_plateau}")
        if not 0.0 < self.threshold <= 1.0:
            raise UserError(f"--threshold must be a fraction of all heads in (0, 1], got {self.threshold}")
        if not (math.isfinite(self.gamma) and math.isfinite(self.alpha)):
            raise UserError("--gamma and --alpha must be finite numbers")


@dataclass
class ScoreConfig(Config):
    """How Cliff-as-a-Judge scores candidates."""

    generation: GenerationConfig = option(
        help="Thinking/answer budgets, batch size.", factory=GenerationConfig, cli=False
    )
    chunk_size: int = option(64, "Candidates generated and traced per step (the unit of resumption).", min=1)
    plateau: str = option(
        "max",
        "Plateau over the thinking region: max of the 8-token moving average, or mean.",
        choices=("max", "mean"),
    )

    def to_dict(self) -> dict:
        return {
            "generation": self.generation.to_dict(),
            "chunk_size": self.chunk_size,
            "plateau": self.plateau,
        }


@dataclass
class SelectConfig(Config):
    """Which candidates `select` keeps."""

    method: str = option(
        "cliff",
        "cliff = top-k by misalignment score; the others are the paper's baselines.",
        choices=("cliff", "random", "rule", "judge", "full"),
    )
    k: str = option("all", "How many to select: a count (700), a fraction (0.017) or 'all'.")
    limit: int | None = option(None, "Score only the first N candidates.", type=int, min=1)
    judge: str | None = option(
        None, "LlamaGuard-style judge model (hub id or folder); needed by --method judge.", type=str
    )

    def validate(self) -> None:
        from .selection import check_k

        check_k(self.k)
        if self.method == "judge" and not self.judge:
            raise UserError(
                "--method judge needs a judge model: pass --judge MODEL (e.g. a LlamaGuard checkpoint)"
            )


@dataclass
class FinetuneConfig(Config):
    """SFT settings; the defaults are the paper's Appendix B."""

    lora: bool = option(False, "Train LoRA adapters (saved, and merged into OUT/model).")
    learning_rate: float | None = option(
        None, "Learning rate (default 5e-6 full-parameter as in the paper, 1e-4 LoRA).", type=float, flag="lr"
    )
    lr_scheduler_type: str = option("linear", "Learning-rate schedule.")
    warmup_ratio: float = option(0.0, "Fraction of steps of linear warm-up.", min=0.0, max=1.0)
    num_train_epochs: float = option(1.0, "Passes over the selected set.", flag="epochs")
    max_steps: int = option(-1, "Stop after N optimizer steps (-1: run the epochs).")
    per_device_train_batch_size: int = option(
        1, "Examples per device per step.", flag="per-device-batch-size", min=1
    )
    gradient_accumulation_steps: int = option(
        4, "Steps accumulated per optimizer update.", flag="grad-accum", min=1
    )
    max_length: int = option(
        16384, "Longest training sequence in tokens (longer ones are truncated).", min=16
    )
    precision: str = option(
        "auto",
        "auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32.",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    gradient_checkpointing: bool = option(False, "Trade compute for memory on long thinking.")
    lora_r: int = option(16, "LoRA rank.", min=1)
    lora_alpha: int = option(32, "LoRA scaling numerator.", min=1)
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.", min=0.0, max=1.0)
    lora_target_modules: str = option("all-linear", "Modules that get adapters (comma list or 'all-linear').")
    seed: int = option(0, "Data order and initialisation seed.")
    logging_steps: int = option(1, "Log the loss every this many steps.", min=1)
    deepspeed: str | None = option(
        None,
        "DeepSpeed JSON config for multi-GPU (configs/deepspeed_zero2.json); launch with accelerate.",
        type=str,
        path=True,
    )

    def resolved_learning_rate(self) -> float:
        from .finetune import FULL_LEARNING_RATE, LORA_LEARNING_RATE

        if self.learning_rate is not None:
            return self.learning_rate
        return LORA_LEARNING_RATE if self.lora else FULL_LEARNING_RATE


@dataclass
class EvalConfig(Config):
    """Settings shared by every evaluated model."""

    generation: GenerationConfig = option(
        help="Budgets, batch size, system prompt.", factory=GenerationConfig, cli=False
    )
    tasks: tuple[str, ...] = option(
        (),
        "lm-eval tasks or groups, comma-separated: arc_challenge_local,"
        "mmlu_pro_local (with --task-path) or hub tasks (arc_challenge,mmlu_pro; "
        "need the dataset hub). Needs the `eval` extra.",
        parse=parse_names,
        show="",
    )
    task_paths: tuple[str, ...] = option(
        (),
        "Folder of lm-eval task YAMLs (e.g. ../shared/data/arc_challenge); "
        "repeat for several. Relative data_files are read relative to each "
        "YAML's own folder.",
        flag="task-path",
        multiple=True,
    )
    task_limit: int | None = option(
        None, "First N examples of each lm-eval task (default: --limit, else all).", type=int, min=1
    )
    task_max_gen_tokens: int = option(
        2048,
        "Answer budget of generative lm-eval tasks (MMLU-Pro); the thinking "
        "before it has --max-thinking-tokens.",
        min=1,
    )

    def to_dict(self) -> dict:
        return {
            "generation": self.generation.to_dict(),
            "tasks": list(self.tasks),
            "task_paths": [str(p) for p in self.task_paths],
            "task_limit": self.task_limit,
            "task_max_gen_tokens": self.task_max_gen_tokens,
        }

    def validate(self) -> None:
        if self.task_paths and not self.tasks:
            raise UserError("--task-path needs --tasks NAME[,NAME...]: the tasks to run from those folders")


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
