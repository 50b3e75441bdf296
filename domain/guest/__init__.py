"""Guest filesystems: mapping, mounting, file injection, device records and teardown, and the
wrappers of the tools they use."""
