"""Model references and chat templates, offline against a hub cache in huggingface_hub's own
layout (tests/hub_cache.py): every reference form through every stage's CLI, each model chatting
in its own template with ids equal to transformers', and each bad reference's clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hub_cache import add_dir, add_repo
from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint
from tinyllama.formats.chat import (
    BUILTIN_TEMPLATES,
    CHAT_TEMPLATE,
    ChatFormatError,
    apply_chat_template,
    render_template,
    template_of,
)
from tinyllama.errors import NotFound, UserError
from tinyllama.formats.hub import HubError, _pick_quant, _quant_of, resolve_model

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
LLAMA2 = (TEMPLATES / "llama-2-chat.jinja").read_text()
TINYLLAMA = (TEMPLATES / "tinyllama-1.1b-chat-v1.0.jinja").read_text()
CHATML = (TEMPLATES / "chatml.jinja").read_text()

CONVERSATIONS = [
    [{"role": "user", "content": "What does len() do?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": " And 3+3?\n"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  spaced  "},
     {"role": "user", "content": "new\n\nlines  "}],
]


def with_template(src: Path, dst: Path, template: str | None, eos_ids=None) -> Path:
    """A copy of checkpoint `src` whose tokenizer_config.json carries `template` (None: none)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if eos_ids is not None:
        (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return dst


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_chat_checkpoint):
    """HF_HOME with: acme/tiny-chat (no template: the Zephyr fallback), acme/llama2-chat (Llama-2's
    template, generation_config eos [2, 7]), acme/tiny-chat-GGUF (F16 + Q8_0 of llama2-chat),
    acme/draft (another random tinyllama-debug), acme/bin-only (pickles only)."""
    pytest.importorskip("llama_cpp", reason="the hub's Q8_0 file is quantized by llama.cpp (built by make setup)")
    from quantize.export import quantize_gguf, write_gguf

    root = tmp_path_factory.mktemp("hub")
    home = root / "hf"
    plain = with_template(tiny_chat_checkpoint, root / "plain", None)
    llama2 = with_template(tiny_chat_checkpoint, root / "llama2", LLAMA2, eos_ids=[2, 7])
    add_dir(home, "acme/tiny-chat", plain)
    add_dir(home, "acme/llama2-chat", llama2)
    f32 = write_gguf(llama2, root / "m.F32.gguf", "f32", name="llama2-chat")
    write_gguf(llama2, root / "llama2-chat.F16.gguf", "f16", name="llama2-chat")
    quantize_gguf(f32, root / "llama2-chat.Q8_0.gguf", "q8_0")
    add_repo(home, "acme/tiny-chat-GGUF", {"llama2-chat.F16.gguf": root / "llama2-chat.F16.gguf",
                                           "llama2-chat.Q8_0.gguf": root / "llama2-chat.Q8_0.gguf",
                                           "README.md": b"# GGUFs\n"})
    torch.manual_seed(1)
    tok = Tokenizer.from_dir(plain)
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug")), tok, root / "draft")
    add_dir(home, "acme/draft", root / "draft")
    # as TheBloke's Llama-2-chat GGUFs: converted before templates were stored, so none inside
    write_gguf(plain, root / "llama-2-7b-chat.Q8_0.gguf", "f32", name="LLaMA v2")
    add_repo(home, "acme/Llama-2-7B-Chat-GGUF", {"llama-2-7b-chat.Q8_0.gguf": root / "llama-2-7b-chat.Q8_0.gguf"})
    add_repo(home, "acme/bin-only", {"config.json": (plain / "config.json"), "pytorch_model.bin": b"pickle"})
    return home


