#!/bin/busybox sh
# PID 1 of the dm test VM (tests/vm/run.sh): load the modules, run the
# real-kernel tests of cowtap_dm_test, then (e2e=1 on the kernel command
# line) the offload end to end over the images on the data disk, then the
# same through cowtapd and `cowtap ctl offload` (service_stage), and power
# off. Reports on the console, which the host parses:
#   VMSTAGE <name> <seconds> s      one per stage
#   VMCHECK <name> PASS|FAIL <detail>
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
up() { cut -d' ' -f1 /proc/uptime; }
stage_t=$(up)
stage() { t=$(up); echo "VMSTAGE $1 $(awk "BEGIN{printf \"%.1f\", $t - $stage_t}") s"; stage_t=$t; }
vmcheck() { echo "VMCHECK $*"; }
finish() {
  echo "=== vm done ==="
  sync
  poweroff -f
}

# A key's number in `cowtap ctl offload status --json` output (file $1).
# 0 when absent, so that arithmetic on it cannot stop this shell (PID 1).
jnum() { v=$(grep -o "\"$2\": *[0-9]*" "$1" 2>/dev/null | head -1 | grep -o '[0-9]*$'); echo "${v:-0}"; }

# The offload as a user runs it: cowtapd (sim platform: no guest here, the
# dm device is the disk) and `cowtap ctl offload on|status|off`, a verified
# load on /dev/mapper/cowtap-svc in two passes while cowtapd's reload thread
# moves what the miss path allocated to linear segments, the counters
# checked after each pass; then off, and cowtapd stopped by SIGTERM. The
# host checks the image and the model the second pass wrote.
service_stage() {
  img=/data/svc.qcow2 dev=/dev/mapper/cowtap-svc size=$((32 << 20))
  mkdir -p /run/cowtap
  cowtapd --platform sim --sim-socket /run/cowtap/sim.sock --control-socket /run/cowtap/cowtapd.sock \
    --offload-reload-ms 100 > /tmp/cowtapd.log 2>&1 &
  dpid=$!
  i=0; while [ ! -S /run/cowtap/cowtapd.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  if cowtap ctl offload on $img > /tmp/on.txt 2>&1 && [ -b $dev ]; then
    vmcheck service_offload_on PASS "$(head -1 /tmp/on.txt)"
  else
    vmcheck service_offload_on FAIL "$(tr '\n' ' ' < /tmp/on.txt)"; cat /tmp/cowtapd.log; kill $dpid; return
  fi
  cowtap_vm_offload_e2e device-load $dev $size 1500 11 '' /tmp/model1.raw 2>&1
  cowtap ctl offload status $img --json > /tmp/st1.json 2>&1
  lin=$(jnum /tmp/st1.json linear_sectors); rel=$(jnum /tmp/st1.json reloads)
  [ "${lin:-0}" -gt 0 ] && [ "${rel:-0}" -gt 0 ] && vmcheck service_went_linear PASS "$lin sectors linear after $rel reloads" ||
    { vmcheck service_went_linear FAIL "linear ${lin:-?}, reloads ${rel:-?}"; cat /tmp/st1.json; }
  cowtap_vm_offload_e2e device-load $dev $size 1500 12 /tmp/model1.raw /data/svc-expected.raw 2>&1
  cowtap ctl offload status $img --json > /tmp/st2.json 2>&1
  cowtap ctl offload status $img
  # Of the second pass's bytes, the share the kernel served alone.
  share=$(awk -v m1="$(($(jnum /tmp/st1.json miss_bytes_read) + $(jnum /tmp/st1.json miss_bytes_written)))" \
    -v m2="$(($(jnum /tmp/st2.json miss_bytes_read) + $(jnum /tmp/st2.json miss_bytes_written)))" \
    -v d1="$(($(jnum /tmp/st1.json device_sectors_read) + $(jnum /tmp/st1.json device_sectors_written)))" \
    -v d2="$(($(jnum /tmp/st2.json device_sectors_read) + $(jnum /tmp/st2.json device_sectors_written)))" \
    'BEGIN { d = (d2 - d1) * 512; if (d <= 0) { print -1; exit } printf "%.2f", 1 - (m2 - m1) / d }')
  awk -v s="$share" 'BEGIN { exit !(s > 0) }' && vmcheck service_kernel_served PASS "kernel share of pass 2's bytes: $share" ||
    vmcheck service_kernel_served FAIL "kernel share of pass 2's bytes: $share"
  zi=$(jnum /tmp/st2.json zeroes_in_place); ze=$(jnum /tmp/st2.json zeroes_to_engine)
  [ "$ze" -gt 0 ] && vmcheck service_discards_routed PASS "$ze discard/zeroes to the engine, $zi zeroed in place" ||
    vmcheck service_discards_routed FAIL "no discard or write-zeroes reached the engine ($zi in place)"
  if cowtap ctl offload off $img > /tmp/off.txt 2>&1 && [ ! -e $dev ]; then vmcheck service_offload_off PASS ""
  else vmcheck service_offload_off FAIL "$(tr '\n' ' ' < /tmp/off.txt)"; fi
  kill -TERM $dpid; wait $dpid; rc=$?
  [ $rc -eq 0 ] && vmcheck service_cowtapd_exit PASS "" || { vmcheck service_cowtapd_exit FAIL "exit $rc"; }
  grep -E 'offload|error|warn' /tmp/cowtapd.log | sed 's/^/cowtapd: /' | tail -20
  stage service
}

# `cowtap bench --offload`: reads through the dm device (all linear after
# priming), the NBD miss device alone, and a loop device of a raw file. The
# ratios are figures (TCG on a shared host is noisy), so the check is that
# it ran and that no dm read reached user space.
bench_stage() {
  cowtap bench --offload --size 64M --seconds "$1" --dir /data/bench > /tmp/bench.txt 2> /tmp/bench.err
  rc=$?
  sed 's/^/BENCH /' /tmp/bench.txt
  rows=$(grep -c 'requests reached user space' /tmp/bench.txt)
  zero=$(grep -c ' 0 requests reached user space' /tmp/bench.txt)
  if [ $rc -eq 0 ] && [ "$rows" -gt 0 ] && [ "$rows" = "$zero" ]; then
    vmcheck bench_offload PASS "$(grep -E '^  (PASS|MISS)' /tmp/bench.txt | awk '{printf "%s %s %s; ", $2, $4, $1}')"
  else
    vmcheck bench_offload FAIL "exit $rc, $zero of $rows rows without user-space reads: $(tail -2 /tmp/bench.err | tr '\n' ' ')"
  fi
  rm -rf /data/bench
  stage bench
}

echo "=== vm begin: $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpus ==="
mods_ok=1
while read -r m; do
  case $m in
    nbd) args="nbds_max=8" ;;
    *) args="" ;;
  esac
  insmod /lib/modules/$m.ko $args || { echo "insmod $m failed"; mods_ok=0; }
