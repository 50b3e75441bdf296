"""A randomized fault campaign in the spirit of Jepsen: real parts, a seeded nemesis, a checker.

    .venv/bin/python -m bench.chaos --seed 7 --duration 90

runs a real redis-server (AOF on), real `imgprep worker` processes on two or more host ids, an
HTTP image server with fast, slow and stalling sources, and a stream of mixed operations sent by
a plain Celery client, while a nemesis kills pool processes and whole workers, pauses lock
holders past their lease, restarts Redis and stalls sources. When the nemesis stops and the
cluster has quiesced, a checker verifies the README's promises over the whole history and the
final state, and the run ends with one line:

    chaos: seed=7 operations=212 faults=19 ended=212 lost=0 violations=0

One module per job: `history` (what happened), `workload` (the operations and the model of the
disks they make), `client` (the plain client), `nemesis` (the faults), `cluster` (the processes),
`sources` and `catalogue` (the image server and its images), `checker` (the invariants),
`machine` (mounts, loop devices and daemons), `campaign` (all of it in order). RELIABILITY.md
records the figures.
"""
