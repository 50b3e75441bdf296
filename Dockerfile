# imgprep worker image: Debian 12 with qemu-img, qemu-storage-daemon, fuse2fs, the Ceph client
# (rbd CLI, qemu's rbd driver: the rbd backend) and imgprep.
FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv qemu-utils qemu-system-common fdisk e2fsprogs fuse2fs fuse3 \
      util-linux mount ca-certificates ceph-common qemu-block-extra \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/imgprep
COPY pyproject.toml constraints.txt README.md ./
COPY worker ./worker
COPY domain ./domain
COPY tasks ./tasks
COPY helper ./helper
COPY config ./config
# exactly the versions the suite passed with (constraints.txt, as scripts/install.sh installs them)
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt pip setuptools wheel \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt --no-build-isolation .
# Privilege separation: the worker starts as root, starts the privileged helper, and runs as
# imgprep, which owns the work directories (README, "Privileges"); beat and Flower run as imgprep.
RUN useradd --system --user-group --no-create-home --home-dir /var/lib/imgprep \
      --shell /usr/sbin/nologin imgprep \
 && install -d -o imgprep -g imgprep /var/lib/imgprep/cache /var/lib/imgprep/instances \
      /var/lib/imgprep/state /var/lib/imgprep/snapshots
ENV PATH=/opt/venv/bin:$PATH \
    IMGPREP_CONFIG=/opt/imgprep/config/imgprep.toml
ENTRYPOINT ["imgprep"]
CMD ["worker"]
