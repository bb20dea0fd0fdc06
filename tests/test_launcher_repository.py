"""The served model repository: only the named models are copied, and relative model paths are made
absolute (the stub runs in another working directory)."""

import json

import pytest

from pagetron.backend.serving.launcher import LaunchError, prepare_model_repository


def test_only_the_named_models_and_absolute_model_paths(tmp_path, monkeypatch):
    model = tmp_path / "weights"
    model.mkdir()
    monkeypatch.chdir(tmp_path)
    repo = prepare_model_repository(tmp_path / "repo", {"model": "weights", "tokenizer": "not-a-path"})
    assert sorted(p.name for p in repo.iterdir()) == ["llm"]
    args = json.loads((repo / "llm" / "1" / "engine_args.json").read_text())
    assert args["model"] == str(model.resolve()) and args["tokenizer"] == "not-a-path"
    both = prepare_model_repository(tmp_path / "repo2", {}, models=("llm", "embed"))
    assert sorted(p.name for p in both.iterdir()) == ["embed", "llm"]


def test_unknown_or_missing_llm_model_is_refused(tmp_path):
    with pytest.raises(LaunchError, match="must hold model 'llm'"):
        prepare_model_repository(tmp_path / "r", {}, models=("embed",))
    with pytest.raises(LaunchError, match="'nope' not found"):
        prepare_model_repository(tmp_path / "r", {}, models=("llm", "nope"))
