"""The fleet's side of a worker: each host's cache served read-only to its peers (peer_server),
and which connections that server admits (peer_connections)."""
