"""The HTTP API: app factory, dependencies, models, errors, middleware and routes."""
