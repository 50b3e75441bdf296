"""Image formats: qemu-img, inspection of untrusted bytes, conversion and the wire models of
conversions and snapshots, snapshots of file disks, partition tables."""
