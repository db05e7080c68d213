"""serve: a loaded model (and draft) behind one engine, the OpenAI-compatible HTTP server over
it, and a terminal client.

    python -m serve --model out/gguf/tinyllama-19m-chat-Q4_K_M.gguf       # http://127.0.0.1:8000/v1
    python -m serve.complete --model out/sft --prompt "What does len() do?" --chat
"""
