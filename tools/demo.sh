#!/usr/bin/env bash
# `make run`: the embedded default demonstration, about a minute, leaving
# nothing running.
#
# Starts cowtapd on the simulated Xen platform, fills a 64 MiB base image
# with a verifiable pattern through a first guest, puts a thin qcow2 overlay
# over it (as SAN boot does, one per guest), attaches it to a second guest
# with `cowtap ctl attach`, and runs a boot-like workload in that guest (reads
# across the base, small writes and flushes; every byte read is checked by
# the guest). Then it shows what a user wants: throughput, latency, cache hit
# rate, what went to the overlay, QEMU's verdict, the base unchanged, and
# stops cowtapd with SIGTERM.
set -euo pipefail

build_dir=${1:-build}
bin="$(cd "$build_dir" && pwd)/tools"
for b in cowtap cowtapd cowtap_guest; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b not built (run make build)" >&2; exit 1; }
done
cowtap="$bin/cowtap"

work=$(mktemp -d /tmp/cowtap-demo.XXXXXX)
daemon_pid=""
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -TERM "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ctl() { "$cowtap" ctl --socket "$work/ctl.sock" "$@"; }
guest() { "$bin/cowtap_guest" --socket "$work/sim.sock" --ram-pages 8192 "$@"; }
seed=2026

step "1. cowtapd on the simulated Xen platform"
"$bin/cowtapd" --platform sim --sim-socket "$work/sim.sock" --control-socket "$work/ctl.sock" \
  --log-level info > cowtapd.log 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do grep -q "cowtapd ready" cowtapd.log 2>/dev/null && break; sleep 0.05; done
grep -q "cowtapd ready" cowtapd.log || { cat cowtapd.log; echo "demo: cowtapd did not start" >&2; exit 1; }
echo "cowtapd pid $daemon_pid, control socket ctl.sock, guests connect to sim.sock"

step "2. A 64 MiB base image, filled by guest 1 with a verifiable pattern"
"$cowtap" create -f qcow2 base.qcow2 64M > /dev/null
ctl attach --domid 1 --devid 51712 --image "$work/base.qcow2" --format qcow2
guest --domid 1 --scenario fill --initial-seed $seed > fill.log 2>&1 || { cat fill.log; exit 1; }
grep -q "^result: .* 0 failed" fill.log || { cat fill.log; exit 1; }
# Guest 1 shut down: its domain died and cowtapd released the VBD.
for _ in $(seq 100); do [ -z "$(ctl list 2>/dev/null | grep '^1/51712')" ] && break; sleep 0.05; done
base_sum=$(sha256sum base.qcow2 | cut -c1-16)
echo "base.qcow2: 64 MiB written by guest 1, sha256 ${base_sum}..."

step "3. A thin overlay for guest 2, attached with cowtap ctl"
"$cowtap" create -f qcow2 -b base.qcow2 -F qcow2 guest2.qcow2 > /dev/null
echo "overlay: $(stat -c %s guest2.qcow2) bytes on disk"
ctl attach --domid 2 --devid 51712 --image "$work/guest2.qcow2" --format qcow2
ctl list

# Runs guest 2 with the given workload flags, showing a progress line from
# `cowtap ctl list` every second; leaves the guest's output in $1.log.
hit="-"
run_guest2() {
  local log=$1; shift
  guest --domid 2 --initial pattern --initial-seed $seed --ops 0 "$@" > "$log.log" 2>&1 &
  local pid=$! t0 line
  t0=$(date +%s)
  while kill -0 "$pid" 2>/dev/null; do
    line=$(ctl list 2>/dev/null | grep '^2/51712' || true)
    if [ -n "$line" ]; then
      read -r _ _ state ops rd wr h _ <<< "$line"
      [ "$h" != "-" ] && hit=$h
      printf '\r  %3d s  %-10s ops %-8s read %7s MiB  written %6s MiB  remap-cache hits %s%%   ' \
        $(( $(date +%s) - t0 )) "$state" "$ops" "$rd" "$wr" "$hit"
    fi
    sleep 1
  done
  echo
  local rc=0
  wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ] || ! grep -q '^workload:' "$log.log"; then
    cat "$log.log"; echo "demo: guest 2 failed" >&2; exit 1
  fi
}

