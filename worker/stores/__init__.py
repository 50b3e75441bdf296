"""Redis: every client imgprep makes (redis_connect, redis_urls), and the Redis adapters of the
domain's ports (the journal, the device ledger, lease locks, peers, cache references, rbd's
records). They import nothing of Celery, the Celery edge, delivery or the CLI."""
