# imgprep worker image: Debian 12 with qemu-img, qemu-storage-daemon, fuse2fs and imgprep.
FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv qemu-utils qemu-system-common fdisk e2fsprogs fuse2fs fuse3 \
      util-linux mount ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/imgprep
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY domain ./domain
COPY tasks ./tasks
COPY config ./config
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH \
    IMGPREP_CONFIG=/opt/imgprep/config/imgprep.toml
ENTRYPOINT ["imgprep"]
CMD ["worker"]
