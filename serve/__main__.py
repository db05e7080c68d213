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

from .engine import add_model_arguments, load_engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    ap.add_argument("--max-queue", type=int, default=8,
                    help="requests in flight (running + waiting) before answering 429 (default: %(default)s)")
    args = ap.parse_args(argv)

    import uvicorn

    from .server import create_app

    engine = load_engine(args)
    if engine is None:
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
