"""Errors, wire and domain models, the ports (every protocol the domain needs from the runtime),
the runner of external commands, paths and the publish-once shape."""
