"""Guest filesystems: mapping, mounting, file injection, devices and teardown, the operations
that need root (their port in ports) and the wrappers of the tools they use."""