@pytest.fixture
def offline_hub(hub, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hub


# ---- resolving references ---------------------------------------------------------------------

def test_every_reference_form_resolves(offline_hub, tiny_chat_checkpoint):
    local = resolve_model(tiny_chat_checkpoint)
    assert (local.kind, local.path, local.repo) == ("checkpoint", tiny_chat_checkpoint, None)
    ckpt = resolve_model("acme/llama2-chat")
    assert ckpt.kind == "checkpoint" and ckpt.name == "acme/llama2-chat" and (ckpt.path / "config.json").is_file()
    assert "models--acme--llama2-chat/snapshots/" in str(ckpt.path)
    assert resolve_model("acme/llama2-chat@main").path == ckpt.path == resolve_model("acme/llama2-chat",
                                                                                     revision="main").path
    q8 = resolve_model("acme/tiny-chat-GGUF:q8_0")           # the quant type, case-insensitive
    assert q8.kind == "gguf" and q8.path.name == "llama2-chat.Q8_0.gguf" and q8.name == "acme/tiny-chat-GGUF:Q8_0"
    assert resolve_model("acme/tiny-chat-GGUF:F16").path.name == "llama2-chat.F16.gguf"
    by_file = resolve_model("acme/tiny-chat-GGUF/llama2-chat.Q8_0.gguf")
    assert by_file.path.read_bytes()[:4] == b"GGUF" and by_file.path.resolve() == q8.path.resolve()
    assert resolve_model(q8.path).kind == "gguf"               # and the cached file as a plain path


@pytest.mark.parametrize("ref, kinds, message", [
    ("acme/nothing", ("checkpoint", "gguf"), "HF_HUB_OFFLINE=1 with nothing cached for acme/nothing"),
    ("acme/tiny-chat@v9", ("checkpoint", "gguf"), "nothing cached for acme/tiny-chat@v9"),
    ("acme/tiny-chat-GGUF:Q4_K_M", ("gguf",), "no GGUF of type Q4_K_M in the repo; GGUF types there (those cached): "
                                              "F16, Q8_0"),
    ("acme/tiny-chat-GGUF", ("checkpoint",), "a GGUF repository, not a checkpoint; name a quant type as "
                                             "acme/tiny-chat-GGUF:TYPE (here: F16, Q8_0)"),
    ("acme/tiny-chat-GGUF/other.gguf", ("gguf",), "nothing cached for acme/tiny-chat-GGUF/other.gguf"),
    ("acme/bin-only", ("checkpoint",), "only PyTorch pickle weights (.bin), which are never loaded"),
    ("acme/tiny-chat-GGUF:Q8_0", ("checkpoint",), "is a GGUF file; this needs an HF-format model directory"),
    ("acme/tiny-chat", ("gguf",), "is a checkpoint directory; this needs a .gguf"),
    ("./missing", ("checkpoint",), "./missing: no such file or directory"),
    ("a/b/c", ("checkpoint",), "a/b/c: no such file or directory (nor a Hugging Face hub reference"),
])
def test_bad_references_are_named(offline_hub, ref, kinds, message):
    with pytest.raises(UserError) as e:
        resolve_model(ref, kinds=kinds, flag="--base")
    assert str(e.value).startswith(f"--base {ref}") and message in str(e.value)


def test_hub_errors_become_one_line_each(offline_hub, monkeypatch):
    """Gated and unknown repos, as huggingface_hub raises them online, named with the fix."""
    import httpx2
    from huggingface_hub import errors

    import tinyllama.formats.hub as hub_module

    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/meta/x"))
    for error, message in [(errors.GatedRepoError("gated", response=response), "gated repository; accept its licence"
                            " on https://huggingface.co/meta/x and set HF_TOKEN"),
                           (errors.RepositoryNotFoundError("404", response=response), "no model repository meta/x "
                            "on the hub (or it is private: set HF_TOKEN)")]:
        def fail(*a, error=error, **k):
            raise error
        monkeypatch.setattr(hub_module, "_fetch", fail)
        with pytest.raises(HubError) as e:
            resolve_model("meta/x")
        assert str(e.value).startswith("--model meta/x: ") and message in str(e.value)


def test_an_unreachable_hub_falls_back_to_the_cache(offline_hub, monkeypatch, capsys):
    """Online but cut off (a connection error, no HTTP answer): the cached snapshot, with a warning."""
    import httpx2
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*a, **k):
        raise httpx2.ConnectError("Name or service not known")
    monkeypatch.setattr(HfApi, "list_repo_files", unreachable)
    assert resolve_model("acme/llama2-chat").kind == "checkpoint"
    assert "the hub could not be reached" in capsys.readouterr().err
    with pytest.raises(HubError, match="the hub could not be reached with nothing cached for acme/nothing"):
        resolve_model("acme/nothing")


