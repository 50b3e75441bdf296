"""The runtime: Celery app, settings, logging, Redis locks, CLI and client."""
