"""python -m serve: an OpenAI-compatible server for a checkpoint directory or a GGUF file.

    python -m serve --model out/gguf/tinyllama-19m-chat-Q4_K_M.gguf            # make serve
    python -m serve --model llama-2-7b.Q4_K_M.gguf --draft tinyllama-Q4_K_M.gguf --num-draft 4
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "What does len() do?"}]}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(stream or not; max_tokens, temperature, top_p, stop, seed; extensions top_k and
repetition_penalty). Chat prompts use the model's chat format (tinyllama.chat). With --draft,
every request is decoded speculatively (exact: the same output distribution as the target alone).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (PyTorch) or .gguf file (llama.cpp)")
    ap.add_argument("--draft", help="a draft model with the same vocabulary, for speculative decoding")
    ap.add_argument("--num-draft", type=int, default=4, help="tokens drafted per step (default: %(default)s)")
    ap.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    ap.add_argument("--max-queue", type=int, default=8,
                    help="requests in flight (running + waiting) before answering 429 (default: %(default)s)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context length for GGUF models (default: %(default)s)")
    args = ap.parse_args(argv)

    import uvicorn

    from tinyllama.checkpoint import CheckpointError

    from .engine import Engine
    from .server import create_app

    try:
        engine = Engine.load(args.model, args.draft, args.num_draft, n_ctx=args.n_ctx)
    except (FileNotFoundError, ValueError, CheckpointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {engine.model_id}" + (f" (draft {args.draft}, k={args.num_draft})" if args.draft else "")
          + f" on http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(create_app(engine, api_key=args.api_key, max_queue=args.max_queue), host=args.host,
                    port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
