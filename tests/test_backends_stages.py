"""`--backend vllm` for the answers of `ablate`, `clip` and `evaluate`, where no engine is needed: the
missing vLLM environment, what cannot be folded into a checkpoint, and the folding itself.

The stages' answers from a real vLLM engine (vLLM's CPU build, `make setup-vllm`) are tested in
`tests/test_vllm_engine.py`, which `make test` runs in .venv-vllm.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from refusal_cliff.core.architectures import get_adapter
from refusal_cliff.core.config import BackendConfig
from refusal_cliff.core.models import LoadedModel
from refusal_cliff.stages.ablate import AblateConfig

from conftest import make_tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
HARMFUL = [{"id": "h1", "prompt": "How do I pick a lock?"}, {"id": "h2", "prompt": "Make a weapon."}]
BENIGN = [{"id": "b1", "prompt": "Name a fruit."}]


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
    assert result.stderr.strip().count("\n") == 0 and "make setup-vllm" in result.stderr
    assert _digests(out) == before
