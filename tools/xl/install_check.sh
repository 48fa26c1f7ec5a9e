#!/bin/sh
# ctest xl_install: `make install`'s script into a scratch DESTDIR; checks the
# files, that the unit's placeholders were replaced and (when
# systemd-analyze is present) that systemd accepts the unit.
# Usage: tools/xl/install_check.sh <build-dir>
set -eu
build=$1
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
"$(dirname "$0")/install.sh" "$build" "$d" /usr
unit=$d/usr/lib/systemd/system/cowtapd.service
for f in "$d/usr/sbin/cowtapd" "$d/usr/bin/cowtap" "$d/usr/lib/cowtap/cowtap-xenpv-dm"; do
  [ -x "$f" ] || { echo "missing $f"; exit 1; }
done
[ -f "$d/usr/share/doc/cowtap/xl.md" ] || { echo "missing xl.md"; exit 1; }
grep -q '^ExecStart=/usr/sbin/cowtapd --platform xen --backend-type qdisk' "$unit" || { echo "bad ExecStart"; exit 1; }
grep -q '^Type=notify' "$unit" || { echo "not Type=notify"; exit 1; }
if grep -q '@[A-Z]*@' "$unit" "$d/usr/share/doc/cowtap/example-guest.cfg"; then echo "placeholder left"; exit 1; fi
grep -q 'device_model_override = "/usr/lib/cowtap/cowtap-xenpv-dm"' "$d/usr/share/doc/cowtap/example-guest.cfg" ||
  { echo "example config does not name the installed stand-in"; exit 1; }
if command -v systemd-analyze >/dev/null 2>&1; then
  # Only complaints about the unit itself count (the scratch root lacks
  # xen.service and friends, which Wants= tolerates).
  out=$(systemd-analyze verify --root="$d" "$unit" 2>&1 || true)
  if echo "$out" | grep -E 'cowtapd.service:[0-9]+:' ; then echo "systemd-analyze: $out"; exit 1; fi
fi
echo "install ok"
