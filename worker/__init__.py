"""The runtime: imgprep's domain run as a fleet of Celery workers on Redis, split by role.

As Celery keeps its application, its worker and its result backends apart, and dramatiq keeps
each capability beside its backends, each role of the runtime is a package:

- `worker.app`: the Celery edge. The application (`celery -A worker.app`, `from worker.app
  import app`), the task bases, signal handlers, results, publishing and redelivery, queues,
  beat's schedule, and the collaborators a worker process hands to domain code (runtime).
- `worker.delivery`: message delivery. kombu's Redis transport made to lose nothing (broker,
  broker_peeks) and which workers and hosts are alive (hosts), on one liveness mechanism.
- `worker.stores`: Redis. Every client imgprep makes (redis_connect, redis_urls) and the Redis
  adapters of the domain's ports (journal, ledger, locks, peers, references, rbd), with their
  Lua scripts as `.lua` files beside them.
- `worker.fleet`: each host's cache served read-only to its peers, and who may connect.
- `worker.privileges`: the worker's side of the privileged helper: privilege separation at
  start, and the helper's client.
- `worker.cli`: the `imgprep` command, with the Python client (cli.client), the state of an
  operation (cli.operation_state) and the demo (cli.demo: its scenario and the real parts it
  starts, a local image server, sample and guest images, worker processes, a Ceph cluster).

What every role shares stays at the top: settings, logs, metrics (and metrics_dir).

Imports run one way, and import-linter checks it (pyproject.toml): only the CLI imports the CLI;
the stores import nothing of the other roles; delivery and the fleet are independent; nothing
here imports the tasks (named as strings) or the test harness (`harness/`, not shipped).
"""
