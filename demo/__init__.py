"""demo: the Gradio chat app (python -m demo), over serve.engine.Engine and tinyllama.inference.generate."""
