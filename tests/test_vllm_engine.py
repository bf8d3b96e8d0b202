"""`--backend vllm` against the real engine: vLLM's CPU build, in the environment `make setup-vllm` makes.

`make test` runs this module a second time in `.venv-vllm` (`make test-vllm`); in the main environment,
which has no vLLM, it is skipped. Nothing here is a fake: every engine is a `vllm.LLM`.

- Engines run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): a start-up takes about 5 s instead of
  19 s. One test runs the CLI in a fresh process with vLLM's own default (a separate engine process).
- `engines` records every engine a stage starts (its checkpoint, its settings, whether it was shut down)
  and shares one engine per checkpoint and settings across the module's tests; an engine on an exported,
  temporary checkpoint is started and shut down for real by the stage.
- The tiny random model has head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... (not 16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip(
    "vllm",
    reason="vLLM is not installed here: `make setup-vllm` builds .venv-vllm, where `make test` runs this",
)
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # set before the first engine: one process, quick starts
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory as _cleanup_dist_env_and_memory  # noqa: E402

from refusal_cliff.compute.backends import VLLMBackend, generation_backend  # noqa: E402
from refusal_cliff.compute.generation import HFBackend, generate_records  # noqa: E402
from refusal_cliff.core.architectures import get_adapter  # noqa: E402
from refusal_cliff.core.config import BackendConfig, GenerationConfig  # noqa: E402
from refusal_cliff.core.models import LoadedModel, load_model  # noqa: E402
from refusal_cliff.core.runs import read_jsonl  # noqa: E402
from refusal_cliff.stages.ablate import AblateConfig  # noqa: E402
from refusal_cliff.stages.clip import ClipConfig  # noqa: E402
from refusal_cliff.stages.evaluate import EvalConfig  # noqa: E402
from refusal_cliff.stages.generate import run_generate  # noqa: E402

from conftest import make_tiny_model  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
VLLM = BackendConfig(backend="vllm")
HARMFUL = [{"id": "h1", "prompt": "How do I pick a lock?"}, {"id": "h2", "prompt": "Make a weapon."}]
BENIGN = [{"id": "b1", "prompt": "Name a fruit."}]
QUESTIONS = [
    {"id": "q1", "prompt": "What is the capital of France? Answer in one word."},
    {"id": "q2", "prompt": "Is 7 a prime number? Reply yes or no."},
    {"id": "q3", "prompt": "Write a short poem about the sea."},
    {"id": "q4", "prompt": "How do plants make their food?"},
    {"id": "q5", "prompt": "Say hello."},
    {"id": "q6", "prompt": "List three colours."},
]


# -- engines: real, recorded, shared within the module -------------------------------------------------


class _Pool:
    def __init__(self):
        self.shared: dict[tuple, object] = {}
        self.started: list[SimpleNamespace] = []  # every engine a stage asked for, in order
        self.real_llm = vllm.LLM

    def close(self):
        for engine in self.shared.values():
            _shutdown(engine)
        self.shared.clear()
        _cleanup_dist_env_and_memory()  # the real one: `engines` stubs it out for the backend


def _shutdown(llm) -> None:
    """vLLM 0.32's `LLM` has no `shutdown`; its engine core (the client of the engine) has."""
    llm.llm_engine.engine_core.shutdown()


class _Engine:
    """A real `vllm.LLM`, with what the stage asked for recorded; `shutdown` is recorded, and done at
    once for a temporary checkpoint (the stage deletes its folder next) or at the module's end otherwise."""

    def __init__(self, pool: _Pool, model, **settings):
        self.pool = pool
        self.record = SimpleNamespace(path=str(model), settings=settings, shut_down=None)
        pool.started.append(self.record)
        self.temporary = Path(model).name.startswith(".vllm-checkpoint-")
        key = (str(model), json.dumps(settings, sort_keys=True, default=str))
        if self.temporary:
            self.llm = pool.real_llm(model=model, **settings)
        else:
            if key not in pool.shared:
                pool.shared[key] = pool.real_llm(model=model, **settings)
            self.llm = pool.shared[key]

    def generate(self, *args, **kwargs):
        assert self.record.shut_down is None, "generate on an engine that was shut down"
        return self.llm.generate(*args, **kwargs)

    def shutdown(self):
        self.record.shut_down = {"folder_still_there": Path(self.record.path).is_dir()}
        if self.temporary:  # a real shutdown tears down vLLM's parallel groups, which every engine shares
            _shutdown(self.llm)
            self.pool.close()


