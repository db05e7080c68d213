"""The Gradio chat app over the shared streaming generator (serve.engine.Engine).

    app = build_app(Engine.load("out/gguf/tinyllama-19m-chat-Q4_K_M.gguf", draft=...))
    app.launch(server_name="127.0.0.1")

Replies stream token by token through the one chat format (tinyllama.formats.chat), with a system
prompt, temperature / top-p / max tokens, stop and clear buttons, and a speculative-decoding
toggle (when a draft is loaded) whose live stats show tokens/s, drafted and accepted tokens,
the acceptance rate and the speedup against the last plain reply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from serve.engine import Engine
from tinyllama.errors import UserError
from tinyllama.inference.generate import SamplingParams

DEFAULTS = SamplingParams()        # the one default: greedy

DEFAULT_SYSTEM = "You are a helpful assistant who answers questions about Python."


def model_info(path: str | os.PathLike | None, name: str | None = None) -> str:
    """One Markdown line: name (default: the file's), preset/parameters, quantization, file size."""
    if not path:
        return ""
    path = Path(path)
    name = name or path.name
    if path.suffix == ".gguf":
        from tinyllama.formats.gguf_file import open_gguf

        reader = open_gguf(path)
        params = sum(int(t.n_elements) for t in reader.tensors)
        types = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in ("F32",)})
        return (f"`{name}`: {params / 1e6:,.1f}M parameters, llama.cpp, {'/'.join(types) or 'F32'} weights, "
                f"{path.stat().st_size / 1e6:,.1f} MB")
    from tinyllama.formats.checkpoint import load_config

    cfg = load_config(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return f"`{name}`: {cfg.name}, {cfg.num_params() / 1e6:,.1f}M parameters, PyTorch, {size / 1e6:,.1f} MB"


def message_text(content: Any) -> str | None:
    """A chat message's text: Gradio 6 sends content as [{"type": "text", "text": ...}, ...]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(parts) if parts else None
    return None


def stats_markdown(stats, speculative: bool, last_plain_tps: float | None, done: bool = True) -> str:
    line = ("" if done else "generating · ") + f"**{stats.tokens_per_s:.1f} tok/s**, {stats.generated_tokens} tokens"
    if speculative and stats.drafted:
        line += (f" · speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted "
                 f"(α {stats.acceptance_rate:.2f}), {stats.target_calls} target passes, "
                 f"k {stats.drafted / max(1, stats.draft_rounds):.1f} a round over {stats.draft_rounds} rounds")
        if last_plain_tps:
            line += f" · speedup vs last plain reply: {stats.tokens_per_s / last_plain_tps:.2f}x"
    elif speculative:         # `auto` k judged plain steps faster for this whole reply
        line += " · speculative: no tokens drafted (auto k: plain decoding is faster here)"
    else:
        line += " · plain decoding"
    return line


def build_app(engine: Engine, model_path: str | None = None, draft_path: str | None = None,
              draft_error: str | None = None) -> gr.Blocks:
    has_draft = engine.draft is not None
    state = {"last_plain_tps": None}

    def respond(message: str, history: list[dict], system: str, temperature: float, top_p: float,
                max_tokens: int, speculative: bool) -> Iterator[tuple[Any, ...]]:
        history = list(history or [])
        if not message or not message.strip():
            raise gr.Error("Type a message first.")
        messages = ([{"role": "system", "content": system.strip()}] if system and system.strip() else [])
        messages += [{"role": m["role"], "content": message_text(m.get("content"))} for m in history
                     if m.get("role") in ("user", "assistant") and message_text(m.get("content"))]
        messages.append({"role": "user", "content": message.strip()})
        use_draft = bool(speculative and has_draft)
        try:
            sampling = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature),
                                      top_p=float(top_p))
            stream = engine.chat(messages, sampling, speculative=use_draft)
        except (UserError, ValueError) as e:
            raise gr.Error(str(e)) from None
        history = history + [{"role": "user", "content": message.strip()}, {"role": "assistant", "content": ""}]
        yield history, "", "generating..."
        try:
            with engine.lock:
                for delta in stream:
                    history[-1] = {"role": "assistant", "content": history[-1]["content"] + delta}
                    yield history, "", stats_markdown(stream.stats, use_draft, state["last_plain_tps"], done=False)
        except Exception as e:               # shown in the page, not a traceback
            raise gr.Error(f"generation failed: {type(e).__name__}: {e}") from None
        if not use_draft and stream.stats.generated_tokens:
            state["last_plain_tps"] = stream.stats.tokens_per_s
        yield history, "", stats_markdown(stream.stats, use_draft, state["last_plain_tps"])

    with gr.Blocks(title="TinyLlama chat") as app:
        gr.Markdown("## TinyLlama chat")
        gr.Markdown(f"Model: {model_info(model_path, engine.model_id) or engine.model_id}" +
                    (f"  \nDraft: {model_info(draft_path, engine.draft.name) or engine.draft.name}" if has_draft else
                     f"  \n**{draft_error}**; speculative decoding is off." if draft_error else
                     "  \nNo draft model loaded (`--model-draft`): speculative decoding is off."), elem_id="model-info")
        chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot")
        with gr.Row():
            box = gr.Textbox(placeholder="Ask about a Python built-in, e.g. What does `len()` do?", show_label=False,
                             scale=6, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        stats = gr.Markdown("", elem_id="stats")
        with gr.Accordion("Settings", open=True):
            system = gr.Textbox(value=DEFAULT_SYSTEM, label="System prompt", elem_id="system")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=DEFAULTS.temperature, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 512, value=128, step=1, label="Max new tokens")
            speculative = gr.Checkbox(value=has_draft, interactive=has_draft, elem_id="speculative",
                                      label="Speculative decoding (the draft proposes, the target verifies)")
        inputs = [box, chatbot, system, temperature, top_p, max_tokens, speculative]
        outputs = [chatbot, box, stats]
        ev1 = send.click(respond, inputs, outputs, api_name="chat")
        ev2 = box.submit(respond, inputs, outputs, api_name=False)
        stop.click(None, None, None, cancels=[ev1, ev2])
        clear.click(lambda: ([], "", ""), None, outputs, api_name=False)
    return app
