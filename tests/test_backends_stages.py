"""`--backend vllm` for the answers of `ablate`, `clip` and `evaluate`: the missing extra, the wiring, metadata.

vLLM itself runs only on GPU hosts with the `vllm` extra. Here a fake `vllm` module stands in for it
(`fake_vllm`): its `LLM(model=PATH)` loads the Hugging Face checkpoint at PATH with transformers and
its `generate` decodes greedily with that model, returning objects shaped like vLLM's `RequestOutput`.
It tests the WIRING only (which checkpoint each engine loads, that the answers go through it, that
engines are shut down and the temporary checkpoints removed), not vLLM's kernels or its numerics.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import BackendConfig, GenerationConfig
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.stages.ablate import AblateConfig
from refusal_cliff.stages.clip import ClipConfig
from refusal_cliff.stages.evaluate import EvalConfig

from conftest import make_tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
HARMFUL = [{"id": "h1", "prompt": "How do I pick a lock?"}, {"id": "h2", "prompt": "Make a weapon."}]
BENIGN = [{"id": "b1", "prompt": "Name a fruit."}]


# -- a fake vLLM: the HF checkpoint at PATH, decoded greedily (wiring only) --------------------------


class FakeLLM:
    """`vllm.LLM` for wiring tests: loads the HF checkpoint at `model` with transformers; `generate` decodes
    each request greedily with it (no KV cache, no batching) and honours `max_tokens`, `stop` (kept in the
    text) and `stop_token_ids`, as vLLM's offline engine does. Every engine is recorded in `started`."""

    started: list[FakeLLM] = []

    def __init__(self, model, tokenizer=None, dtype="auto", **settings):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path, self.settings, self.shut_down = str(model), settings, None
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=torch_dtype, attn_implementation="eager"
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.path)
        FakeLLM.started.append(self)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def _one(self, prompt_ids: list[int], params) -> SimpleNamespace:
        assert params.temperature == 0.0, "the fake engine decodes greedily only"
        new: list[int] = []
        finish, stop_reason, text = "length", None, ""
        for _ in range(params.max_tokens):
            logits = self.model(torch.tensor([prompt_ids + new])).logits[0, -1]  # [vocab]
            new.append(int(logits.argmax()))
            if new[-1] in params.stop_token_ids:  # EOS: not part of the text
                finish, text = "stop", self._decode(new[:-1])
                break
            text = self._decode(new)
            hit = next((stop for stop in params.stop if stop in text), None)
            if hit is not None:
                finish, stop_reason, text = "stop", hit, text.split(hit, 1)[0] + hit
                break
        output = SimpleNamespace(text=text, token_ids=new, finish_reason=finish, stop_reason=stop_reason)
        return SimpleNamespace(outputs=[output])

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        assert self.shut_down is None, "generate on an engine that was shut down"
        return [self._one(list(p["prompt_token_ids"]), sp) for p, sp in zip(prompts, sampling_params)]

    def shutdown(self):
        self.shut_down = {"folder_still_there": Path(self.path).is_dir()}


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module in sys.modules whose `LLM` is `FakeLLM`; returns the list of engines started."""
    module = types.ModuleType("vllm")
    module.__version__ = "0.0-fake"
    module.LLM = FakeLLM
    module.SamplingParams = SimpleNamespace
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(FakeLLM, "started", [])
    return FakeLLM.started


# -- a tiny model folder, a prober, heads.json ---------------------------------------------------------


@pytest.fixture
def tiny(tmp_path, smol_tokenizer):
    """A tiny random Llama saved as a local folder and loaded from it, a prober, and a heads.json."""
    from refusal_cliff.compute.prober import Prober

    folder = tmp_path / "model"
    model = make_tiny_model("LlamaForCausalLM")
    model.generation_config.pad_token_id = smol_tokenizer.pad_token_id
    model.save_pretrained(str(folder))
    smol_tokenizer.save_pretrained(str(folder))
    loaded = LoadedModel(model, smol_tokenizer, get_adapter(model), str(folder), None, "local")
    prober = Prober(
        torch.nn.Linear(64, 1),
        layer=1,
        metadata={"architecture": "LlamaForCausalLM", "n_layers": 2, "final_norm_applied": True},
    )
    ranking = [{"layer": i // 4, "head": i % 4, "rank": 7 - i} for i in range(8)]  # (1, 3) ranks first
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps(ranking))
    return SimpleNamespace(folder=folder, loaded=loaded, prober=prober, heads=heads, root=tmp_path)


def _metadata(folder: Path) -> dict:
    return json.loads((folder / "metadata.json").read_text())


# -- ablate ------------------------------------------------------------------------------------------


def test_ablate_with_vllm_answers_from_one_exported_checkpoint_per_condition(tiny, fake_vllm):
    """The vLLM answers of every condition equal the HF answers under the hooks, so each exported
    checkpoint is that condition's ablated model; each lived in its own temporary folder inside the run
    folder, was loaded by one engine, and was removed after that engine was shut down."""
    from refusal_cliff.core.runs import read_jsonl
    from refusal_cliff.stages.ablate import run_ablate

    config = AblateConfig(thresholds=(0.25, 0.5), boost_others=2.0)
    generation = GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=2)
    runs = {}
    for name in ("hf", "vllm"):
        out = tiny.root / f"ablate-{name}"
        run_ablate(
            tiny.loaded,
            tiny.prober,
            tiny.heads,
            HARMFUL,
            out,
            config,
            generation,
            BENIGN,
            progress=False,
            backend=BackendConfig(backend=name),
        )
        runs[name] = out
    assert len(fake_vllm) == 5  # the baseline, and per threshold the ranked heads and the boost control

    def answers(out: Path) -> dict:
        rows = read_jsonl(out / "ablation_generations.jsonl")
        return {(r["threshold"], r["control"], r["set"], r["id"]): (r["thinking"], r["answer"]) for r in rows}

    hf, vllm = answers(runs["hf"]), answers(runs["vllm"])
    assert len(hf) == 5 * 3 and hf == vllm
    baseline = {key[2:]: value for key, value in hf.items() if key[1] == "none"}
    assert any(value != baseline[key[2:]] for key, value in hf.items()), "no condition changed an answer"
    hf_records = json.loads((runs["hf"] / "ablation.json").read_text())
    vllm_records = json.loads((runs["vllm"] / "ablation.json").read_text())
    assert [r["final_score_mean"] for r in hf_records] == [r["final_score_mean"] for r in vllm_records]

    assert fake_vllm[0].path == str(tiny.folder)  # the unablated baseline: the model's own folder
    exported = [Path(engine.path) for engine in fake_vllm[1:]]
    assert len(set(exported)) == 4
    for folder in exported:
        assert folder.parent == runs["vllm"] and folder.name.startswith(".vllm-checkpoint-")
        assert not folder.exists()
    assert all(engine.shut_down == {"folder_still_there": True} for engine in fake_vllm[1:])
    assert not list(runs["vllm"].glob(".vllm-checkpoint-*"))

    assert _metadata(runs["vllm"])["backend"]["name"] == "vllm"
    assert _metadata(runs["vllm"])["config"]["backend"] == "vllm"
    assert (
        _metadata(runs["hf"])["backend"]["name"] == "hf" and "backend" not in _metadata(runs["hf"])["config"]
    )


def test_ablate_components_with_vllm_matches_hf(tiny, fake_vllm):
    from refusal_cliff.core.runs import read_jsonl
    from refusal_cliff.stages.components import run_ablate_components

    generation = GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=2)
    rows = {}
    stale = tiny.root / "components-vllm" / ".vllm-checkpoint-killed"  # what a killed run leaves
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    for name in ("hf", "vllm"):
        out = tiny.root / f"components-{name}"
        run_ablate_components(
            tiny.loaded,
            tiny.prober,
            {"mlp 0 and head 1.3": ["mlp:0", "head:1.3"]},
            HARMFUL,
            out,
            AblateConfig(),
            generation,
            progress=False,
            backend=BackendConfig(backend=name),
        )
        rows[name] = [
            (r["condition"], r["id"], r["answer"])
            for r in read_jsonl(out / "component_ablation_generations.jsonl")
        ]
    assert rows["hf"] == rows["vllm"] and len(rows["hf"]) == 4
    assert [Path(e.path).name.startswith(".vllm-checkpoint-") for e in fake_vllm] == [False, True]
    assert not Path(fake_vllm[1].path).exists() and not stale.exists()
    assert _metadata(tiny.root / "components-vllm")["backend"]["name"] == "vllm"


def test_boost_control_folds_into_the_weights(tiny, tmp_path):
    """The boost control (heads × γ, every other head × factor) exported equals the hooks, which vLLM needs."""
    from transformers import AutoModelForCausalLM

    from refusal_cliff.compute.ablation import export_ablated_model, scale_heads

    inputs = {"input_ids": torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(1))}
    model = tiny.loaded.model
    with torch.no_grad():
        original = model(**inputs).logits
        with scale_heads(tiny.loaded, [(1, 3), (0, 2)], gamma=0.0, boost_others=2.0):
            hooked = model(**inputs).logits
    out = export_ablated_model(tiny.loaded, [(1, 3), (0, 2)], 0.0, tmp_path / "boosted", boost_others=2.0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, original, rtol=0, atol=0)  # restored
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
        torch.testing.assert_close(reloaded(**inputs).logits, hooked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, original)


def test_renormalize_with_vllm_is_refused_before_the_run_folder(tiny):
    from refusal_cliff.core.errors import UserError
    from refusal_cliff.stages.ablate import run_ablate

    out = tiny.root / "never"
    with pytest.raises(UserError, match="--renormalize"):
        run_ablate(
            tiny.loaded,
            tiny.prober,
            tiny.heads,
            HARMFUL,
            out,
            AblateConfig(thresholds=(0.25,), renormalize=True),
            backend=BackendConfig(backend="vllm"),
        )
    assert not out.exists()


# -- clip and evaluate ---------------------------------------------------------------------------------


def test_clip_with_vllm_matches_hf(tiny, fake_vllm):
    from refusal_cliff.compute.generation import generate_records
    from refusal_cliff.core.runs import read_jsonl, write_jsonl
    from refusal_cliff.stages.clip import run_clip

    config = GenerationConfig(max_thinking_tokens=4, max_answer_tokens=3, batch_size=2)
    generations = tiny.root / "run" / "generations.jsonl"
    write_jsonl(generations, list(generate_records(tiny.loaded, HARMFUL, config, progress=False)))
    clip = ClipConfig(fractions=(0.0, 0.5, 1.0), max_answer_tokens=3, batch_size=2)
    answers = {}
    for name in ("hf", "vllm"):
        out = tiny.root / f"clip-{name}"
        run_clip(tiny.loaded, tiny.prober, generations, out, clip, backend=BackendConfig(backend=name))
        answers[name] = [(r["id"], r["answer"]) for r in read_jsonl(out / "generations.jsonl")]
    assert answers["hf"] == answers["vllm"] and len(answers["hf"]) == 6
    assert [engine.path for engine in fake_vllm] == [str(tiny.folder)]
    assert fake_vllm[0].shut_down is not None  # before the trace
    assert _metadata(tiny.root / "clip-vllm")["backend"]["name"] == "vllm"
    assert _metadata(tiny.root / "clip-hf")["backend"]["name"] == "hf"


def test_evaluate_with_vllm_one_engine_per_model(tiny, fake_vllm):
    from refusal_cliff.stages.evaluate import ModelSpec, run_evaluate

    config = EvalConfig(generation=GenerationConfig(max_thinking_tokens=3, max_answer_tokens=3, batch_size=2))
    specs = [ModelSpec("first", str(tiny.folder)), ModelSpec("second", str(tiny.folder))]
    asr = {}
    for name in ("hf", "vllm"):
        out = tiny.root / f"evaluate-{name}"
        run_evaluate(
            specs,
            {"h": HARMFUL},
            {"b": BENIGN},
            out,
            config,
            load=lambda source: tiny.loaded,
            backend=BackendConfig(backend=name),
        )
        asr[name] = [
            [json.loads(line)["answer"] for line in path.read_text().splitlines()]
            for path in sorted((out / "models").glob("*/*.jsonl"))
        ]
    assert asr["hf"] == asr["vllm"] and len(asr["hf"]) == 4
    assert len(fake_vllm) == 2 and all(engine.shut_down is not None for engine in fake_vllm)
    assert _metadata(tiny.root / "evaluate-vllm")["backend"]["name"] == "vllm"
    assert _metadata(tiny.root / "evaluate-hf")["backend"]["name"] == "hf"


# -- the missing extra: one line, exit 2, nothing written ----------------------------------------------


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.skipif(_vllm_installed(), reason="vLLM is installed: the missing-extra message cannot be shown")
@pytest.mark.parametrize("verb", ["ablate", "clip", "evaluate"])
def test_backend_vllm_without_vllm_is_one_line_exit_2(verb, tmp_path, tiny_model_dir):
    prober = tmp_path / "prober.safetensors"
    prober.write_bytes(b"not read")
    heads = tmp_path / "heads.json"
    heads.write_text("[]")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nhello\n")
    generations = tmp_path / "generations.jsonl"
    generations.write_text('{"id": "1"}\n')
    model = str(tiny_model_dir)
    args = {
        "ablate": [
            "--model",
            model,
            "--prober",
            str(prober),
            "--heads",
            str(heads),
            "--prompts",
            str(prompts),
        ],
        "clip": ["--model", model, "--prober", str(prober), "--generations", str(generations)],
        "evaluate": ["--model", model, "--harmful", str(prompts)],
    }[verb]
    out = tmp_path / "run"
    (out / "models" / "m").mkdir(parents=True)
    (out / "metadata.json").write_text('{"stage": "earlier"}\n')
    (out / "ablation.json").write_text("[]\n")
    (out / "models" / "m" / "result.json").write_text("{}\n")
    before = _digests(out)
    result = subprocess.run(
        [sys.executable, "-m", "refusal_cliff.cli", verb, *args, "--out", str(out), "--backend", "vllm"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "pip install 'refusal-cliff[vllm]'" in result.stderr
    assert _digests(out) == before


@pytest.mark.parametrize("verb", ["ablate", "clip", "evaluate"])
def test_the_verbs_pass_backend_vllm_and_its_settings_to_the_engine(verb, tiny, fake_vllm):
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
    assert len(fake_vllm) == 1 and fake_vllm[0].shut_down is not None
    assert (
        fake_vllm[0].settings["gpu_memory_utilization"] == 0.5
        and fake_vllm[0].settings["max_model_len"] == 512
    )
    backend = _metadata(out)["backend"]
    assert backend["name"] == "vllm" and backend["gpu_memory_utilization"] == 0.5
