"""The Gradio chat app (not built yet)."""