step "4. Guest 2 boots: reads across the whole base through the overlay (4 s)"
run_guest2 boot --mode sequential --read-pct 100 --bs 128 --qd 16 --duration-ms 4000 --no-final-verify
# Guest 2 "rebooted": the toolstack (here cowtapd) attaches its disk again.
for _ in $(seq 100); do [ -z "$(ctl list 2>/dev/null | grep '^2/51712')" ] && break; sleep 0.05; done
ctl attach --domid 2 --devid 51712 --image "$work/guest2.qcow2" --format qcow2 > /dev/null

step "5. Guest 2 runs: small writes and flushes in 8 MiB, reads everywhere in it (6 s)"
run_guest2 work --mode random --read-pct 70 --bs 16 --random-sizes --qd 16 --flush-every 32 \
  --region-start 98304 --region-sectors 16384 --duration-ms 6000 --seed 7

step "6. Summary"
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" "$1.log" | head -1; }
mib_s() {
  local r w t
  r=$(field "$1" read); w=$(field "$1" written); t=$(field "$1" elapsed)
  awk -v r="${r%B}" -v w="${w%B}" -v t="${t%s}" 'BEGIN { printf "%.1f", (r + w) / 1048576 / t }'
}
printf '  boot reads      %s MiB/s, %s IOPS; p50 %s, p99 %s; %s sectors verified, %s mismatches\n' \
  "$(mib_s boot)" "$(field boot iops)" "$(field boot p50)" "$(field boot p99)" \
  "$(field boot verified_sectors)" "$(field boot mismatches)"
printf '  mixed I/O       %s MiB/s, %s IOPS (%s reads, %s writes, %s flushes); p50 %s, p99 %s\n' \
  "$(mib_s work)" "$(field work iops)" "$(field work reads)" "$(field work writes)" "$(field work flushes)" \
  "$(field work p50)" "$(field work p99)"
printf '  data checked    %s sectors read back by the guest after its writes: %s mismatches\n' \
  "$(field work verified_sectors)" "$(field work mismatches)"
printf '  remap cache     %s%% of cluster lookups hit (last sample while serving)\n' "$hit"
printf '  guest checks    boot: %s; run: %s\n' "$(sed -n 's/^result: //p' boot.log)" "$(sed -n 's/^result: //p' work.log)"
written=$(field work written)
printf '  overlay         %s MiB written by the guest; guest2.qcow2 is %s on disk (base.qcow2 %s)\n' \
  "$(awk -v w="${written%B}" 'BEGIN { printf "%.1f", w / 1048576 }')" "$(du -h guest2.qcow2 | cut -f1)" \
  "$(du -h base.qcow2 | cut -f1)"
printf '  QEMU says       '; qemu-img check guest2.qcow2 | head -1
sha_after=$(sha256sum base.qcow2 | cut -c1-16)
if [ "$sha_after" = "$base_sum" ]; then
  echo "  base.qcow2      unchanged (sha256 ${sha_after}...)"
else
  echo "base.qcow2 CHANGED: this is a bug, please report it" >&2
  exit 1
fi

step "7. Stopping cowtapd (SIGTERM)"
kill -TERM "$daemon_pid"
rc=0
wait "$daemon_pid" || rc=$?
daemon_pid=""
grep -E "detached|stopped cleanly" cowtapd.log | sed 's/^/  /' | tail -3
[ "$rc" -eq 0 ] || { echo "demo: cowtapd exited with $rc" >&2; exit 1; }
echo "cowtapd exited 0; nothing left running"
