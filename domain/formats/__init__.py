"""Image formats: qemu-img, inspection of untrusted bytes, conversion, snapshots, partition
tables."""
