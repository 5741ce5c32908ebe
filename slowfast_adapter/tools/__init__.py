"""Tools around the library: FLOP counting, training-memory estimates, tiny random models for tests and demos."""