done < /lib/modules/order
i=0; while [ ! -e /dev/nbd0 ] || [ ! -e /dev/mapper/control ] || [ ! -e /dev/loop-control ]; do
  [ $i -ge 50 ] && break; sleep 0.1; i=$((i + 1))
done
for n in /dev/mapper/control /dev/loop-control /dev/nbd0; do [ -e $n ] || { echo "no $n"; mods_ok=0; }; done
[ $mods_ok = 1 ] && vmcheck modules PASS "$(tr '\n' ' ' < /lib/modules/order)" || vmcheck modules FAIL "see the console"
stage modules

# The real-kernel tests. None may skip here: this VM is where they run.
filter='LoopDeviceTest.*:NbdDeviceTest.*:KernelDeviceMapperTest.*:NbdHandshakeTest.*:-*SaysWhyWhenDeviceMapperIsAbsent'
cowtap_dm_test --gtest_filter="$filter" > /tmp/kernel_tests.log 2>&1
rc=$?
cat /tmp/kernel_tests.log
ran=$(sed -n 's/^\[==========\] \([0-9]*\) tests\{0,1\} from .* ran\..*/\1/p' /tmp/kernel_tests.log | tail -1)
skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) tests\{0,1\}, listed below:.*/\1/p' /tmp/kernel_tests.log | tail -1)
if [ $rc -eq 0 ] && [ -n "$ran" ] && [ "$ran" -gt 0 ] && [ -z "$skipped" ]; then
  vmcheck kernel_tests PASS "$ran tests, none skipped"
else
  vmcheck kernel_tests FAIL "exit $rc, ${ran:-0} ran, ${skipped:-0} skipped"
fi
stage kernel_tests

if grep -q 'e2e=1' /proc/cmdline; then
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  mkdir -p /data
  if mount -t ext4 /dev/vda /data; then
    cowtap_vm_offload_e2e run /data/overlay.qcow2 /data/expected.raw 2>&1
    rc=$?
    [ $rc -eq 0 ] && vmcheck offload_e2e PASS "" || vmcheck offload_e2e FAIL "exit $rc"
    sync
    stage offload_e2e
    [ -x /bin/cowtapd ] && service_stage
    bench_s=$(sed -n 's/.*bench=\([0-9.]*\).*/\1/p' /proc/cmdline)
    [ -x /bin/cowtap ] && [ -n "$bench_s" ] && bench_stage "$bench_s"
    # Teardown left nothing bound: no dm device, no loop over the image.
    left=$(ls /dev/mapper | grep -v '^control$'; grep -l . /sys/block/loop*/loop/backing_file 2>/dev/null)
    [ -z "$left" ] && vmcheck teardown_complete PASS "" || vmcheck teardown_complete FAIL "still bound: $(echo $left)"
    # The image file must be released soon after teardown. A single umount
    # right after the program exited was refused (EBUSY) in 2 of 6 runs
    # with nothing bound: the kernel drops some references to the files of
    # an exited process asynchronously (io_uring's ring teardown runs in a
    # workqueue, and the engine registers its files there), so retry.
    t0=$(up); n=0
    until umount /data 2>/dev/null; do
      n=$((n + 1)); [ $n -ge 50 ] && break; sleep 0.1
    done
    waited=$(awk "BEGIN{printf \"%.1f\", $(up) - $t0}")
    [ $n -lt 50 ] && vmcheck data_released PASS "umount after ${waited} s, $n retries" ||
      { vmcheck data_released FAIL "/data still busy ${waited} s after teardown"; losetup -a; ls -l /sys/block/*/holders; }
  else
    vmcheck offload_e2e FAIL "cannot mount the data disk"
    dmesg | tail -20
  fi
  stage teardown
fi
dmesg | grep -iE 'nbd|device-mapper|loop|BUG|WARNING|blk_update_request|I/O error' | sed 's/^/dmesg: /' | tail -40
finish