def test_quant_type_matching_and_split_files():
    assert _quant_of("llama-2-7b-chat.Q4_K_M.gguf") == "Q4_K_M"
    assert _quant_of("tinyllama-1.1b-chat-v1.0.IQ3_M.gguf") == "IQ3_M"
    assert _quant_of("model-bf16-00001-of-00002.gguf") == "BF16"
    files = ["a.Q4_K.gguf", "a.Q4_K_M.gguf", "big.Q8_0-00002-of-00002.gguf", "big.Q8_0-00001-of-00002.gguf"]
    assert _pick_quant(files, "q4_k", "r", False) == ["a.Q4_K.gguf"]            # Q4_K is not Q4_K_M
    assert _pick_quant(files, "Q8_0", "r", False) == ["big.Q8_0-00001-of-00002.gguf", "big.Q8_0-00002-of-00002.gguf"]
    with pytest.raises(HubError, match="2 GGUF files carry Q4_K_M"):
        _pick_quant(["a.Q4_K_M.gguf", "b.Q4_K_M.gguf"], "Q4_K_M", "r", False)


# ---- each model's own chat template -------------------------------------------------------------

@pytest.mark.parametrize("template", [LLAMA2, TINYLLAMA, CHATML, CHAT_TEMPLATE],
                         ids=["llama-2-chat", "tinyllama-chat-v1.0", "chatml", "ours-zephyr"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_ids_equal_transformers_apply_chat_template(template, generation_prompt, tiny_chat_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    d = with_template(tiny_chat_checkpoint, tmp_path / "m", template)
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    for messages in CONVERSATIONS:           # with and without a system turn, one and several turns
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert apply_chat_template(ours, messages, add_generation_prompt=generation_prompt) == expected


def test_llama2_prompt_layout_and_stop_ids(tiny_chat_checkpoint, tmp_path):
    tok = Tokenizer.from_dir(with_template(tiny_chat_checkpoint, tmp_path / "m", LLAMA2, eos_ids=[2, 7]))
    ids = apply_chat_template(tok, CONVERSATIONS[1])
    # "<s>[INST] <<SYS>>\n..." with BOS per user turn and "</s>" closing the assistant's
    assert ids[:4] == [1, 518, 25580, 29962] and ids.count(1) == 2 and ids.count(2) == 1
    assert tok.decode(ids, skip_special=False).startswith("<s> [INST] <<SYS>>\nYou are terse.\n<</SYS>>")
    assert tok.stop_ids == (2, 7)
    assert template_of(tok)[1].startswith("Llama-2 [INST], the model's own")


def test_template_sources_as_transformers_reads_them(tiny_chat_checkpoint, tmp_path):
    jinja = with_template(tiny_chat_checkpoint, tmp_path / "jinja", None)
    (jinja / "chat_template.jinja").write_text(CHATML)               # transformers >= 4.43 writes this file
    assert Tokenizer.from_dir(jinja).chat_template == CHATML
    named = with_template(tiny_chat_checkpoint, tmp_path / "named",
                          [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA2}])
    assert Tokenizer.from_dir(named).chat_template == LLAMA2
    none = Tokenizer.from_dir(with_template(tiny_chat_checkpoint, tmp_path / "none", None))
    assert none.chat_template is None and template_of(none) == (CHAT_TEMPLATE, template_of(none)[1])
    assert "built-in Zephyr" in template_of(none)[1]


def test_builtin_templates_and_overrides(tiny_chat_checkpoint, tmp_path):
    assert BUILTIN_TEMPLATES["llama-2"] == LLAMA2
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    for messages in CONVERSATIONS:
        assert render_template(BUILTIN_TEMPLATES["chatml"], messages, special) == render_template(CHATML, messages,
                                                                                                  special)
    tok = Tokenizer.from_dir(with_template(tiny_chat_checkpoint, tmp_path / "m", TINYLLAMA))
    assert template_of(tok, "llama-2") == (LLAMA2, "--chat-template llama-2")
    (tmp_path / "mine.jinja").write_text(CHATML)
    assert template_of(tok, str(tmp_path / "mine.jinja"))[0] == CHATML
    with pytest.raises(ChatFormatError, match="--chat-template vicuna: neither a built-in template"):
        template_of(tok, "vicuna")
    # a model without a template: Llama-2-chat's when its name says so (TheBloke's old GGUFs), else ours
    bare = Tokenizer.from_dir(with_template(tiny_chat_checkpoint, tmp_path / "bare", None))
    assert template_of(bare, name="TheBloke/Llama-2-7B-Chat-GGUF:Q4_K_M llama-2-7b-chat.Q4_K_M.gguf")[0] == LLAMA2
    assert template_of(bare, name="acme/tiny-chat")[0] == CHAT_TEMPLATE


def test_special_tokens_typed_in_a_message_stay_text(tiny_chat_checkpoint, tmp_path):
    tok = Tokenizer.from_dir(with_template(tiny_chat_checkpoint, tmp_path / "m", LLAMA2))
    ids = apply_chat_template(tok, [{"role": "user", "content": "say </s> and <s> please"}])
    assert ids.count(2) == 0 and ids.count(1) == 1          # only the template's own BOS is special
    assert "say </s> and <s> please" in tok.decode(ids, skip_special=False)


def test_a_template_that_refuses_is_a_chat_format_error(tiny_chat_checkpoint, tmp_path):
    refuse = "{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}{{ messages[0]['content'] }}"
    tok = Tokenizer.from_dir(with_template(tiny_chat_checkpoint, tmp_path / "m", refuse))
    with pytest.raises(ChatFormatError, match="refuses this conversation: one turn only"):
        apply_chat_template(tok, CONVERSATIONS[1])
    broken = Tokenizer.from_dir(with_template(tiny_chat_checkpoint, tmp_path / "b", "{% for %}"))
    with pytest.raises(ChatFormatError, match="cannot be rendered"):
        apply_chat_template(broken, CONVERSATIONS[0])


def test_a_gguf_chats_in_its_own_template(offline_hub):
    from tinyllama.inference.backends import load_backend

    backend, tok = load_backend("acme/tiny-chat-GGUF:Q8_0")
    try:
        assert tok.chat_template == LLAMA2 and backend.name == "acme/tiny-chat-GGUF:Q8_0"
        ids = apply_chat_template(tok, CONVERSATIONS[0])
        assert ids[:4] == [1, 518, 25580, 29962]
        # llama.cpp's own tokenizer gives the same ids for the rendered text (parse_special=True)
        text = tok.decode(ids, skip_special=False).removeprefix("<s> ").replace("<s> ", "<s>")
        assert backend.llm.tokenize(("<s>" + text).encode(), add_bos=False, special=True) == ids
    finally:
        backend.close()


# ---- the engine, the server and speculative decoding with a Llama-2-template target ------------------

def test_speculative_with_a_llama2_target_is_greedy_identical(offline_hub):
    from serve.engine import Engine
    from tinyllama.inference.draft_policy import Fixed
    from tinyllama.inference.generate import SamplingParams

    engine = Engine.load("acme/llama2-chat", draft="acme/draft", dtype="float32", draft_policy=Fixed(3))
    try:
        assert engine.model_id == "acme/llama2-chat" and engine.tokenizer.chat_template == LLAMA2
        s = SamplingParams(max_new_tokens=24)
        plain = engine.chat(CONVERSATIONS[1], s, speculative=False)
        plain_text = "".join(plain)
        spec = engine.chat(CONVERSATIONS[1], s, speculative=True)
        assert "".join(spec) == plain_text and spec.stats.drafted > 0
        assert plain.stats.prompt_tokens == len(apply_chat_template(engine.tokenizer, CONVERSATIONS[1]))
    finally:
        engine.close()


def test_an_old_llama2_chat_gguf_without_a_template_chats_as_llama2(offline_hub, capsys):
    from serve.complete import main
    from serve.engine import Engine

    engine = Engine.load("acme/Llama-2-7B-Chat-GGUF:Q8_0")
    try:
        assert engine.tokenizer.chat_template is None and engine.template == LLAMA2
        assert "says Llama-2 chat" in engine.template_origin
    finally:
        engine.close()
    assert main(["--model", "acme/Llama-2-7B-Chat-GGUF:Q8_0", "--chat-template", "chatml", "--prompt", "Hi", "--chat",
                 "--max-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "chat template: --chat-template chatml" in err and "prompt tokens" in err


def test_server_usage_counts_the_templates_prompt(offline_hub):
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from serve.engine import Engine
    from serve.server import create_app

    engine = Engine.load("acme/tiny-chat-GGUF:Q8_0", dtype="float32")
    try:
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/chat/completions", json={"messages": CONVERSATIONS[1], "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert client.get("/v1/models").json()["data"][0]["id"] == "acme/tiny-chat-GGUF:Q8_0"
    finally:
        engine.close()
    hf = AutoTokenizer.from_pretrained(str(resolve_model("acme/llama2-chat").path))
    expected = hf.apply_chat_template(CONVERSATIONS[1], tokenize=True, add_generation_prompt=True)
    assert r.json()["usage"]["prompt_tokens"] == len(expected["input_ids"] if hasattr(expected, "keys") else expected)


# ---- every stage's CLI takes every form -----------------------------------------------------------

@pytest.mark.dtype_auto
@pytest.mark.parametrize("model, draft", [
    ("acme/llama2-chat", None),
    ("acme/tiny-chat-GGUF:Q8_0", "acme/draft"),
    ("acme/tiny-chat-GGUF/llama2-chat.F16.gguf", "acme/tiny-chat-GGUF:Q8_0"),
])
def test_complete_cli(offline_hub, capsys, model, draft):
    from serve.complete import main

    argv = ["--model", model, "--prompt", "Hi", "--chat", "--max-tokens", "3"] + (["--model-draft", draft] if draft else [])
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"model: {model.split('/llama2')[0] + ':F16' if model.endswith('.gguf') else model}:" in err
    assert "chat template: Llama-2 [INST], the model's own" in err


def test_serve_cli_refuses_a_bad_reference_with_one_line(offline_hub, capsys):
    from serve.__main__ import main

    assert main(["--model", "acme/tiny-chat-GGUF:Q2_K"]) == 2
    err = capsys.readouterr().err
    assert "error: --model acme/tiny-chat-GGUF:Q2_K: no GGUF of type Q2_K" in err and "Traceback" not in err


def test_quantize_cli_from_a_hub_id(offline_hub, tmp_path, capsys):
    from quantize.__main__ import main

    assert main(["--model", "acme/llama2-chat", "--type", "f16", "--out", str(tmp_path / "m.gguf"), "--no-verify"]) == 0
    from tinyllama.formats.gguf_file import gguf_value, open_gguf

    assert gguf_value(open_gguf(tmp_path / "m.gguf"), "tokenizer.chat_template") == LLAMA2
    assert main(["--model", "acme/tiny-chat-GGUF:Q8_0", "--type", "f16", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "this needs an HF-format model directory" in capsys.readouterr().err


@pytest.mark.dtype_auto
def test_sft_and_distill_clis_from_hub_ids(offline_hub, tmp_path, capsys):
    from sft.__main__ import main as sft_main
    from sft.distill import main as distill_main

    assert distill_main(["--teacher", "acme/tiny-chat-GGUF:Q8_0", "--out", str(tmp_path / "d.jsonl"), "--limit", "2",
                         "--max-new-tokens", "4", "--no-progress"]) == 0
    assert "teacher: acme/tiny-chat-GGUF:Q8_0" in capsys.readouterr().out
    assert sft_main(["--base", "acme/llama2-chat", "--out", str(tmp_path / "chat"), "--max-steps", "1",
                     "--no-progress", "--method", "lora"]) == 0
    summary = json.loads((tmp_path / "chat" / "sft_summary.json").read_text())
    adapter = json.loads((tmp_path / "chat" / "adapter" / "adapter_config.json").read_text())
    assert summary["base"] == "acme/llama2-chat" == adapter["base_model_name_or_path"]
    # SFT trains and writes the base model's own template (Llama-2's here), not ours
    assert Tokenizer.from_dir(tmp_path / "chat").chat_template == LLAMA2


@pytest.mark.dtype_auto
def test_eval_and_demo_take_hub_references(offline_hub, capsys):
    from demo.app import build_app
    from evaluation.__main__ import main as eval_main
    from serve.engine import Engine

    assert eval_main(["--model", "acme/llama2-chat", "acme/tiny-chat-GGUF:Q8_0", "--tasks", "none"]) == 0
    out = capsys.readouterr().out
    assert "acme/llama2-chat" in out and "acme/tiny-chat-GGUF:Q8_0" in out
    engine = Engine.load("acme/tiny-chat-GGUF:Q8_0", draft="acme/draft")
    try:
        app = build_app(engine, engine.target.path, engine.draft.path)
        info = [c for c in app.config["components"] if c.get("props", {}).get("elem_id") == "model-info"][0]
        assert "`acme/tiny-chat-GGUF:Q8_0`" in info["props"]["value"] and "`acme/draft`" in info["props"]["value"]
    finally:
        engine.close()


def test_demo_cli_names_a_missing_default_and_a_bad_hub_reference(offline_hub, capsys):
    from demo.__main__ import main

    assert main(["--model", "acme/nothing"]) == 2
    assert "--model acme/nothing: no such local path, and HF_HUB_OFFLINE=1" in capsys.readouterr().err


def test_not_found_is_still_a_file_not_found_error(offline_hub):
    with pytest.raises(NotFound):
        resolve_model("/no/such/model")
