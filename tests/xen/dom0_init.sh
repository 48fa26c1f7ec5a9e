#!/bin/busybox sh
# PID 1 of the test dom0 (tests/xen/run.sh): load the Xen and disk modules,
# mount the data disk (virtio, ext4, holds the images), start xenstored and
# xenconsoled, then for each backend in /etc/backends `xl create` the test
# guest on it, log what the frontend and backend wrote in xenstore, wait for
# the guest to power off and print its console with a "[backend] " prefix.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mkdir -p /run/xen /run/xenstored /run/lock /var/run/xen
say() { echo "[dom0] $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
stage_t=$(up)
stage() { t=$(up); say "STAGE $1 $(awk "BEGIN{printf \"%.1f s\", $t - $stage_t}")"; stage_t=$t; }
while read -r m; do insmod /lib/modules/$m.ko || say "insmod $m failed"; done < /lib/modules/order
mkdir -p /proc/xen && mount -t xenfs xenfs /proc/xen
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 /dev/vda /data || { say "cannot mount the data disk"; dmesg | tail -40 | sed "s/^/[dom0] dmesg /"; }
xenstored --pid-file /run/xenstored.pid
sleep 1
xen-init-dom0 > /dev/null
xenconsoled --log=guest --log-dir=/var/log/xen
stage "boot+tools"

run_guest() {  # run_guest BACKEND DISKSPEC [extra config lines]
  b=$1; name=g-$b
  cat > /tmp/$name.cfg <<CFG
name = "$name"
type = "pv"
kernel = "/boot/vmlinuz"
ramdisk = "/boot/guest-initrd.gz"
extra = "console=hvc0 loglevel=4"
memory = 256
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ '$2' ]
$3
CFG
  say "$b: xl create disk='$2'"
  t0=$(up)
  # Under TCG on a loaded host a real QEMU can miss libxl's fixed 10 s QMP
  # timeout (LIBXL_QMP_CMD_TIMEOUT: "Post DM startup configs failed,
  # rc=-9"); retry, and if every attempt failed that way say PEER-TIMEOUT so
  # the host reports the peer as not run rather than as a data failure.
  attempt=1
  while ! xl -v create /tmp/$name.cfg > /tmp/$name.xl.log 2>&1; do
    sed "s/^/[$b] xl: /" /tmp/$name.xl.log | grep -v -E 'domainbuilder|xc: detail' | tail -12
    tail -20 /var/log/xen/qemu-dm-$name.log 2>/dev/null | sed "s/^/[$b] dm: /"
    xl destroy $name > /dev/null 2>&1
    grep -q 'Post DM startup configs failed, rc=-9' /tmp/$name.xl.log || timeouts_only=no
    if [ $attempt -ge 3 ]; then
      [ "$b" = qdisk ] && [ "${timeouts_only:-yes}" = yes ] && echo "[$b] PEER-TIMEOUT QEMU did not answer libxl's QMP within 10 s in $attempt attempts"
      return 1
    fi
    attempt=$((attempt + 1))
    say "$b: xl create failed, attempt $attempt"
    sleep 2
  done
  tail -5 /var/log/xen/qemu-dm-$name.log 2>/dev/null | sed "s/^/[$b] dm: /"
  domid=$(xl domid $name)
  fe=/local/domain/$domid/device/vbd/51712
  be=$(xenstore-read $fe/backend)
  i=0
  while [ "$(xenstore-read $fe/state 2>/dev/null)" != 4 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
  xenstore-ls -f $fe | sed "s/^/[$b] XS frontend /"
  xenstore-ls -f $be | sed "s/^/[$b] XS backend /"
  [ $b = cowtapd ] && command -v cowtap > /dev/null && cowtap ctl list 2>&1 | sed "s/^/[$b] CTL /"
  i=0
  while xl domid $name > /dev/null 2>&1 && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
  if xl domid $name > /dev/null 2>&1; then say "$b: guest still running after 300 s, destroying"; xl destroy $name; fi
  sleep 1
  sed -n '/=== guest begin ===/,/=== guest end/p' /var/log/xen/guest-$name.log | tr -d '\r' | sed "s/^/[$b] /"
  t1=$(up)
  say "$b: guest ran $(awk "BEGIN{print $t1 - $t0}") s"
  stage "guest-$b"
}

for b in $(cat /etc/backends); do
  case $b in
    blkback)
      loop=$(losetup -f)
      losetup $loop /data/blkback.raw
      run_guest blkback "phy:$loop,xvda,w"
      losetup -d $loop ;;
    qdisk)
      run_guest qdisk "format=qcow2,vdev=xvda,access=rw,backendtype=qdisk,target=/data/qdisk.qcow2" ;;
    cowtapd)
      mkdir -p /run/cowtap
      cowtapd --platform xen --backend-type qdisk > /var/log/cowtapd.log 2>&1 &
      cpid=$!
      sleep 1
      run_guest cowtapd "format=qcow2,vdev=xvda,access=rw,backendtype=qdisk,target=/data/cowtapd.qcow2" \
        'device_model_override = "/usr/lib/cowtap/cowtap-xenpv-dm"'
      kill -TERM $cpid; wait $cpid
      say "cowtapd exit $?"
      sed 's/^/[cowtapd] LOG /' /var/log/cowtapd.log | tail -40
      # The same config with no cowtapd running: xl create must fail, and the
      # stand-in device model's log must say why.
      cp /data/cowtapd.qcow2 /data/nodaemon.qcow2
      sed -e 's/g-cowtapd/g-nodaemon/' -e 's|/data/cowtapd.qcow2|/data/nodaemon.qcow2|' /tmp/g-cowtapd.cfg > /tmp/g-nodaemon.cfg
      if xl create /tmp/g-nodaemon.cfg > /tmp/g-nodaemon.xl.log 2>&1; then
        echo "[cowtapd] NODAEMON xl create succeeded without cowtapd"
        xl destroy g-nodaemon
      elif grep -q "no backend picked it up" /var/log/xen/qemu-dm-g-nodaemon.log; then
        echo "[cowtapd] NODAEMON refused: $(grep -o 'Busy: .*' /var/log/xen/qemu-dm-g-nodaemon.log | head -1)"
      else
        echo "[cowtapd] NODAEMON failed for another reason: $(tail -3 /tmp/g-nodaemon.xl.log | tr '\n' ' ')"
      fi
      rm -f /data/nodaemon.qcow2 ;;
  esac
done
sync
umount /data || say "umount /data failed"
stage "guests done"
echo "=== dom0 done ==="
poweroff -f
