#!/usr/bin/env bash
# Install everything imgprep needs on a fresh Debian 12 machine, as root, from this checkout:
# the Debian packages (qemu-img, qemu-storage-daemon, redis-server, sfdisk, fuse2fs, and for the
# boot tests qemu-system-x86 and debootstrap, ...), a virtualenv in .venv with imgprep and its
# test tools, and a running redis-server.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-pip   # the runtime
  qemu-utils                         # qemu-img
  qemu-system-common                 # qemu-storage-daemon (FUSE exports of qcow2 overlays)
  redis-server redis-tools           # broker, results and locks
  fdisk                              # sfdisk: partition tables of test and demo images
  e2fsprogs fuse2fs fuse3            # mkfs.ext4 -d, userspace ext4 mounts
  util-linux mount                   # losetup, mount, blkid, prlimit
  curl ca-certificates               # benchmarks' baseline, https sources
  chromium chromium-driver           # headless browser: the Flower end-to-end test screenshots
  procps                             # pgrep in bench/mount_inject_baseline.sh
  ceph-common qemu-block-extra       # the rbd backend: the rbd CLI, qemu's rbd driver
  ceph-mon ceph-mgr ceph-osd         # the throwaway one-node cluster of the tests and the demo
  qemu-system-x86                    # the boot tests and `imgprep demo --boot` boot prepared disks
  debootstrap debian-archive-keyring # ...of a Debian 12 guest the tests build from Debian's packages
)

if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/install.sh: run as root (apt-get, loop devices and mounts need it)" >&2
  exit 1
fi

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "== apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "== python3 -m venv .venv"
  python3 -m venv .venv
fi
# Exactly the versions in constraints.txt (resolved from pyproject.toml by scripts/lock.sh): pip
# itself, the build backend (used without build isolation, so no newer setuptools is fetched),
# imgprep with its test tools, and nothing else (what an earlier resolution left is removed).
stamp=.venv/.imgprep-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || constraints.txt -nt $stamp ]]; then
  echo "== pip install -c constraints.txt -e .[dev]"
  .venv/bin/python -m pip install -q -c constraints.txt pip
  .venv/bin/python -m pip install -q -c constraints.txt setuptools wheel
  # (setuptools warns that an editable install finds the packages in this folder: it should)
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -c constraints.txt --no-build-isolation -e '.[dev]'
  .venv/bin/python scripts/lock.py prune
  .venv/bin/python scripts/lock.py check --installed
  touch "$stamp"
fi

# Privilege separation (README, "Privileges"): workers run as the system user imgprep, which
# owns the work directories and reaches the interpreter and this checkout; only the privileged
# helper runs as root.
if ! id imgprep >/dev/null 2>&1; then
  echo "== useradd imgprep (the workers' user)"
  useradd --system --user-group --no-create-home --home-dir /var/lib/imgprep \
    --shell /usr/sbin/nologin imgprep
fi
for dir in cache instances state snapshots; do
  install -d -o imgprep -g imgprep -m 0755 "/var/lib/imgprep/$dir"
done
install -d -o root -g root -m 0711 /run/imgprep-helper  # search only: the work areas are in devices/
# This host's settings (read instead of the checkout's config/imgprep.toml; IMGPREP_CONFIG names
# another file): `imgprep worker` and `imgprep demo`, started as root, start the helper and run
# the workers as imgprep. Written once; an operator's edits are kept.
host_config=/etc/imgprep/imgprep.toml
if [[ ! -f $host_config ]]; then
  echo "== $host_config (workers run as imgprep, devices and mounts through the helper)"
  install -d -o root -g root -m 0755 /etc/imgprep
  # files earlier root workers made in the work directories go to the workers' user
  chown -R imgprep:imgprep /var/lib/imgprep/{cache,instances,state,snapshots}
  cat >"$host_config" <<'TOML'
# This host's imgprep settings, written by scripts/install.sh. Read instead of the checkout's
# config/imgprep.toml (which documents every setting and its default); IMGPREP_CONFIG names
# another file, IMGPREP_* variables override single settings.

[privileges]
# Privilege separation (README, "Privileges"): `imgprep worker` started as root starts the
# privileged helper on this socket, then runs as this user. Both empty: one root process.
helper_socket = "/run/imgprep/helper.sock"
user = "imgprep"
TOML
fi
if ! runuser -u imgprep -- .venv/bin/python -c 'import pkgutil, worker.cli' >/dev/null 2>&1; then
  # The interpreter or the checkout lies under a directory the user cannot enter (pyenv under
  # /root): grant search (x, not read) on each such directory, nothing more.
  for target in "$(readlink -f .venv/bin/python)" "$(pwd)/.venv/bin/python"; do
    dir=$(dirname "$target")
    while [[ $dir != / ]]; do
      if [[ $(stat -c %A "$dir") != *x ]]; then
        echo "== chmod o+x $dir (so that imgprep can reach ${target})"
        chmod o+x "$dir"
      fi
      dir=$(dirname "$dir")
    done
  done
fi

# systemd units (deploy/systemd): the helper as its own root service, the worker, beat and Flower
# as imgprep. Written (not enabled, not started): `systemctl enable --now imgprep-helper
# imgprep-worker imgprep-beat` runs them. Rewritten when the checkout's differ.
if [[ -d /etc/systemd/system ]]; then
  for unit in deploy/systemd/*.service; do
    rendered=$(sed "s|@CHECKOUT@|$(pwd)|g" "$unit")
    target=/etc/systemd/system/$(basename "$unit")
    if [[ ! -f $target || $(cat "$target") != "$rendered" ]]; then
      echo "== $target"
      printf '%s\n' "$rendered" >"$target"
    fi
  done
fi

# A redis-server for the demo and for operators trying imgprep on one machine. The tests start
# their own on a free port. Production runs it with AOF (appendonly yes): without it, a restart
# loses queued and unacknowledged messages.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "== starting redis-server (appendonly yes)"
  mkdir -p /var/lib/imgprep/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --appendonly yes \
    --dir /var/lib/imgprep/redis --logfile /var/lib/imgprep/redis/redis.log
  for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli ping >/dev/null
fi
echo "== ready: $(.venv/bin/imgprep --version 2>/dev/null || echo imgprep) · $(qemu-img --version | head -1) · redis $(redis-cli info server | sed -n 's/^redis_version://p' | tr -d '\r')"
