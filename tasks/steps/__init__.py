"""Thin Celery tasks, one module per step: parse the models, call one domain function, dump."""
