"""MLflow tracking and registry: client, quality gate, aliases, model cache, pyfunc flavour."""
