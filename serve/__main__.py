"""python -m serve: an OpenAI-compatible server for a checkpoint directory, a GGUF file, or a
folder of them.

    python -m serve                      # the real model + its draft when built, else what make run left
    python -m serve --model out/gguf/tinyllama-19m-chat-Q4_K_M.gguf
    python -m serve --model llama-2-7b.Q4_K_M.gguf -md tinyllama-Q4_K_M.gguf --draft-max 4
    python -m serve --model TheBloke/Llama-2-7B-Chat-GGUF:Q4_K_M --model-draft TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF:Q4_K_M
    python -m serve --model out/gguf/tinyllama-19m-chat-Q4_K_M.gguf -md ngram      # prompt lookup
    python -m serve --models-dir out/gguf --api-key sk-local                   # "model": "<file name>"
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "What does len() do?"}]}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(stream or not; max_tokens, temperature, top_p, stop, seed; extensions top_k and
repetition_penalty). Chat prompts are rendered in the model's own chat template
(tinyllama.formats.chat; our Zephyr one for a model without one) and replies stop at its own
end-of-turn ids. With --model-draft, requests are decoded speculatively (exact: the same output
distribution as the target alone), --draft-max tokens a round (default auto).

Continuous batching (--parallel N, default 4): up to N requests decode together, one forward
pass per step for all of them (prompts in chunks between steps, so running streams keep
flowing); the output of each is what it would be alone. With --model-draft, a request speculates
while it is the only one running and decodes plainly in a batch otherwise.

Safe by default: listens on 127.0.0.1 only; bodies over --max-body-bytes get 413, max_tokens
over --max-tokens-limit gets 400, more than --max-queue requests in flight get 429. With
--models-dir a request's `model` must be a name GET /v1/models lists: a file or folder directly
in the folder (no paths, no hidden names, no symlinks out of it). Weights load only from
safetensors or GGUF; nothing is unpickled and no model code is ever run from a checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from tinyllama.errors import UserError
from tinyllama.real_model import default_pair
from tinyllama.runtime import INFERENCE

from .engine import ModelDir, add_model_arguments, check_model_arguments, load_engine


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap, required=False)
    ap.add_argument("--models-dir", metavar="DIR",
                    help="instead of --model: serve every *.gguf file and checkpoint folder directly in DIR, "
                         "picked by the request's 'model' field and loaded on first use")
    ap.add_argument("--max-loaded", type=int, default=2,
                    help="with --models-dir, models kept loaded at once; the least recently used is closed "
                         "first (default: %(default)s)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; 0.0.0.0 exposes the server to the network, so set --api-key "
                         "(default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ endpoints (default: none)")
    ap.add_argument("--parallel", type=int, default=4, metavar="N",
                    help="sequences decoded together (continuous batching, like llama-server -np N): up to N "
                         "requests advance in one forward pass per step, each with its own --ctx-size of KV "
                         "cache; 1: one request at a time (default: %(default)s)")
    ap.add_argument("--max-queue", type=int, default=8,
                    help="requests in flight (running + waiting) before answering 429 (default: %(default)s)")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20,
                    help="largest request body accepted; larger gets 413 (default: %(default)s = 1 MiB)")
    ap.add_argument("--max-tokens-limit", type=int, default=4096,
                    help="largest max_tokens a request may ask for (the context length caps it too); the "
                         "default when a chat request sets none (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.model and args.models_dir:
        ap.error("give exactly one of --model and --models-dir, not both")
    if args.model is None and args.models_dir is None:
        try:
            pair = default_pair().require()
        except UserError as e:
            ap.error(f"no --model or --models-dir, and {e}")
        print(f"no --model: {pair.why}", file=sys.stderr)
        args.model, args.model_draft = str(pair.model), args.model_draft or (str(pair.draft) if pair.draft else None)
    if args.models_dir and args.model_draft:
        ap.error("--model-draft needs --model (one target model)")
    model = check_model_arguments(ap, args, "max_queue", "max_loaded", "max_body_bytes", "max_tokens_limit",
                                  "parallel")

    import uvicorn

    from .server import create_app

    if args.models_dir:
        try:
            models = ModelDir(args.models_dir, max_loaded=args.max_loaded, n_ctx=model.ctx_size, dtype=model.dtype,
                              n_gpu_layers=model.n_gpu_layers, chat_template=model.chat_template,
                              parallel=args.parallel, device=model.device, runtime=model.runtime)
        except FileNotFoundError as e:
            ap.error(str(e))
        if not models.names():
            ap.error(f"{args.models_dir}: no *.gguf files or checkpoint folders (config.json + *.safetensors) in it")
        what = f"{len(models.names())} models in {args.models_dir}; {model.runtime.describe(INFERENCE)}"
    else:
        models = load_engine(args, model)
        if models is None:
            return 2
        what = models.model_id + (f" (draft {args.model_draft}, {models.policy})" if args.model_draft else "")
    print(f"serving {what} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(create_app(models, api_key=args.api_key, max_queue=args.max_queue,
                               max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit),
                    host=args.host, port=args.port, log_level="warning")
    finally:
        models.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
