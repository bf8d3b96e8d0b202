"""Built-in model ids (`core.models.BUILTIN_MODELS`): a stage registers an id, and every verb loads it
like a local folder, made on first use; checks before loading never make it."""

from __future__ import annotations

import pytest

from refusal_cliff.cli.options import model_n_layers
from refusal_cliff.compute.executors import worker_model
from refusal_cliff.core import models
from refusal_cliff.core.config import ModelConfig
from refusal_cliff.core.errors import UserError


@pytest.fixture
def planted(monkeypatch, tiny_model_dir):
    """A built-in id `planted-test` whose folder is the tiny model, counting how often it was made."""
    made = []

    def folder():
        made.append(1)
        return tiny_model_dir

    state = {"cached": None}
    model = models.BuiltinModel("planted-test", "a test model", folder, lambda: state["cached"])
    monkeypatch.setitem(models.BUILTIN_MODELS, model.name, model)  # the one registry every layer reads
    return made, state


def test_a_builtin_id_loads_its_folder_made_on_first_use(planted, tiny_model_dir):
    made, _ = planted
    loaded = models.load_model("planted-test", device="cpu")
    assert made == [1] and loaded.source == "planted-test" and loaded.model_id == str(tiny_model_dir)


def test_checks_before_loading_never_make_a_builtin_model(planted, tiny_model_dir):
    made, state = planted
    assert model_n_layers(ModelConfig(model="planted-test")) is None and made == []
    state["cached"] = tiny_model_dir
    assert model_n_layers(ModelConfig(model="planted-test")) == 2 and made == []


def test_ray_workers_load_the_builtin_folder(planted, tiny_model_dir):
    loaded = models.load_model("planted-test", device="cpu")
    assert worker_model(ModelConfig(model="planted-test"), loaded).model == str(tiny_model_dir)


def test_ids_are_unique_and_misspellings_are_named(planted):
    for taken in ("default", "planted-test"):
        with pytest.raises(ValueError, match="taken"):
            models.register_builtin_model(models.BuiltinModel(taken, "", lambda: None, lambda: None))
    with pytest.raises(UserError, match=r"did you mean 'planted-test' \(a test model\)"):
        models.load_model("planted-tset", device="cpu")
