"""The pipeline: what imgprep does, with no Celery, kombu, redis, worker or tasks imports.

Features, each over those it builds on (import-linter's layers contract): guest (guest
filesystems) · rbd (the rbd backend) · disks (instance disks) · cache (the shared image cache) ·
formats (image formats and conversions) · core (what every feature shares: errors, wire models,
the lock and progress ports, runner, paths, publishing, disk.info). Each feature declares the
ports it needs in its own `ports.py`; no module imports back into a cycle.
"""
