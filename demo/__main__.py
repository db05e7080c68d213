"""python -m demo: the Gradio chat app (make demo).

    python -m demo                              # what `make run` left: the chat GGUF + its draft
    python -m demo --model out/sft --model-draft out/draft/sft --draft-max 4
    python -m demo --model out/sft -md ngram                    # prompt lookup: no draft model
    python -m demo --model llama-2-7b-chat.Q4_K_M.gguf -md out/gguf/tinyllama-debug-chat-Q8_0.gguf
    python -m demo --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --no-draft            # from the hub
    python -m demo --model TheBloke/Llama-2-7B-Chat-GGUF:Q4_K_M -md TinyLlama/TinyLlama-1.1B-Chat-v1.0

Each model chats in its own template (Llama-2's [INST], TinyLlama's Zephyr, ...).

Binds 127.0.0.1:7860; `--share` asks Gradio for a public link (off by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyllama.cli import CHAT_TEMPLATE_HELP, MODEL_HELP, add_draft_model_flag
from tinyllama.devices import DEVICE_HELP
from tinyllama.inference.draft_policy import add_draft_policy_flags, draft_policy_of

DEFAULT_MODEL = Path("out/gguf/tinyllama-19m-chat-Q4_K_M.gguf")
DEFAULT_DRAFT = Path("out/gguf/tinyllama-debug-chat-Q8_0.gguf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    ap.add_argument("--revision", help="hub revision of --model (default: main)")
    add_draft_model_flag(ap, "draft model for speculative decoding, any form --model takes, or ngram[:N] for "
                             f"prompt lookup (no draft model) (default: {DEFAULT_DRAFT} when it exists)")
    ap.add_argument("--chat-template", metavar="NAME|FILE", help=CHAT_TEMPLATE_HELP)
    ap.add_argument("--no-draft", action="store_true", help="no draft even if the default one exists")
    add_draft_policy_flags(ap)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype of checkpoint directories; auto: bf16 only where a timed bf16 matmul "
                         "decodes faster here (default: %(default)s)")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    ap.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    ap.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    args = ap.parse_args(argv)
    model = args.model or str(DEFAULT_MODEL)
    draft = None if args.no_draft else (args.model_draft or (str(DEFAULT_DRAFT) if DEFAULT_DRAFT.exists() else None))
    policy = draft_policy_of(args)
    if args.model is None and not DEFAULT_MODEL.exists():
        print(f"error: {model}: no such model (run `make run` first, or pass --model)", file=sys.stderr)
        return 2

    from serve.engine import Engine, describe
    from tinyllama.errors import UserError

    from .app import build_app

    draft_error = None
    try:
        try:
            engine = Engine.load(model, draft, policy, dtype=args.dtype, revision=args.revision,
                                 chat_template=args.chat_template, device=args.device)
        except (UserError, ImportError) as e:
            if draft is None:
                raise
            # the chat still works without the draft: say why in the page, not in a traceback
            engine = Engine.load(model, None, policy, dtype=args.dtype, revision=args.revision,
                                 chat_template=args.chat_template, device=args.device)
            draft_error, draft = f"draft {draft} not used: {e}", None
    except (UserError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    describe(engine)
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
