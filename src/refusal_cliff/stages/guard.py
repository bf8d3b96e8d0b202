"""Cliff guard: watch the refusal score while the answer is conditioned, act only where the cliff happens.

Every repair in the paper is global (ablating heads for every prompt, or a fine-tune). The paper's
finding allows a narrower one: the refusal intention is visible during the thinking and is lost only
at the thinking-end template. The guard therefore

1. **monitors**: a forward hook on the prober's layer scores every position of the probing sequence
   (prompt + thinking + end template) in the forward pass that `model.generate` runs anyway to
   condition the answer (its prefill): one dot product per token, no second forward. The thinking's
   plateau is kept on the fly (`RunningPlateau`: the max of the 8-token moving average, exactly
   `tracing.plateau`), the final score is the score at the last end-template token, and
   `MS = plateau - final`. The positions scored are the tokens of exactly the text `trace`
   tokenises, so the numbers equal `tracing.cliff_metrics` on the same generation (tested to 1e-5).
   The thinking's own decoding steps are not used: the text re-tokenised may split differently
   from the tokens sampled, and `trace` (like the answer) reads the re-tokenised text.
2. **flags** an example when `MS > tau` (rule `ms`), or when `plateau > tau_plateau` and
   `final < tau` (rule `final`).
3. **acts** on flagged examples only, for their answer:
   - `ablate`: the answer is regenerated with the suppression heads scaled by γ (`ablation.scale_heads`);
   - `steer`: the answer is regenerated with `alpha · w/|w|` (the prober's direction) added to the
     residual stream at the prober's layer at every position that produces an answer token (the
     last end-template token, then each answer token);
   - `refuse`: the answer is replaced by a fixed refusal, marked `answer_source = "guard"`: it is
     never presented as the model's text.

An unflagged example's answer is the plain `generate` answer, byte for byte (the monitor only reads).
`CliffGuard` is the Python API; `run_guard` is the `guard` stage (a tau sweep, `guard.json`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_cliff.compute.ablation import group_heads, read_ranking, scale_heads
from refusal_cliff.compute.activations import final_norm_applied
from refusal_cliff.compute.attribution import heads_at_threshold
from refusal_cliff.compute.generation import (
    HFBackend,
    check_prompts_fit,
    generate_answers,
    generate_records,
    prompts_digest,
)
from refusal_cliff.compute.labeling import KeywordLabeler, is_attack_success, label_records
from refusal_cliff.compute.prober import warn_if_unreliable
from refusal_cliff.core.config import Config, GenerationConfig, option, parse_floats
from refusal_cliff.core.errors import UserError
from refusal_cliff.core.hooks import add_hooks
from refusal_cliff.core.runs import (
    JsonlWriter,
    RunFolder,
    chunked,
    file_digest,
    read_json,
    read_jsonl,
    write_json,
)
from refusal_cliff.core.templates import (
    REGION_END,
    REGION_THINKING,
    probing_text,
    probing_tokens,
)
from refusal_cliff.report.plotting import plot_guard, save_figure


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
        min=0.0,
        max=1.0,
    )
    tau_plateau: float = option(0.5, "Plateau threshold of --rule final.", min=0.0, max=1.0)
    threshold: float = option(
        0.03, "Fraction of all heads scaled by --action ablate (the top of heads.json).", above=0.0, max=1.0
    )
    gamma: float = option(0.0, "Scale of those heads under --action ablate: 0 removes them.")
    alpha: float = option(4.0, "Steering strength under --action steer (residual-stream units along w/|w|).")
    refusal_text: str = option(
        "I'm sorry, but I can't help with that.", "The fixed refusal of --action refuse."
    )
    limit: int | None = option(None, "Use the first N prompts of each set.", type=int, min=1)
    column: str | None = option(None, "Prompt column (detected when omitted).", type=str)

    def validate(self) -> None:
        if not self.taus:
            raise UserError("--taus is empty: give thresholds in [0, 1], e.g. 0.05,0.1,0.2")


ACTIONS = ("ablate", "steer", "refuse")
RULES = ("ms", "final")
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
GUARD = "guard.json"
GUARD_GENERATIONS = "guard_generations.jsonl"
GUARD_FIGURE = "guard.png"
ANSWER_SOURCES = {
    "ablate": "model (heads ablated)",
    "steer": "model (steered)",
    "refuse": "guard (fixed refusal)",
}


# -- the on-the-fly metrics ------------------------------------------------------------------


class RunningPlateau:
    """The max of the `window`-token moving average of a stream of scores, kept in O(window) memory.

    Equals `tracing.plateau(..., method="max")` over the same scores: a stream shorter than the
    window gives its mean, an empty one NaN.
    """

    def __init__(self, window: int = 8):
        if window < 1:
            raise UserError(f"the plateau window must be at least 1 token, got {window}")
        self.window = window
        self._recent: deque[float] = deque(maxlen=window)
        self._count = 0
        self._total = 0.0
        self._best = -math.inf

    def add(self, score: float) -> None:
        self._recent.append(float(score))
        self._count += 1
        self._total += float(score)
        if len(self._recent) == self.window:
            self._best = max(self._best, math.fsum(self._recent) / self.window)

    @property
    def value(self) -> float:
        if self._count == 0:
            return float("nan")
        if self._count < self.window:
            return self._total / self._count
        return self._best


def guard_metrics(scores: Sequence[float], regions: Sequence[str], window: int = 8) -> dict:
    """`{plateau, final, ms}` of one trace, computed the streaming way the guard does (NaN: none)."""
    running = RunningPlateau(window)
    final = float("nan")
    for score, region in zip(scores, regions):
        if region == REGION_THINKING:
            running.add(score)
        elif region == REGION_END:
            final = float(score)  # the last end-template token's score remains
    if math.isnan(final):
        raise ValueError("the probing sequence has no end-template token")
    plateau = running.value
    return {"plateau": plateau, "final": final, "ms": plateau - final}


def _null(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# -- the guard ---------------------------------------------------------------------------------


class _MonitoredBackend:
    """An `HFBackend` whose answer-phase calls (those without stop strings) are monitored: the
    prefill's scores of each text are kept, padding removed, until `take` collects them."""

    def __init__(self, guard: CliffGuard, inner):
        self.guard = guard
        self.inner = inner
        self._scores: dict[str, list[np.ndarray]] = {}

    def complete(self, texts, max_new_tokens, stop_strings=(), temperature=0.0, top_p=1.0, seed=0):
        if stop_strings:  # the thinking phase: not monitored
            return self.inner.complete(texts, max_new_tokens, stop_strings, temperature, top_p, seed)
        with self.guard.monitoring() as captured:
            answers = self.inner.complete(texts, max_new_tokens, stop_strings, temperature, top_p, seed)
        if not captured:
            raise RuntimeError("the monitor saw no forward pass of the answer phase")
        scores = captured[0]  # [batch, width] float32 (left padded)
        tokenizer = self.guard.loaded.tokenizer
        for row, text in enumerate(texts):
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            self._scores.setdefault(text, []).append(scores[row, scores.shape[1] - length :].numpy())
        return answers

    def take(self, record: dict) -> np.ndarray:
        return self._scores[probing_text(record)].pop(0)


