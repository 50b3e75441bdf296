"""The pipeline: domain steps (no Celery), their thin tasks (tasks.steps), wire models, errors."""
