"""One module per external tool family (losetup, mount/blkid, fuse2fs, qemu-storage-daemon), each
a set of one-line functions around the runner, plus finding the daemons they leave running."""
