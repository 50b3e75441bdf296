"""In-memory fakes of the domain's ports, one module per port, so that domain unit tests need
neither Redis nor worker/. Each port is declared beside its feature (domain.core.ports for the
locks every feature shares, domain.cache.ports, domain.disks.ports, domain.rbd.ports, and
domain.core.journal for the step journal); the Redis adapters they stand for are in worker/
(redis_locks, redis_references, redis_peers, redis_ledger, redis_rbd, redis_journal) and are
tested on their own, and against these fakes (tests/unit/worker/test_fakes_match_adapters.py)."""
