#!/bin/sh
# Minimal /etc/xen/scripts/block for the test dom0 (busybox only; the stock
# script needs more than busybox has): for a phy: disk on a block device,
# publish its major:minor so kernel blkback opens it, and say connected.
# libxl runs it as `block add|remove` with XENBUS_PATH set.
case "$1" in
  add)
    params=$(xenstore-read "$XENBUS_PATH/params") || exit 1
    dev=$(readlink -f "$params")
    [ -b "$dev" ] || { xenstore-write "$XENBUS_PATH/hotplug-error" "$params is not a block device"; exit 1; }
    xenstore-write "$XENBUS_PATH/physical-device" "$(stat -L -c '%t:%T' "$dev")"
    xenstore-write "$XENBUS_PATH/hotplug-status" connected
    ;;
  remove) ;;
esac
exit 0
