"""In-memory fakes of the domain's ports (domain.core.ports), one module per port, so that domain
unit tests need neither Redis nor worker/. The Redis adapters they stand for are in worker/
(redis_locks, redis_references, redis_ledger, redis_journal) and are tested on their own."""
