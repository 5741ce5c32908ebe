"""The core: shared data types, the transformers and PEFT fences, pooling, hybrid attention, per-call state,
encode-once reuse and the per-frame attention maps. Imports nothing above itself (see tests/test_layering.py)."""
