"""Shared fixtures: seeded RNGs, tiny random models of every supported architecture, the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ARCHITECTURES = [
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
]

# The families the head-level identities are checked on: (architecture, make_tiny_model overrides);
# Llama with attention_bias gives o_proj a bias.
CORE = [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"attention_bias": True}),
    ("Qwen2ForCausalLM", {}),
    ("Qwen3ForCausalLM", {}),
]
CORE_IDS = ["llama", "llama-bias", "qwen2", "qwen3"]


def tiny_config(architecture: str, vocab_size: int = 49152, **overrides):
    """A 2-layer, hidden-64 config with grouped KV heads (4 query heads, 2 KV heads)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "MistralForCausalLM": transformers.MistralConfig,
        "Phi3ForCausalLM": transformers.Phi3Config,
        "Gemma2ForCausalLM": transformers.Gemma2Config,
        "Gemma3ForCausalLM": transformers.Gemma3TextConfig,
    }[architecture]
    if architecture == "Phi3ForCausalLM":
        common.pop("head_dim")
    common.update(overrides)
    config = config_class(**common)
    config.architectures = [architecture]
    return config


def make_tiny_model(architecture: str, seed: int = 0, vocab_size: int = 49152, **overrides):
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(architecture, vocab_size=vocab_size, **overrides)
    config._attn_implementation = "eager"
    model = getattr(transformers, architecture)(config).eval()
    model.requires_grad_(False)
    return model


SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """`refusal-cliff ARGS` in a fresh process (one torch thread), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "refusal_cliff.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on the loopback address, shared by one module's tests."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'refusal-cliff[ray]')")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_debug_from_an_earlier_test(monkeypatch):
    """`--debug` sets REFUSAL_CLIFF_DEBUG in os.environ for the library (one command per process in real
    use); in-process CLI tests would otherwise leak it into every later test and its subprocesses, which
    then show tracebacks instead of one-line errors."""
    # setenv, not delenv: delenv of an absent variable records nothing to undo, so a value set during the
    # test would outlive it; setenv's undo removes it
    monkeypatch.setenv("REFUSAL_CLIFF_DEBUG", "")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def non_strict_metadata(folder: Path) -> list[str]:
    """Every `metadata*.json` under `folder` that a strict JSON parser refuses (a bare NaN or Infinity)."""
    bad = []
    for path in sorted(folder.rglob("metadata*.json")) if folder.is_dir() else ():
        try:
            json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
        except (ValueError, OSError) as exc:
            bad.append(f"{path}: {exc}")
    return bad


@pytest.fixture(autouse=True)
def _metadata_is_strict_json(request):
    """Every metadata.json a test writes under its tmp_path is strict JSON (no NaN, no Infinity)."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if folder is not None:
        bad = non_strict_metadata(folder)
        assert not bad, "metadata.json is not strict JSON:\n" + "\n".join(bad)


def pytest_sessionfinish(session, exitstatus):
    """The same check over every folder of the session (tmp_path_factory's too): a failure fails the run."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or getattr(factory, "_basetemp", None) is None:
        return
    bad = non_strict_metadata(factory.getbasetemp())
    if bad:
        sys.stderr.write("metadata.json is not strict JSON:\n" + "\n".join(bad) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def smol_checkpoint():
    """Folder of the embedded SmolLM2 checkpoint (converted from GGUF on first use)."""
    from refusal_cliff.core.models import embedded_checkpoint

    return embedded_checkpoint()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_checkpoint))
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def smol_model(smol_checkpoint):
    from refusal_cliff.core.models import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A saved tiny random Llama with the SmolLM2 tokenizer: a local model folder for CLI tests."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("LlamaForCausalLM").save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder
