"""The boundary of privilege on the worker's side: separating the helper (root) from the worker
(`privileges.user`) at start (separation), and the helper's client over its socket
(helper_client)."""
