"""Serving: an OpenAI-compatible chat-completions server on the inference engine (the `[serve]` extra: FastAPI,
uvicorn; Ray Serve for `--ray`). `slowfast-adapter serve --base BASE --adapter DIR`; see docs/guides/serving.md."""
