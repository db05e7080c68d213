"""The Gradio demo through gradio_client: streamed replies built with the chat format, the
speculative toggle and its stats, errors shown instead of tracebacks."""

from __future__ import annotations

import socket

import pytest
import torch

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from demo.app import DEFAULT_SYSTEM, build_app, message_text  # noqa: E402
from serve.engine import Engine  # noqa: E402
from tinyllama import Llama, ModelConfig  # noqa: E402
from tinyllama.inference.backends import TorchBackend  # noqa: E402
from tinyllama.inference.draft_policy import Fixed  # noqa: E402
from tinyllama.formats.chat import encode_chat  # noqa: E402
from tinyllama.inference.generate import generate  # noqa: E402

SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def demo(llama2_tokenizer):
    cfg = ModelConfig.from_name("tinyllama-debug")
    torch.manual_seed(0)
    target = Llama(cfg).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(30)
    draft = Llama(cfg).eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.1)
    # a fixed k: this draft is as large as its target, so `auto` would (rightly) decode plainly and
    # the stats under test would show no drafted tokens
    engine = Engine(TorchBackend(target, llama2_tokenizer), llama2_tokenizer, "tiny",
                    draft=TorchBackend(draft, llama2_tokenizer), draft_policy=Fixed(2))
    app = build_app(engine).queue(default_concurrency_limit=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield engine, f"http://127.0.0.1:{port}/"
    app.close()


def expected_reply(engine, tok, question: str, max_tokens: int, system: str = SYSTEM) -> str:
    ids, _ = encode_chat(tok, [{"role": "system", "content": system}, {"role": "user", "content": question}],
                         add_generation_prompt=True)
    out = list(generate(engine.target, ids, max_new_tokens=max_tokens, stop_ids=[tok.eos_id]))
    return tok.decode([i for i in out if i != tok.eos_id])


def chat(url: str, message: str, history, speculative: bool, max_tokens: int = 16):
    client = gradio_client.Client(url, verbose=False)
    job = client.submit(message, history, SYSTEM, 0.0, 1.0, max_tokens, speculative, api_name="/chat")
    updates = list(job)
    return updates, job.result()          # raises the app's gr.Error as the client's AppError


def test_streamed_reply_uses_the_chat_format(demo, llama2_tokenizer):
    engine, url = demo
    question = "What does `len()` do?"
    updates, (history, box, stats) = chat(url, question, [], speculative=False)
    assert history[-2]["role"] == "user" and message_text(history[-2]["content"]) == question
    assert message_text(history[-1]["content"]) == expected_reply(engine, llama2_tokenizer, question, 16)
    assert len(updates) > 2                                   # streamed, not one final message
    assert "tok/s" in stats and "plain decoding" in stats and box == ""


def test_speculative_toggle_shows_stats_and_same_greedy_reply(demo, llama2_tokenizer):
    engine, url = demo
    question = "Tell me about `sorted()`."
    _, (plain_history, _, _) = chat(url, question, [], speculative=False)
    _, (history, _, stats) = chat(url, question, [], speculative=True)
    assert message_text(history[-1]["content"]) == message_text(plain_history[-1]["content"])
    assert "drafted tokens accepted (α " in stats and "speedup vs last plain reply" in stats


def test_history_is_kept_and_empty_messages_are_refused(demo):
    _, url = demo
    _, (history, _, _) = chat(url, "Hi", [], speculative=False, max_tokens=4)
    _, (history2, _, _) = chat(url, "And then?", history, speculative=False, max_tokens=4)
    assert [m["role"] for m in history2] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(Exception, match="Type a message first"):
        chat(url, "   ", [], speculative=False)


# ---- a real browser ------------------------------------------------------------------------------------

def _browser():
    """Headless Debian Chromium driven by Selenium, or a skip saying what is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is installed by make setup")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium here: `make test` installs Debian's chromium + chromium-driver when it runs "
                    "as root with apt-get (scripts/browser_packages.sh)")
    import tempfile

    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1400", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_chat_in_a_real_browser(demo, llama2_tokenizer):
    from pathlib import Path

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine, url = demo
    browser = _browser()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#message textarea"))
        stats = lambda b: b.find_element(By.ID, "stats").text  # noqa: E731
        # speculative decoding is on by default when a draft is loaded
        box.send_keys("What does `len()` do?")
        browser.find_element(By.ID, "send").click()
        # a reply is finished when its stats lose the "generating" mark (a click on Send while
        # one streams is ignored by Gradio)
        wait.until(lambda b: "drafted tokens accepted" in stats(b) and not stats(b).startswith("generating"))
        # the reply as rendered (Markdown may drop symbols of a random model's text): compare letters
        reply = expected_reply(engine, llama2_tokenizer, "What does `len()` do?", 128, system=DEFAULT_SYSTEM)

        def letters(text: str) -> str:
            return "".join(ch for ch in text if ch.isalnum())

        assert len(letters(reply)) > 10
        wait.until(lambda b: letters(reply)[:12] in letters(b.find_element(By.ID, "chatbot").text))
        # switch it off: the next reply is plain decoding
        browser.find_element(By.CSS_SELECTOR, "#speculative input[type=checkbox]").click()
        box = browser.find_element(By.CSS_SELECTOR, "#message textarea")
        box.send_keys("And `sorted()`?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: "plain decoding" in stats(b) and not stats(b).startswith("generating"))
        out = Path(__file__).resolve().parents[1] / "test-output"
        out.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(out / "demo-chat.png"))
        assert (out / "demo-chat.png").stat().st_size > 10_000
    finally:
        browser.quit()


# ---- errors ----------------------------------------------------------------------------------------------

def test_mismatched_draft_is_shown_not_raised(llama2_tokenizer, small_config):
    torch.manual_seed(0)
    target = TorchBackend(Llama(ModelConfig.from_name("tinyllama-debug")).eval(), llama2_tokenizer)
    other = TorchBackend(Llama(small_config).eval())                  # 320 tokens, not 32000
    with pytest.raises(ValueError, match="320 tokens but target"):
        Engine(target, llama2_tokenizer, "tiny", draft=other)
    app = build_app(Engine(target, llama2_tokenizer, "tiny"), draft_error="draft d.gguf not used: 320 tokens")
    texts = [getattr(b, "value", "") for b in app.blocks.values()]
    assert any(isinstance(t, str) and "draft d.gguf not used" in t for t in texts)
    checkbox = next(b for b in app.blocks.values() if isinstance(b, gr.Checkbox))
    assert checkbox.value is False and checkbox.interactive is False


def test_cli_refuses_a_missing_model(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "demo", "--model", str(tmp_path / "nope.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope.gguf: no such file or directory" in r.stderr


def test_stats_say_when_auto_drafted_nothing():
    from demo.app import stats_markdown
    from tinyllama.inference.generate import GenerationStats

    stats = GenerationStats(generated_tokens=12, decode_seconds=0.5)
    assert "no tokens drafted" in stats_markdown(stats, speculative=True, last_plain_tps=None)
    assert stats_markdown(stats, speculative=False, last_plain_tps=None).endswith("plain decoding")


def test_default_pair_prefers_the_real_model_with_its_draft(tmp_path, monkeypatch):
    """What the demo and the server open without --model, as the files appear one by one."""
    from tinyllama import real_model

    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"

    def touch(path, size=1):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)                      # sparse: the real model is recognised by its size

    pair = real_model.default_pair(out)
    assert (pair.model, pair.draft) == (out / real_model.LIFECYCLE_MODEL, None) and "make real-model" in pair.why
    touch(out / real_model.LIFECYCLE_MODEL)
    touch(out / real_model.LIFECYCLE_DRAFT)
    assert real_model.default_pair(out).draft == out / real_model.LIFECYCLE_DRAFT
    real = real_model.models_dir() / real_model.GGUF_NAME
    touch(real, real_model.GGUF_BYTES)
    pair = real_model.default_pair(out)
    assert pair.model == out / real_model.LIFECYCLE_MODEL and f"make draft TARGET={real}" in pair.why
    touch(real_model.draft_path(out))
    pair = real_model.default_pair(out)
    assert (pair.model, pair.draft) == (real, real_model.draft_path(out)) and "the real model" in pair.why
    (out / real_model.LIFECYCLE_MODEL).unlink()
    real_model.draft_path(out).unlink()
    assert (real_model.default_pair(out).model, real_model.default_pair(out).draft) == (real, None)


def test_draft_recipe_and_default_pair_agree_on_where_the_real_models_draft_lives(tmp_path):
    from tinyllama import real_model
    from tinyllama_lifecycle.draft import default_out

    target = real_model.models_dir() / real_model.GGUF_NAME
    assert default_out(str(target), tmp_path / "out") / "gguf" / "draft-Q8_0.gguf" == real_model.draft_path(tmp_path / "out")
