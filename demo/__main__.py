"""python -m demo: the Gradio chat app (make demo).

    python -m demo                              # the real model + its draft, else what `make run` left
    python -m demo --model out/sft --model-draft out/draft/sft --draft-max 4
    python -m demo --model out/sft -md ngram                    # prompt lookup: no draft model
    python -m demo --model llama-2-7b-chat.Q4_K_M.gguf -md out/gguf/tinyllama-debug-chat-Q8_0.gguf
    python -m demo --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --no-draft            # from the hub
    python -m demo --model TheBloke/Llama-2-7B-Chat-GGUF:Q4_K_M -md TinyLlama/TinyLlama-1.1B-Chat-v1.0

Each model chats in its own template (Llama-2's [INST], TinyLlama's Zephyr, ...).

Binds 127.0.0.1:7860 ($GRADIO_SERVER_NAME and $GRADIO_SERVER_PORT change the defaults, as in any
Gradio app); `--share` asks Gradio for a public link (off by default).
"""

from __future__ import annotations

import argparse
import os
import sys

from tinyllama.cli import MODEL_HELP, ModelArgs, add_draft_model_flag, add_model_args
from tinyllama.errors import UserError, report
from tinyllama.inference.draft_policy import add_draft_policy_flags, draft_policy_of
from tinyllama.real_model import default_pair

DEFAULT_WHY = ("the real model SmolLM2-135M-Instruct with the draft `make draft TARGET=...` built for it, "
               "when both are here; else what `make run` left, out/gguf/tinyllama-19m-chat-Q4_K_M.gguf")


def gradio_address(env=os.environ) -> tuple[str, int]:
    """The host and port Gradio itself would default to: $GRADIO_SERVER_NAME, $GRADIO_SERVER_PORT,
    else 127.0.0.1:7860 (only this machine: --host 0.0.0.0 exposes the demo)."""
    port = env.get("GRADIO_SERVER_PORT", "7860").strip()
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"GRADIO_SERVER_PORT={port!r}: expected a port number (1-65535)")
    return env.get("GRADIO_SERVER_NAME", "").strip() or "127.0.0.1", int(port)


def build_parser(host: str = "127.0.0.1", port: int = 7860) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, required=False, help=f"{MODEL_HELP} (default: {DEFAULT_WHY})")
    add_draft_model_flag(ap, "draft model for speculative decoding, any form --model takes, or ngram[:N] for "
                             "prompt lookup (no draft model) (default without --model: the default model's draft)")
    ap.add_argument("--no-draft", action="store_true", help="no draft even if the default one exists")
    add_draft_policy_flags(ap)
    ap.add_argument("--host", default=host, help="($GRADIO_SERVER_NAME; default: %(default)s)")
    ap.add_argument("--port", type=int, default=port, help="($GRADIO_SERVER_PORT; default: %(default)s)")
    ap.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        ap = build_parser(*gradio_address())
        args = ap.parse_args(argv)
        chosen = ModelArgs.from_namespace(args)
    except UserError as e:
        return report(e)
    model, draft = args.model, args.model_draft
    if model is None:
        try:
            pair = default_pair().require()
        except UserError as e:
            return report(e)
        print(f"no --model: {pair.why}", file=sys.stderr)
        model, draft = str(pair.model), draft or (str(pair.draft) if pair.draft else None)
    draft = None if args.no_draft else draft
    policy = draft_policy_of(args)

    from serve.engine import Engine, describe

    from .app import build_app

    options = {"n_ctx": chosen.ctx_size, "dtype": chosen.dtype, "n_gpu_layers": chosen.n_gpu_layers,
               "revision": chosen.revision, "chat_template": chosen.chat_template, "device": chosen.device,
               "runtime": chosen.runtime}
    draft_error = None
    try:
        try:
            engine = Engine.load(model, draft, policy, **options)
        except (UserError, ImportError) as e:
            if draft is None:
                raise
            # the chat still works without the draft: say why in the page, not in a traceback
            engine = Engine.load(model, None, policy, **options)
            draft_error, draft = f"draft {draft} not used: {e}", None
    except (UserError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    describe(engine, chosen.runtime)
    if draft_error:
        print(f"warning: {draft_error}", file=sys.stderr)
    print(f"chat with {engine.model_id}" + (f", drafted by {draft}" if draft else "") +
          f" at http://{args.host}:{args.port}", flush=True)
    draft_path = engine.draft.path if engine.draft else None
    build_app(engine, engine.target.path, draft_path, draft_error).queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
