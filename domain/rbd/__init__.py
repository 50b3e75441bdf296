"""The rbd backend: instance disks as clones in a Ceph cluster (Nova's `Rbd` image backend).

Images are imported once per cluster into the images pool, each with a protected snapshot
(domain.rbd.images); instance disks are clones of it in the instances' pool (domain.rbd.clones);
snapshots go back to the images pool or to a file (domain.rbd.snapshots); unused imported
images age out (domain.rbd.aging). Every call to the cluster goes through domain.rbd.tool.
"""
