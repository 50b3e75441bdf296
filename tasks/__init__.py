"""The Celery edge: one module per task, named as the task (tasks.steps, tasks.operations), and
the canvases. Each task parses its arguments, calls one domain function and returns its result."""
