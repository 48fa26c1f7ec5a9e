#!/usr/bin/env bash
# `make run`: the embedded default demonstration.
#
# Builds a small base image with recognisable content, puts a thin qcow2
# overlay over it (as SAN boot does, one per guest), writes through the
# overlay, and shows what a user wants to see: the data through the chain, the
# overlay's map, and QEMU's verdict on the result. The base is never written.
set -euo pipefail

build_dir=${1:-build}
cowtap="$(cd "$build_dir" && pwd)/tools/cowtap"
[ -x "$cowtap" ] || { echo "demo: $cowtap not built (run make build)" >&2; exit 1; }

work=$(mktemp -d /tmp/cowtap-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ms() { date +%s%N; }

step "1. A 64 MiB base image with recognisable content"
"$cowtap" create -f qcow2 base.qcow2 64M
# Every 8 MiB of the base starts with a label, so reads show where bytes come from.
for i in $(seq 0 8 56); do
  printf 'BASE MiB %02d: shared read-only base data ' "$i" > label
  "$cowtap" write base.qcow2 $((i * 1048576)) --from label > /dev/null
done
base_sum=$(sha256sum base.qcow2 | cut -c1-16)
echo "base.qcow2 written: 8 labels, sha256 ${base_sum}..."

step "2. A thin overlay for one guest"
t0=$(ms)
"$cowtap" create -f qcow2 -b base.qcow2 -F qcow2 guest1.qcow2
t1=$(ms)
echo "overlay created in $(( (t1 - t0) / 1000000 )) ms, $(stat -c %s guest1.qcow2) bytes on disk"

step "3. The guest writes through the overlay"
printf 'GUEST 1 wrote this 4 KiB block' > w1 && truncate -s 4096 w1
"$cowtap" write guest1.qcow2 $((8 * 1048576 + 8192)) --from w1      # partial cluster: copy-up
head -c 1048576 /dev/urandom > w2
"$cowtap" write guest1.qcow2 $((10 * 1048576)) --from w2             # whole clusters
"$cowtap" zero guest1.qcow2 $((20 * 1048576)) 1048576                # zeroes, never backing data
echo "wrote 4 KiB at 8 MiB + 8 KiB, 1 MiB at 10 MiB, zeroed 1 MiB at 20 MiB"

step "4. Reading through the chain"
printf '  at 16 MiB (untouched, from base):     '; "$cowtap" read guest1.qcow2 $((16 * 1048576)) 40; echo
printf '  at 8 MiB  (same cluster, copied up):  '; "$cowtap" read guest1.qcow2 $((8 * 1048576)) 40; echo
printf '  at 8 MiB + 8 KiB (guest data):       '; "$cowtap" read guest1.qcow2 $((8 * 1048576 + 8192)) 30; echo
printf '  at 20 MiB (zeroed in the overlay):    '; "$cowtap" read guest1.qcow2 $((20 * 1048576)) 16 --hex | head -1

step "5. The overlay's map (depth 0 = overlay, 1 = base)"
"$cowtap" map guest1.qcow2

step "6. The overlay as cowtap sees it"
"$cowtap" info guest1.qcow2

step "7. QEMU's verdict (qemu-img is the oracle)"
qemu-img check guest1.qcow2
# The same writes applied to a flat raw copy of the base must give exactly the
# guest bytes cowtap serves through the chain.
qemu-img convert -f qcow2 -O raw base.qcow2 expected.raw
dd if=w1 of=expected.raw bs=4096 seek=$(( (8 * 1048576 + 8192) / 4096 )) conv=notrunc status=none
dd if=w2 of=expected.raw bs=1M seek=10 conv=notrunc status=none
dd if=/dev/zero of=expected.raw bs=1M seek=20 count=1 conv=notrunc status=none
qemu-img compare -f qcow2 -F raw guest1.qcow2 expected.raw
sha_after=$(sha256sum base.qcow2 | cut -c1-16)
if [ "$sha_after" = "$base_sum" ]; then
  echo "base.qcow2 unchanged (sha256 ${sha_after}...)"
else
  echo "base.qcow2 CHANGED: this is a bug, please report it" >&2
  exit 1
fi
