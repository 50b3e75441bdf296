#!/usr/bin/env bash
# The baseline of bench/mount_inject.py: map, mount, inject one file and tear down, as an
# operator would type it. Arguments: FORMAT (raw|qcow2) DISK BASE WORKDIR METHOD (fuse2fs|kernel)
# GUEST_FILE LOCAL_FILE. Partition 1 of an MBR disk, found with sfdisk like a person would.
set -euo pipefail
format=$1 disk=$2 base=$3 work=$4 method=$5 guest_file=$6 local_file=$7
# Wait until a daemon has exited (a zombie has exited too), checking every 5 ms.
wait_gone() {
  local state
  while state=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) && [[ $state != Z ]]; do
    sleep 0.005
  done
}
mkdir -p "$work/root"
view=$disk
if [[ $format == qcow2 ]]; then
  view=$work/export
  touch "$view"
  qemu-storage-daemon \
    --blockdev "{\"driver\":\"file\",\"filename\":\"$base\",\"node-name\":\"bf\",\"read-only\":true}" \
    --blockdev '{"driver":"raw","file":"bf","node-name":"base","read-only":true}' \
    --blockdev "{\"driver\":\"file\",\"filename\":\"$disk\",\"node-name\":\"of\"}" \
    --blockdev '{"driver":"qcow2","file":"of","backing":"base","node-name":"disk"}' \
    --export "{\"type\":\"fuse\",\"id\":\"e\",\"node-name\":\"disk\",\"mountpoint\":\"$view\",\"writable\":true}" \
    --daemonize --pidfile "$work/qsd.pid"
fi
read -r start size < <(sfdisk --dump "$view" | sed -n 's/.*start= *\([0-9]*\), size= *\([0-9]*\).*/\1 \2/p' | head -1)
offset=$((start * 512)) length=$((size * 512))
blkid -p -o value -s TYPE --offset "$offset" --size "$length" "$view" >/dev/null
if [[ $method == fuse2fs ]]; then
  fuse2fs "$view" "$work/root" -o "offset=$offset,nosuid,nodev,noexec"
  pid=$(pgrep -f -n "^fuse2fs $view $work/root")
else
  loop=$(losetup --find --show --offset "$offset" --sizelimit "$length" "$view")
  mount -t ext4 -o nosuid,nodev,noexec "$loop" "$work/root"
fi
mkdir -p "$(dirname "$work/root$guest_file")"
cp "$local_file" "$work/root$guest_file"
chmod 0644 "$work/root$guest_file"
umount "$work/root"
if [[ $method == fuse2fs ]]; then
  wait_gone "$pid"
else
  losetup --detach "$loop"
fi
if [[ $format == qcow2 ]]; then
  qsd=$(cat "$work/qsd.pid")
  kill "$qsd"
  wait_gone "$qsd"
  rm -f "$view"
fi
rmdir "$work/root"
