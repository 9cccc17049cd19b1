"""Scoring: the model bundle, the Scorer, the compiled forest kernels and the explainer."""
