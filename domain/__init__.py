"""The pipeline: what imgprep does, with no Celery, kombu, redis, worker or tasks imports.

core: errors, wire models, ports, runner, paths, publishing · cache: the shared image cache ·
formats: image formats and conversions · disks: instance disks · guest: guest filesystems.
"""
