"""Adapter files and the Hub: the folder format, atomic file writing, Hub transfers, model cards, and saving and
loading a wrapped model's adapters."""