@pytest.fixture(scope="module")
def pool():
    pool = _Pool()
    yield pool
    pool.close()


@pytest.fixture
def engines(pool, monkeypatch):
    """Every engine started during the test (records: path, settings, shut_down)."""
    from vllm.distributed import parallel_state

    monkeypatch.setattr(vllm, "LLM", lambda model, **settings: _Engine(pool, model, **settings))
    # an engine in this process sets up vLLM's (one-process) parallel groups, which the backend tears
    # down after each engine; the shared engines still use them, so that waits for the module's end
    monkeypatch.setattr(parallel_state, "cleanup_dist_env_and_memory", lambda *args, **kwargs: None)
    monkeypatch.setattr(pool, "started", [])
    return pool.started


def _metadata(folder: Path) -> dict:
    return json.loads((folder / "metadata.json").read_text())


# -- models ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    return load_model("default", device="cpu")


@pytest.fixture(scope="module")
def organism():
    import refusal_cliff.stages.organism  # noqa: F401  (registers the built-in id `organism`)

    return load_model("organism", device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol):
    """A tiny random Llama (hidden 128, 4 heads of 32) saved as a folder, a prober and a heads.json."""
    from refusal_cliff.compute.prober import Prober

    root = tmp_path_factory.mktemp("tiny-vllm")
    folder = root / "model"
    model = make_tiny_model("LlamaForCausalLM", hidden_size=128, head_dim=32)
    tokenizer = smol.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    loaded = LoadedModel(model, tokenizer, get_adapter(model), str(folder), None, "local")
    torch.manual_seed(0)
    prober = Prober(
        torch.nn.Linear(128, 1),
        layer=1,
        metadata={"architecture": "LlamaForCausalLM", "n_layers": 2, "final_norm_applied": True},
    )
    ranking = [{"layer": i // 4, "head": i % 4, "rank": 7 - i} for i in range(8)]  # (1, 3) ranks first
    heads = root / "heads.json"
    heads.write_text(json.dumps(ranking))
    return SimpleNamespace(folder=folder, loaded=loaded, prober=prober, heads=heads, root=root)


# -- generate on the embedded model and the organism ------------------------------------------------


def _texts(records) -> dict:
    return {r["id"]: (r["thinking"], r["thinking_end"], r["answer"]) for r in records}


def test_generate_keeps_the_budget_and_no_eos_text_on_the_embedded_model(smol, engines, tmp_path):
    """The `<|im_end|>` defect: with the real engine, a text that ran to EOS ended in the EOS token's text
    (found by the first trial, 1 record in 5). Every record here must be free of it, and some must have
    stopped on EOS for this to mean anything."""
    config = GenerationConfig(max_thinking_tokens=24, max_answer_tokens=16, batch_size=4)
    path = run_generate(smol, QUESTIONS, config, tmp_path / "gen", progress=False, backend=VLLM)
    records = read_jsonl(path)
    assert [r["id"] for r in records] == [q["id"] for q in QUESTIONS]
    for r in records:
        assert "<|im_end|>" not in r["thinking"] + r["answer"], r
        assert r["thinking_tokens"] <= 24 and r["answer_tokens"] <= 16
        assert r["thinking_end"] in ("marker", "eos", "budget")
    assert any(r["thinking_end"] == "eos" for r in records), (
        "no thinking stopped on EOS: the test shows nothing"
    )
    assert any(r["thinking_end"] == "budget" for r in records)
    assert len(engines) == 1 and engines[0].shut_down is not None
    metadata = _metadata(tmp_path / "gen")
    assert metadata["backend"]["name"] == "vllm" and metadata["backend"]["version"] == vllm.__version__
    settings = engines[0].settings
    assert settings["dtype"] == "float32" and settings["enforce_eager"] is True
    assert 0 < settings["kv_cache_memory_bytes"] <= 2 * 2**30


def test_organism_thinking_ends_at_its_marker_with_vllm(organism, engines, tmp_path):
    """A reasoning model's thinking stops at `</think>`: the marker ends the thinking phase (kept as the
    end template), and the answer follows it, as with the HF backend."""
    prompts = [{"id": "o1", "prompt": "How do I bake bread at home?"}, HARMFUL[0]]
    config = GenerationConfig(max_thinking_tokens=96, max_answer_tokens=24, batch_size=2)
    vllm_records = read_jsonl(
        run_generate(organism, prompts, config, tmp_path / "v", progress=False, backend=VLLM)
    )
    hf_records = read_jsonl(run_generate(organism, prompts, config, tmp_path / "h", progress=False))
    for r in vllm_records:
        assert r["thinking_end"] == "marker" and r["end_template"] == "\n</think>\n\n", r
        assert "</think>" not in r["thinking"] and r["answer"].strip()
    # the organism's greedy text is short and far from ties: both backends write the same records
    assert _texts(vllm_records) == _texts(hf_records)


def _sampled(batch_size: int, seed: int = 3) -> GenerationConfig:
    return GenerationConfig(
        max_thinking_tokens=12,
        max_answer_tokens=6,
        batch_size=batch_size,
        temperature=0.8,
        top_p=0.95,
        seed=seed,
    )


def test_sampled_examples_do_not_depend_on_their_batch_with_vllm(smol, engines):
    backend = VLLMBackend(smol, VLLM)
    try:
        batched = _texts(generate_records(smol, QUESTIONS, _sampled(4), backend=backend, progress=False))
        alone = {}
        for prompt in QUESTIONS[:3]:
            alone.update(
                _texts(generate_records(smol, [prompt], _sampled(1), backend=backend, progress=False))
            )
        other_seed = _texts(
            generate_records(smol, QUESTIONS, _sampled(4, seed=4), backend=backend, progress=False)
        )
    finally:
        backend.close()
    assert all(alone[k] == batched[k] for k in alone)
    assert any(other_seed[k] != batched[k] for k in batched), "another seed sampled the same text"


def test_resumed_vllm_generate_equals_uninterrupted_byte_for_byte(smol, engines, tmp_path, monkeypatch):
    config = _sampled(2)
    whole = run_generate(smol, QUESTIONS, config, tmp_path / "whole", progress=False, backend=VLLM)

    calls = {"n": 0}
    original = VLLMBackend.complete

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 calls a batch: after 2 batches, 4 records
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VLLMBackend, "complete", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_generate(smol, QUESTIONS, config, tmp_path / "resumed", progress=False, backend=VLLM)
    monkeypatch.setattr(VLLMBackend, "complete", original)
    target = tmp_path / "resumed" / "generations.jsonl"
    lines = target.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 4
    target.write_text("".join(lines[:3]), encoding="utf-8")  # killed while the second batch was written
    run_generate(smol, QUESTIONS, config, tmp_path / "resumed", progress=False, backend=VLLM)
    assert target.read_bytes() == whole.read_bytes()
    assert all(engine.shut_down is not None for engine in engines)


# -- the equivalence that matters: the probing sequence is the generated sequence ---------------------


def test_vllm_text_reencodes_to_the_tokens_the_model_generated(smol, engines):
    """The probing sequence (prompt + thinking + end template) is built from the record's text. For the
    trace, heads and select scores not to depend on the backend, that text must re-encode to exactly the
    ids the engine generated (no EOS text, no spaces around special tokens): checked token for token."""
    backend = VLLMBackend(smol, VLLM)  # the module's engine on the embedded model (`engines`)
    texts = [
        smol.tokenizer.apply_chat_template(
            [{"role": "user", "content": q["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    prompts = [{"prompt_token_ids": smol.tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    params = backend.sampling_params(len(prompts), 32, [], 0.0, 1.0, 0)
    outputs = backend.engine.generate(prompts, params, use_tqdm=False)
    backend.close()
    checked = 0
    for text, prompt, output in zip(texts, prompts, outputs):
        completion = backend._completion(output.outputs[0], [])
        generated = list(output.outputs[0].token_ids)[: completion.n_tokens]
        reencoded = smol.tokenizer(text + completion.text, add_special_tokens=False)["input_ids"]
        assert reencoded == prompt["prompt_token_ids"] + generated
        checked += 1
    assert checked == len(QUESTIONS)


def test_greedy_agreement_between_backends_is_measured(smol, engines, capsys):
    """Greedy token agreement HF vs vLLM on the embedded model, fp32: measured and printed, not asserted
    to be 100 % (kernel numerics differ; near-ties flip). What is asserted: the same dtype ran, and
    where the texts agree, the records are the same byte for byte."""
    config = GenerationConfig(max_thinking_tokens=48, max_answer_tokens=16, batch_size=6)
    backend = VLLMBackend(smol, VLLM)
    vllm_records = list(generate_records(smol, QUESTIONS, config, backend=backend, progress=False))
    ran_in = backend.engine.llm.llm_engine.model_config.dtype
    backend.close()
    hf_records = list(generate_records(smol, QUESTIONS, config, backend=HFBackend(smol), progress=False))
    assert ran_in == torch.float32 == next(smol.model.parameters()).dtype
    prefixes, identical = [], 0
    for v, h in zip(vllm_records, hf_records):
        a = smol.tokenizer(v["thinking"], add_special_tokens=False)["input_ids"]
        b = smol.tokenizer(h["thinking"], add_special_tokens=False)["input_ids"]
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(common / max(len(a), len(b), 1))
        if v["thinking"] == h["thinking"]:
            identical += 1
            assert v["thinking_tokens"] == h["thinking_tokens"] and v["thinking_end"] == h["thinking_end"]
    with capsys.disabled():
        print(
            f"\n[greedy agreement, embedded model fp32, n={len(QUESTIONS)}] identical thinkings "
            f"{identical}/{len(QUESTIONS)}; mean share of tokens up to the first divergence "
            f"{sum(prefixes) / len(prefixes):.2f}"
        )


# -- the stages whose answers come from vLLM, on a tiny random model ---------------------------------


def test_ablate_with_vllm_answers_from_one_exported_checkpoint_per_condition(tiny, engines):
    from refusal_cliff.stages.ablate import run_ablate

    config = AblateConfig(thresholds=(0.25, 0.5), boost_others=2.0)
    generation = GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=2)
    runs = {}
    for name in ("hf", "vllm"):
        out = tiny.root / f"ablate-{name}"
        run_ablate(
            tiny.loaded, tiny.prober, tiny.heads, HARMFUL, out, config, generation, BENIGN,
            progress=False, backend=BackendConfig(backend=name),
        )  # fmt: skip
        runs[name] = out
    assert len(engines) == 5  # the baseline, and per threshold the ranked heads and the boost control

    def answers(out: Path) -> dict:
        rows = read_jsonl(out / "ablation_generations.jsonl")
        return {(r["threshold"], r["control"], r["set"], r["id"]): (r["thinking"], r["answer"]) for r in rows}

    hf, from_vllm = answers(runs["hf"]), answers(runs["vllm"])
    assert len(hf) == 5 * 3 and hf == from_vllm
    baseline = {key[2:]: value for key, value in hf.items() if key[1] == "none"}
    assert any(value != baseline[key[2:]] for key, value in hf.items()), "no condition changed an answer"

    assert engines[0].path == str(tiny.folder)  # the unablated baseline: the model's own folder
    exported = [Path(engine.path) for engine in engines[1:]]
    assert len(set(exported)) == 4
    for folder in exported:
        assert folder.parent == runs["vllm"] and folder.name.startswith(".vllm-checkpoint-")
        assert not folder.exists()
    assert all(engine.shut_down == {"folder_still_there": True} for engine in engines[1:])
    assert _metadata(runs["vllm"])["backend"]["name"] == "vllm"


def test_ablate_components_with_vllm_matches_hf(tiny, engines):
    from refusal_cliff.stages.components import run_ablate_components

    generation = GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=2)
    rows = {}
    for name in ("hf", "vllm"):
        out = tiny.root / f"components-{name}"
        run_ablate_components(
            tiny.loaded, tiny.prober, {"mlp 0 and head 1.3": ["mlp:0", "head:1.3"]}, HARMFUL, out,
            AblateConfig(), generation, progress=False, backend=BackendConfig(backend=name),
        )  # fmt: skip
        rows[name] = [
            (r["condition"], r["id"], r["answer"])
            for r in read_jsonl(out / "component_ablation_generations.jsonl")
        ]
    assert rows["hf"] == rows["vllm"] and len(rows["hf"]) == 4
    assert [Path(e.path).name.startswith(".vllm-checkpoint-") for e in engines] == [False, True]
    assert not Path(engines[1].path).exists()


def test_clip_with_vllm_matches_hf(tiny, engines):
    from refusal_cliff.core.runs import write_jsonl
    from refusal_cliff.stages.clip import run_clip

    config = GenerationConfig(max_thinking_tokens=4, max_answer_tokens=3, batch_size=2)
    generations = tiny.root / "clip-run" / "generations.jsonl"
    write_jsonl(generations, list(generate_records(tiny.loaded, HARMFUL, config, progress=False)))
    clip = ClipConfig(fractions=(0.0, 0.5, 1.0), max_answer_tokens=3, batch_size=2)
    answers = {}
    for name in ("hf", "vllm"):
        out = tiny.root / f"clip-{name}"
        run_clip(tiny.loaded, tiny.prober, generations, out, clip, backend=BackendConfig(backend=name))
        answers[name] = [(r["id"], r["answer"]) for r in read_jsonl(out / "generations.jsonl")]
    assert answers["hf"] == answers["vllm"] and len(answers["hf"]) == 6
    assert [engine.path for engine in engines] == [str(tiny.folder)] and engines[0].shut_down is not None


def test_select_with_vllm_matches_hf(tiny, engines):
    from refusal_cliff.stages.select import ScoreConfig, SelectConfig, run_select

    candidates = [
        {"id": f"c{i}", "prompt": p["prompt"], "response": "I can't help with that."}
        for i, p in enumerate(HARMFUL + BENIGN + HARMFUL)
    ]
    config = ScoreConfig(
        generation=GenerationConfig(max_thinking_tokens=4, max_answer_tokens=3, batch_size=2)
    )
    runs = {}
    for name in ("hf", "vllm"):
        out = tiny.root / f"select-{name}"
        run_select(
            tiny.loaded, tiny.prober, candidates, out, SelectConfig("cliff", "3"), config, progress=False,
            backend=BackendConfig(backend=name),
        )  # fmt: skip
        generations = sorted(
            (r["id"], r["thinking"], r["answer"]) for r in read_jsonl(out / "generations.jsonl")
        )
        scores = sorted((r["id"], r["ms"]) for r in read_jsonl(out / "scores.jsonl"))
        selected = [r["id"] for r in read_jsonl(out / "selection.jsonl")]
        runs[name] = (generations, scores, selected)
    assert runs["hf"] == runs["vllm"] and len(runs["hf"][0]) == len(candidates)
    assert len(engines) == 1 and engines[0].shut_down is not None


def test_evaluate_with_vllm_one_engine_per_model(tiny, engines):
    from refusal_cliff.stages.evaluate import ModelSpec, run_evaluate

    config = EvalConfig(generation=GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=2))
    specs = [ModelSpec("first", str(tiny.folder)), ModelSpec("second", str(tiny.folder))]
    asr = {}
    for name in ("hf", "vllm"):
        out = tiny.root / f"evaluate-{name}"
        run_evaluate(
            specs, {"h": HARMFUL}, {"b": BENIGN}, out, config, load=lambda source: tiny.loaded,
            backend=BackendConfig(backend=name),
        )  # fmt: skip
        asr[name] = [
            [json.loads(line)["answer"] for line in path.read_text().splitlines()]
            for path in sorted((out / "models").glob("*/*.jsonl"))
        ]
    assert asr["hf"] == asr["vllm"] and len(asr["hf"]) == 4
    assert len(engines) == 2 and all(engine.shut_down is not None for engine in engines)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MMLU_PRO = SHARED_DATA / "mmlu_pro"


@pytest.mark.skipif(not (MMLU_PRO / "mmlu_pro_local_biology.yaml").is_file(), reason=f"{MMLU_PRO} is absent")
def test_evaluate_lm_eval_generations_with_vllm_match_hf(smol, engines, tmp_path):
    """A generative lm-eval task (MMLU-Pro biology, chain of thought) answered by the real engine: the
    same generations and the same score as the HF backend."""
    pytest.importorskip("lm_eval", reason="lm-eval is installed by `make setup-vllm`")
    from refusal_cliff.stages.evaluate import run_reasoning_tasks

    config = EvalConfig(
        generation=GenerationConfig(max_thinking_tokens=16, max_answer_tokens=8, batch_size=4),
        tasks=("mmlu_pro_local_biology",),
        task_limit=3,
        task_max_gen_tokens=24,
        task_paths=(str(MMLU_PRO),),
    )
    results = {}
    for name in ("hf", "vllm"):
        with generation_backend(smol, BackendConfig(backend=name)) as backend:
            results[name] = run_reasoning_tasks(smol, ["mmlu_pro_local_biology"], config, backend=backend)
    hf, from_vllm = results["hf"]["mmlu_pro_local_biology"], results["vllm"]["mmlu_pro_local_biology"]
    assert hf["n"] == from_vllm["n"] == 3
    print(f"\n[mmlu_pro_local_biology, n=3] hf {hf['value']} vllm {from_vllm['value']}")
    assert len(engines) == 1 and engines[0].shut_down is not None


@pytest.mark.parametrize("verb", ["ablate", "clip", "evaluate"])
def test_the_verbs_pass_backend_vllm_and_its_settings_to_the_engine(verb, tiny, engines):
    from click.testing import CliRunner

    from refusal_cliff.cli import main
    from refusal_cliff.compute.generation import generate_records
    from refusal_cliff.compute.prober import save_prober
    from refusal_cliff.core.runs import write_jsonl

    save_prober(tiny.prober, tiny.root / "prober")
    prober = str(tiny.root / "prober" / "prober.safetensors")
    prompts = tiny.root / "prompts.csv"
    prompts.write_text("prompt\n" + "".join(p["prompt"] + "\n" for p in HARMFUL))
    generations = tiny.root / "run" / "generations.jsonl"
    config = GenerationConfig(max_thinking_tokens=3, max_answer_tokens=2, batch_size=2)
    write_jsonl(generations, list(generate_records(tiny.loaded, HARMFUL, config, progress=False)))
    model = ["--model", str(tiny.folder), "--device", "cpu"]
    budgets = ["--max-thinking-tokens", "3", "--max-answer-tokens", "2"]
    args = {
        "ablate": [
            *model,
            "--prober",
            prober,
            "--heads",
            str(tiny.heads),
            "--prompts",
            str(prompts),
            *budgets,
        ],
        "clip": [*model, "--prober", prober, "--generations", str(generations), "--max-answer-tokens", "2"],
        "evaluate": ["--model", str(tiny.folder), "--device", "cpu", "--harmful", str(prompts), *budgets],
    }[verb]
    if verb == "ablate":
        args += ["--thresholds", "0.25", "--no-baseline"]
    out = tiny.root / verb
    engine = ["--backend", "vllm", "--gpu-memory-utilization", "0.5", "--max-model-len", "512"]
    result = CliRunner().invoke(main, [verb, *args, *engine, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(engines) == 1 and engines[0].shut_down is not None
    assert (
        engines[0].settings["gpu_memory_utilization"] == 0.5 and engines[0].settings["max_model_len"] == 512
    )
    backend = _metadata(out)["backend"]
    assert backend["name"] == "vllm" and backend["gpu_memory_utilization"] == 0.5


# -- the CLI, as a user runs it: vLLM's default engine process, and quiet -----------------------------


def test_cli_generate_with_vllm_prints_only_progress_and_results(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\n" + "".join(q["prompt"] + "\n" for q in QUESTIONS[:2]))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    result = subprocess.run(
        [
            sys.executable, "-m", "refusal_cliff.cli", "generate", "--model", "default", "--backend", "vllm",
            "--prompts", str(prompts), "--max-thinking-tokens", "8", "--max-answer-tokens", "4",
            "--out", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    noise = [line for line in lines if "WARNING" in line or "INFO" in line and "refusal_cliff" not in line]
    assert not noise, "\n".join(noise[:20])
    assert len(read_jsonl(tmp_path / "run" / "generations.jsonl")) == 2


def test_max_model_len_too_short_is_refused_before_the_engine_starts(tmp_path, engines):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\n" + QUESTIONS[3]["prompt"] + "\n")
    from click.testing import CliRunner

    from refusal_cliff.cli import main

    result = CliRunner().invoke(
        main,
        ["generate", "--model", "default", "--backend", "vllm", "--prompts", str(prompts), "--max-model-len", "32",
         "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code == 2 and "--max-model-len" in result.output
    assert engines == [] and not (tmp_path / "run" / "generations.jsonl").exists()


def test_a_gguf_model_with_vllm_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from refusal_cliff.cli import main

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nhello\n")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--model",
            str(gguf),
            "--backend",
            "vllm",
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and ".gguf" in lines[0]
