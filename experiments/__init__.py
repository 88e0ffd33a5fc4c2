"""The jobs: pre-training, zero-shot, MMR and benchmarks (importable: notebooks and tests import them)."""
