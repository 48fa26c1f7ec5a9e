#!/bin/busybox sh
# PID 1 of the test guest (tests/xen/run.sh): load xen-blkfront, wait for
# /dev/xvda, record what blkfront negotiated, run the workload, power off.
# Everything goes to hvc0, which xenconsoled logs in dom0.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /lib/modules/xen-blkfront.ko
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "=== guest begin ==="
dmesg | grep -i blkfront | sed 's/^\[[ 0-9.]*\] /BLKFRONT /'
for k in discard_max_bytes discard_granularity max_segments max_hw_sectors_kb max_sectors_kb write_cache \
         logical_block_size nr_requests; do
  echo "SYSFS $k $(cat /sys/block/xvda/queue/$k 2>/dev/null)"
done
t0=$(cut -d' ' -f1 /proc/uptime)
/bin/cowtap_xen_workload guest /dev/xvda
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo "GUEST-SECONDS $(awk "BEGIN{print $t1 - $t0}")"
echo "=== guest end rc=$rc ==="
sync
poweroff -f
