"""Instance disks: qcow2 overlays and raw copies of cached bases, disk.info, removal,
preallocation, sparse copies."""
