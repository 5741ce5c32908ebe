"""Training: video reading, LLaVA-format data, recipes and the accelerate training loop (the `[train]` extra)."""
