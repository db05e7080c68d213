"""The server's model folder (--models-dir: serving, loading on demand, evicting) and its CLI
option checks. The HTTP bad-input cases themselves run in tests/test_bad_input.py."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from serve.engine import ModelDir, ModelSource  # noqa: E402
from serve.server import OneModel, create_app  # noqa: E402


@pytest.mark.dtype_auto
def test_models_dir_lists_loads_on_demand_and_evicts(tmp_path, tiny_chat_checkpoint):
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b"):
        shutil.copytree(tiny_chat_checkpoint, models / name)
    folder = ModelDir(models, max_loaded=1)
    assert isinstance(folder, ModelSource) and issubclass(OneModel, ModelSource)    # what create_app serves
    with TestClient(create_app(folder)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["a", "b"]
        assert client.get("/health").json()["models"] == []
        for name in ("a", "b", "a"):
            r = client.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 3,
                                                      "temperature": 0})
            assert r.status_code == 200 and r.json()["model"] == name
            assert client.get("/health").json()["models"] == [name]          # the other one was closed
        listed = {m["id"]: m.get("context_length") for m in client.get("/v1/models").json()["data"]}
        assert listed == {"a": 256, "b": None}                                 # known once loaded
        # interleaved requests for both: each loads under the generation lock, none is closed under a
        # request that holds it, and afterwards only max_loaded stay
        from concurrent.futures import ThreadPoolExecutor

        def ask(name):
            return client.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 4}).status_code

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(ask, ["a", "b"] * 3)) == [200] * 6
        assert len(client.get("/health").json()["models"]) == 1
        shutil.copytree(tiny_chat_checkpoint, models / "c")                               # new files are seen
        assert "c" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    folder.close()


def test_cli_options_are_checked(tmp_path, capsys, monkeypatch):
    from serve.__main__ import main

    monkeypatch.chdir(tmp_path)                                   # no out/ here, and no real model in this cache
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path / "cache"))
    for argv, message in [([], "no --model or --models-dir, and no default model: out/gguf/tinyllama-19m-chat"),
                          (["--model", "x", "--models-dir", "y"], "exactly one of"),
                          (["--models-dir", str(tmp_path / "nope")], "not a directory"),
                          (["--models-dir", str(tmp_path)], "no *.gguf files or checkpoint folders"),
                          (["--models-dir", str(tmp_path), "--model-draft", "d"], "--model-draft needs --model"),
                          (["--models-dir", str(tmp_path), "--draft", "d"], "--model-draft needs --model"),
                          (["--model", "x", "--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
                          (["--model", "x", "--ctx-size", "0"], "--ctx-size must be >= 1"),
                          (["--model", "x", "--n-ctx", "0"], "--ctx-size must be >= 1")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
