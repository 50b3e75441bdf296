"""Real parts for the demo, the tests and the benchmarks: a redis-server, worker processes, an
image server, sample guest images, reading guest files back, and probes of the machine."""
