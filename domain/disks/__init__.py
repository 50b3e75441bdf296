"""Instance disks: qcow2 overlays and raw copies of cached bases, removal, preallocation, and the
device records of each disk (device_records, with their port in ports)."""
