"""The privileged helper: the one root process of an imgprep host.

Workers run as an unprivileged user; what needs root (loop devices, mounts, the FUSE daemons,
files written as root into a guest) they ask of this helper over a Unix socket, one typed
request per operation (helper.protocol). The helper checks each argument again against its own
roots (helper.checks), runs each operation in a child process holding only that operation's
Linux capabilities (helper.capabilities), and logs every refusal. It imports no Celery, kombu or
Redis, and nothing of the worker.
"""