class CliffGuard:
    """Generation with a refusal-cliff monitor and an intervention on flagged examples only.

    Usage:

        guard = CliffGuard(loaded, prober, heads=[(20, 3), (24, 7)], tau=0.2, action="ablate")
        records = guard.generate([{"id": "1", "prompt": "..."}], GenerationConfig())
        records[0]["guard"]  # {"plateau", "final", "ms", "flagged", "action", "answer_source", ...}

    Args:
        loaded: a `models.LoadedModel`.
        prober: a `prober.Prober` for this model (its layer is monitored).
        heads: (layer, head) pairs scaled by `gamma` under `action="ablate"`.
        tau: the MS threshold (rule `ms`) or the final-score threshold (rule `final`), in [0, 1].
        action: "ablate", "steer" or "refuse".
        rule: "ms" (flag when MS > tau) or "final" (plateau > tau_plateau and final < tau).
        tau_plateau: the plateau threshold of rule `final`.
        gamma: scale of the heads under `ablate` (0 removes them).
        alpha: strength of the steering vector under `steer` (residual-stream units).
        refusal_text: the fixed refusal of `refuse`.
        window: the plateau's moving-average window (8, as `trace`).
    """

    def __init__(
        self,
        loaded,
        prober,
        heads: Sequence[Sequence[int]] | None = None,
        tau: float = 0.1,
        action: str = "ablate",
        rule: str = "ms",
        tau_plateau: float = 0.5,
        gamma: float = 0.0,
        alpha: float = 4.0,
        refusal_text: str = REFUSAL_TEXT,
        window: int = 8,
    ):
        if action not in ACTIONS:
            raise UserError(f"--action must be one of {', '.join(ACTIONS)}, not {action!r}")
        if rule not in RULES:
            raise UserError(f"--rule must be one of {', '.join(RULES)}, not {rule!r}")
        check_tau(tau, "tau")
        check_tau(tau_plateau, "tau_plateau")
        geometry = loaded.adapter.geometry(loaded.model)
        if prober.d_model != geometry.d_model:
            raise UserError(
                f"a prober for d_model {prober.d_model} cannot read this model (d_model "
                f"{geometry.d_model}); train a prober for this model with `refusal-cliff probe train`"
            )
        if not 0 <= prober.layer < geometry.n_layers:
            raise UserError(
                f"the prober reads layer {prober.layer}, but the model has {geometry.n_layers} layers"
            )
        if action == "ablate" and not heads:
            raise UserError(
                "--action ablate needs the suppression heads: pass --heads heads.json (from "
                "`refusal-cliff heads`)"
            )
        self.loaded = loaded
        self.prober = prober
        self.heads = [(int(layer), int(head)) for layer, head in (heads or [])]
        if self.heads:
            group_heads(loaded.model, loaded.adapter, self.heads)  # heads that do not exist: UserError
        self.tau = float(tau)
        self.action = action
        self.rule = rule
        self.tau_plateau = float(tau_plateau)
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.refusal_text = refusal_text
        self.window = window
        model, adapter = loaded.model, loaded.adapter
        is_last = final_norm_applied(prober.layer, geometry.n_layers)
        # "layer k" as activations.py defines it: decoder layer k's output, the final norm's for the last
        self.module = adapter.final_norm(model) if is_last else adapter.layers(model)[prober.layer]
        weight = prober.weight.float().reshape(1, -1)  # [1, d_model]
        self._weight = weight
        self._bias = prober.bias.float().reshape(1)  # [1]
        self._direction = weight[0] / weight[0].norm().clamp_min(1e-12)  # [d_model]

    # -- hooks ---------------------------------------------------------------------------------

    @contextmanager
    def monitoring(self) -> Iterator[list[torch.Tensor]]:
        """Score the prober's layer in the first forward pass inside the block (a `generate`
        call's prefill); yields a list that then holds the scores [batch, width] (float32, CPU)."""
        captured: list[torch.Tensor] = []

        def hook(module, args, output) -> None:
            if captured:
                return  # decoding steps: the answer is not monitored
            hidden = output[0] if isinstance(output, tuple) else output  # [batch, pos, d_model]
            weight = self._weight.to(hidden.device)
            bias = self._bias.to(hidden.device)
            scores = torch.sigmoid(hidden.to(torch.float32) @ weight.T + bias)[..., 0]  # [batch, pos]
            captured.append(scores.cpu())
            return  # read only: the forward pass is unchanged

        with add_hooks(forward_hooks=[(self.module, hook)]):
            yield captured

    @contextmanager
    def steering(self, alpha: float | None = None) -> Iterator[None]:
        """Add `alpha · w/|w|` at the prober's layer to the last position of every forward pass inside
        the block: in a `generate` call, the last end-template token (left padding puts every row's
        last token in the last column), then each answer token."""
        alpha = self.alpha if alpha is None else float(alpha)

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [batch, pos, d_model]
            steered = hidden.clone()
            steered[:, -1, :] += (alpha * self._direction).to(device=hidden.device, dtype=hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        with add_hooks(forward_hooks=[(self.module, hook)]):
            yield

    @contextmanager
    def intervention(self) -> Iterator[None]:
        """The action's model edit for the duration of the block (nothing for `refuse`)."""
        if self.action == "ablate":
            with scale_heads(self.loaded, self.heads, gamma=self.gamma):
                yield
        elif self.action == "steer":
            with self.steering():
                yield
        else:
            yield

    # -- decisions -----------------------------------------------------------------------------

    def is_flagged(self, metrics: dict, tau: float | None = None) -> bool:
        """Whether an example's `{plateau, final, ms}` calls for the action at `tau` (default self.tau)."""
        tau = self.tau if tau is None else tau
        if self.rule == "ms":
            ms = metrics.get("ms")
            return ms is not None and not math.isnan(ms) and ms > tau
        plateau, final = metrics.get("plateau"), metrics.get("final")
        if plateau is None or final is None or math.isnan(plateau):
            return False
        return plateau > self.tau_plateau and final < tau

    # -- generation ----------------------------------------------------------------------------

    def generate_monitored(
        self, prompts: Sequence[dict], config, template=None, progress: bool = False
    ) -> Iterator[dict]:
        """Plain `generate_records` (thinking, then answer), with the guard's `{plateau, final, ms}` of
        each example read in its answer's prefill. Yields records as batches end (longest first)."""
        backend = _MonitoredBackend(self, HFBackend(self.loaded))
        for record in generate_records(self.loaded, prompts, config, template, backend, progress):
            scores = backend.take(record)
            _, regions = probing_tokens(self.loaded.tokenizer, record)
            if len(regions) != len(scores):
                raise RuntimeError(
                    f"monitored {len(scores)} positions of {record['id']!r}, expected {len(regions)}"
                )
            metrics = guard_metrics(scores, regions, self.window)
            yield {**record, "guard": {key: _null(value) for key, value in metrics.items()}}

    def act(self, records: Sequence[dict], config) -> list[dict]:
        """The guarded answers of (flagged) records: regenerated under the intervention, or the fixed
        refusal. Returns the records with `answer`, `answer_tokens` and `answer_source` replaced."""
        if not records:
            return []
        if self.action == "refuse":
            return [
                {
                    **r,
                    "answer": self.refusal_text,
                    "answer_tokens": 0,
                    "answer_source": ANSWER_SOURCES["refuse"],
                }
                for r in records
            ]

        with self.intervention():
            answered = generate_answers(self.loaded, list(records), config)
        return [{**r, "answer_source": ANSWER_SOURCES[self.action]} for r in answered]

    def apply(self, record: dict, guarded: dict | None, tau: float | None = None) -> dict:
        """The record a user sees at `tau`: the guarded answer when flagged, else the model's own."""
        flagged = self.is_flagged(record["guard"], tau)
        guard = {
            **record["guard"],
            "flagged": flagged,
            "action": self.action if flagged else None,
            "rule": self.rule,
            "tau": self.tau if tau is None else tau,
        }
        if not flagged:
            return {**record, "answer_source": "model", "guard": guard}
        if guarded is None:
            raise RuntimeError(f"example {record['id']!r} is flagged but has no guarded answer")
        guard["answer_source"] = guarded["answer_source"]
        return {
            **record,
            "answer": guarded["answer"],
            "answer_tokens": guarded["answer_tokens"],
            "unguarded_answer": record["answer"],
            "answer_source": guarded["answer_source"],
            "guard": guard,
        }

    def generate(self, prompts: Sequence[dict], config, progress: bool = False) -> list[dict]:
        """Generate each prompt's thinking and answer, guarded. Returns records in prompt order: the
        usual generation fields plus `guard: {plateau, final, ms, flagged, action, rule, tau}` and
        `answer_source` ("model", "model (heads ablated)", "model (steered)" or "guard (fixed
        refusal)"); a replaced answer keeps the model's own as `unguarded_answer`."""
        monitored = list(self.generate_monitored(prompts, config, progress=progress))
        flagged = [r for r in monitored if self.is_flagged(r["guard"])]
        guarded = {r["id"]: r for r in self.act(flagged, config)}
        order = {str(p["id"]): index for index, p in enumerate(prompts)}
        out = [self.apply(r, guarded.get(r["id"])) for r in monitored]
        return sorted(out, key=lambda r: order.get(str(r["id"]), len(order)))


def check_tau(value: float, name: str = "tau") -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 or math.isnan(float(value)):
        raise UserError(f"{name} {value!r} is out of range: refusal scores and MS thresholds lie in [0, 1]")


# -- the `guard` stage -------------------------------------------------------------------------


def read_heads_for(loaded, heads_path: str | Path) -> list[dict]:
    """heads.json, checked against the loaded model (its size, and the model its run names)."""
    ranking = read_ranking(heads_path)
    geometry = loaded.adapter.geometry(loaded.model)
    n_total = geometry.n_layers * geometry.n_heads
    if len(ranking) != n_total or any(
        not 0 <= int(h["layer"]) < geometry.n_layers or not 0 <= int(h["head"]) < geometry.n_heads
        for h in ranking
    ):
        raise UserError(
            f"{heads_path} ranks {len(ranking)} heads of another model, but {loaded.model_id} has "
            f"{geometry.n_layers} layers x {geometry.n_heads} heads; run `refusal-cliff heads` on it"
        )
    metadata_path = Path(heads_path).with_name("metadata.json")
    if metadata_path.is_file():
        written_for = read_json(metadata_path).get("model_id")
        if written_for not in (None, loaded.model_id):
            raise UserError(
                f"{heads_path} was written for {written_for}, not for {loaded.model_id}; run "
                "`refusal-cliff heads` on this model"
            )
    return ranking


def _loosest(taus: Sequence[float], rule: str) -> float:
    """The tau that flags the most examples (every other tau flags a subset of its examples)."""
    return min(taus) if rule == "ms" else max(taus)


def guard_summary(records: Sequence[dict], guard: CliffGuard, taus: Sequence[float]) -> list[dict]:
    """The `guard.json` rows: the unguarded model (`tau` null) then one row per tau, from records that
    carry `refusal` / `attack_success` labels of their own and of their guarded answer (`guarded`)."""
    harmful = [r for r in records if r["set"] == "harmful"]
    benign = [r for r in records if r["set"] == "benign"]

    def outcome(record: dict, tau: float | None) -> dict:
        if tau is not None and guard.is_flagged(record["guard"], tau):
            return record["guarded"]
        return record

    def rate(values: list[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    rows = []
    for tau in [None, *sorted(taus)]:
        flags_h = [tau is not None and guard.is_flagged(r["guard"], tau) for r in harmful]
        flags_b = [tau is not None and guard.is_flagged(r["guard"], tau) for r in benign]
        rows.append(
            {
                "tau": tau,
                "rule": guard.rule,
                "action": guard.action,
                "asr": rate([outcome(r, tau)["attack_success"] for r in harmful]),
                "benign_refusal_rate": rate([outcome(r, tau)["refusal"] for r in benign]),
                "flag_rate_harmful": rate(flags_h),
                "flag_rate_benign": rate(flags_b),
                "n": len(harmful) + len(benign),
                "n_harmful": len(harmful),
                "n_benign": len(benign),
            }
        )
    return rows


def run_guard(
    loaded,
    prober,
    harmful_prompts: Sequence[dict],
    out_dir: str | Path,
    config=None,
    generation_config=None,
    benign_prompts: Sequence[dict] = (),
    heads_path: str | Path | None = None,
    sources: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """The `guard` stage: generate each prompt once under the monitor, regenerate (or replace) the answers
    flagged at the loosest tau, and measure ASR and benign refusal rate per tau.

    Writes `guard_generations.jsonl` (one line per example, streamed and resumable by id),
    `guard.json` (the unguarded row, then one row per tau) and `guard.png`.

    Args:
        prober: a `prober.Prober` of this model.
        harmful_prompts, benign_prompts: dicts with `id` and `prompt`.
        config: a `guard.GuardConfig`.
        generation_config: a `config.GenerationConfig` (budgets, batch size, system prompt).
        heads_path: heads.json of this model (needed by `--action ablate`).
    """
    config = config or GuardConfig()
    generation_config = generation_config or GenerationConfig()
    config.validate()
    if not harmful_prompts:
        raise UserError("no harmful prompts to guard; check --prompts")
    if config.action == "ablate" and heads_path is None:
        raise UserError(
            "--action ablate needs the suppression heads: pass --heads heads.json (from "
            "`refusal-cliff heads`)"
        )
    heads: list[tuple[int, int]] = []
    if heads_path is not None:
        ranking = read_heads_for(loaded, heads_path)
        heads = heads_at_threshold(ranking, config.threshold, len(ranking))
    taus = sorted(set(config.taus))
    guard = CliffGuard(
        loaded,
        prober,
        heads if config.action == "ablate" else None,
        tau=_loosest(taus, config.rule),
        action=config.action,
        rule=config.rule,
        tau_plateau=config.tau_plateau,
        gamma=config.gamma,
        alpha=config.alpha,
        refusal_text=config.refusal_text,
    )
    ids = [("harmful", str(p["id"])) for p in harmful_prompts] + [
        ("benign", str(p["id"])) for p in benign_prompts
    ]
    if len(set(ids)) != len(ids):
        raise UserError("prompt ids repeat within a prompt set; give each prompt a distinct id")

    template = check_prompts_fit(loaded, harmful_prompts, generation_config)
    check_prompts_fit(loaded, benign_prompts, generation_config)
    stage_config = {
        "model": loaded.model_id,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "prober": prober.fingerprint(),
        "layer": prober.layer,
        "heads_digest": file_digest(heads_path) if heads_path is not None else None,
        "heads": [list(h) for h in heads] if config.action == "ablate" else None,
        **{k: v for k, v in config.to_dict().items() if k not in ("limit", "column")},
        "harmful_digest": prompts_digest(harmful_prompts),
        "benign_digest": prompts_digest(benign_prompts) if benign_prompts else None,
        "generation": generation_config.results_dict(),
        **(sources or {}),
    }
    warn_if_unreliable(prober)
    run = RunFolder(
        out_dir,
        "guard",
        stage_config,
        overwrite=overwrite,
        artifacts=[GUARD, GUARD_GENERATIONS, GUARD_FIGURE],
    )
    with run.start(
        model_id=loaded.model_id,
        revision=loaded.revision,
        seed=generation_config.seed,
        extra={"prober": prober.summary()},
    ):
        target = run.path(GUARD_GENERATIONS)
        done = set()
        if run.resumed and target.exists():
            done = {(r.get("set"), str(r.get("id"))) for r in read_jsonl(target, repair=True)}
        total = len(ids)
        with (
            JsonlWriter(target) as writer,
            tqdm(
                total=total, initial=len(done & set(ids)), desc="guard", unit="ex", disable=not progress
            ) as bar,
        ):
            for name, prompts in (("harmful", harmful_prompts), ("benign", benign_prompts)):
                pending = [p for p in prompts if (name, str(p["id"])) not in done]
                monitored = guard.generate_monitored(pending, generation_config, template)
                for chunk in chunked(monitored, generation_config.batch_size):
                    flagged = [r for r in chunk if guard.is_flagged(r["guard"])]
                    guarded = {r["id"]: r for r in guard.act(flagged, generation_config)}
                    for record in chunk:  # a whole batch is written once its guarded answers exist
                        line = {"set": name, **record}
                        if record["id"] in guarded:
                            answer = guarded[record["id"]]
                            line["guarded"] = {
                                "answer": answer["answer"],
                                "answer_tokens": answer["answer_tokens"],
                                "answer_source": answer["answer_source"],
                            }
                        writer.write(line)
                        bar.update(1)
        records = read_jsonl(target)
        wanted = set(ids)
        records = [r for r in records if (r.get("set"), str(r.get("id"))) in wanted]
        labeler = KeywordLabeler()
        for record, label in zip(records, label_records(records, labeler, loaded.tokenizer)):
            record.update(refusal=label["refusal"], attack_success=is_attack_success(label))
        with_guarded = [r for r in records if "guarded" in r]
        guarded_labels = label_records(
            [{"id": r["id"], "answer": r["guarded"]["answer"]} for r in with_guarded],
            labeler,
            loaded.tokenizer,
        )
        for record, label in zip(with_guarded, guarded_labels):
            record["guarded"].update(refusal=label["refusal"], attack_success=is_attack_success(label))
        rows = guard_summary(records, guard, taus)
        write_json(run.path(GUARD), rows)

        save_figure(plot_guard(rows), run.path(GUARD_FIGURE))
        run.finish(
            {
                "n_harmful": len(harmful_prompts),
                "n_benign": len(benign_prompts),
                "n_flagged_loosest": len(with_guarded),
                "heads": [list(h) for h in heads] or None,
            }
        )
    return {GUARD: run.path(GUARD), GUARD_GENERATIONS: target, GUARD_FIGURE: run.path(GUARD_FIGURE)}
