"""Real parts for the tests, the benchmarks and the fault campaign, outside the runtime (not in
the wheel): a redis-server of our own, a replicated Redis with Sentinels, a MONITOR of what
Redis runs, the machine's state after a run, and privilege separation for a test cluster.

What the demo also needs (worker processes, the image server, sample and guest images, a Ceph
cluster) is the demo's own, in worker.cli.demo; the tests and benchmarks import it from there.
Nothing in domain/, worker/, tasks/ or helper/ imports this package (pyproject.toml).
"""
