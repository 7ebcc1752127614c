"""Retrieval evaluation internals: caches, per-setting features, ranking, ablation, shape re-rankers."""
