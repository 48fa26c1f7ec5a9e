#!/bin/sh
# `make install`: cowtapd, cowtap, cowtap-xenpv-dm, the systemd unit, the xl
# docs and an example guest config. DESTDIR and PREFIX as usual; the unit goes
# to $SYSTEMDUNITDIR (default $PREFIX/lib/systemd/system, which systemd reads
# for PREFIX=/usr/local and /usr).
# Usage: tools/xl/install.sh <build-dir> [DESTDIR] [PREFIX]
set -eu
build=${1:?usage: $0 <build-dir> [DESTDIR] [PREFIX]}
destdir=${2:-}
prefix=${3:-/usr/local}
src=$(cd "$(dirname "$0")/../.." && pwd)
unitdir=${SYSTEMDUNITDIR:-$prefix/lib/systemd/system}
sbindir=$prefix/sbin
libexecdir=$prefix/lib/cowtap
docdir=$prefix/share/doc/cowtap
for f in tools/cowtapd tools/cowtap tools/xl/cowtap-xenpv-dm; do
  [ -x "$build/$f" ] || { echo "install: $build/$f is not built (make build first)" >&2; exit 1; }
done
install -D -m 0755 "$build/tools/cowtapd" "$destdir$sbindir/cowtapd"
install -D -m 0755 "$build/tools/cowtap" "$destdir$prefix/bin/cowtap"
install -D -m 0755 "$build/tools/xl/cowtap-xenpv-dm" "$destdir$libexecdir/cowtap-xenpv-dm"
mkdir -p "$destdir$unitdir"
sed -e "s|@SBINDIR@|$sbindir|g" -e "s|@DOCDIR@|$docdir|g" "$src/tools/xl/cowtapd.service" \
  > "$destdir$unitdir/cowtapd.service"
chmod 0644 "$destdir$unitdir/cowtapd.service"
install -D -m 0644 "$src/docs/xl.md" "$destdir$docdir/xl.md"
sed -e "s|@LIBEXECDIR@|$libexecdir|g" "$src/tools/xl/example-guest.cfg" > "$destdir$docdir/example-guest.cfg"
echo "installed into ${destdir:-/}$prefix (unit: $destdir$unitdir/cowtapd.service)"
[ -z "$destdir" ] && command -v systemctl >/dev/null 2>&1 && systemctl daemon-reload 2>/dev/null || true
