"""Orchestration, the only layer that combines the others: train, retrain, monitor, batch, Spark, inspect."""
