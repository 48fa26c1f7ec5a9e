#!/usr/bin/env bash
# End-to-end tests of the `cowtap` image CLI: runs the built binary in a
# temporary directory and checks its output, its exit codes and the bytes it
# reads and writes, with qemu-img / qemu-io as the oracle where they apply.
#
# usage: cowtap_cli_test.sh COWTAP_BINARY SECTION
#   SECTION raw   : every command on raw images, bad arguments, missing,
#                   truncated and garbage files
#   SECTION qcow2 : overlays over raw bases, qcow2 creation options, corrupt
#                   qcow2 headers
#   SECTION qcow  : qcow v1 images written by qemu-img
# Exit status: 0 all passed, 1 a check failed, 77 the section's format is not
# implemented in this build yet (ctest reports the test as skipped).
set -u

COWTAP=$(realpath "$1")
SECTION=${2:-raw}
work=$(mktemp -d "${TMPDIR:-/tmp}/cowtap-cli-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1

passed=0
failed=0

pass() { passed=$((passed + 1)); }
fail() {
  failed=$((failed + 1))
  echo "FAIL: $*"
  echo "  stdout: $(head -c 600 out 2>/dev/null)"
  echo "  stderr: $(head -c 600 err 2>/dev/null)"
}
check() {  # check DESCRIPTION COMMAND...: passes when the command succeeds
  local desc=$1
  shift
  if "$@" >/dev/null 2>&1; then pass; else fail "$desc"; fi
}

# run ARGS...: runs cowtap with stdout in ./out, stderr in ./err, status in $rc.
run() {
  "$COWTAP" "$@" >out 2>err
  rc=$?
}
expect_rc() {  # expect_rc WANT DESCRIPTION
  if [ "$rc" -eq "$1" ]; then pass; else fail "$2 (exit $rc, want $1)"; fi
}
out_has() { grep -qF -- "$1" out && pass || fail "stdout lacks '$1'"; }
err_has() { grep -qF -- "$1" err && pass || fail "stderr lacks '$1'"; }
# expect_error WANT_TEXT ARGS...: the command must fail with exit 1 and a
# "cowtap <command>: ..." line on stderr containing WANT_TEXT.
expect_error() {
  local want=$1
  shift
  run "$@"
  if [ "$rc" -eq 1 ] && grep -qF -- "$want" err && grep -q "^cowtap" err; then
    pass
  else
    fail "cowtap $* should fail (exit 1) saying '$want' (exit $rc)"
  fi
}
# json_check PYTHON_EXPRESSION: evaluates the expression with j = parsed ./out.
json_check() {
  if python3 -c "import json,sys; j=json.load(open('out')); sys.exit(0 if ($1) else 1)" 2>/dev/null; then
    pass
  else
    fail "JSON check failed: $1"
  fi
}
size_of() { stat -c %s "$1"; }

# Extents of a map --json in ./out and of qemu-img map --output=json of the
# same image must describe the same bytes the same way. Neighbouring extents
# with the same attributes are merged first (the tools split differently).
compare_map_with_qemu() {
  local image=$1 format=$2
  qemu-img map -f "$format" --output=json "$image" >qemu-map.json 2>/dev/null || {
    fail "qemu-img map $image"
    return
  }
  if python3 - out qemu-map.json <<'EOF'; then pass; else fail "map of $image differs from qemu-img map"; fi
import json, sys
def runs(path):
    merged = []
    for e in json.load(open(path)):
        key = (e["depth"], bool(e["data"]), bool(e["zero"]))
        if merged and merged[-1][0] + merged[-1][1] == e["start"] and merged[-1][2] == key:
            merged[-1][1] += e["length"]
        else:
            merged.append([e["start"], e["length"], key])
    return merged
ours, theirs = runs(sys.argv[1]), runs(sys.argv[2])
if ours != theirs:
    print("cowtap:", ours, "\nqemu-img:", theirs)
    sys.exit(1)
EOF
}

# ---------------------------------------------------------------------------
section_raw() {
  # Help texts list every command and document the check exit codes.
  run --help
  expect_rc 0 "--help"
  for c in create info check map dump read write zero discard; do out_has "$c"; done
  run check --help
  expect_rc 0 "check --help"
  out_has "63"
  out_has "leaked"
  run create --help
  out_has "SIZE"

  # create
  run create -f raw disk.raw 4M
  expect_rc 0 "create raw"
  out_has "Created disk.raw"
  out_has "format=raw"
  out_has "(4194304 bytes)"
  out_has " ms"
  [ "$(size_of disk.raw)" = 4194304 ] && pass || fail "disk.raw is not 4 MiB"
  expect_error "exists" create -f raw disk.raw 1M
  [ "$(size_of disk.raw)" = 4194304 ] && pass || fail "refused create changed disk.raw"
  run create -f raw --force disk.raw 4M
  expect_rc 0 "create --force"
  run create -f raw sized.raw 0x1800
  expect_rc 0 "create with a hex size"
  [ "$(size_of sized.raw)" = 6144 ] && pass || fail "hex size"

  # info, against qemu-img info
  run info disk.raw
  expect_rc 0 "info"
  out_has "image: disk.raw"
  out_has "file format: raw"
  out_has "virtual size: 4 MiB (4194304 bytes)"
  run info --json disk.raw
  expect_rc 0 "info --json"
  json_check "j['format'] == 'raw' and j['virtual-size'] == 4194304 and j['filename'] == 'disk.raw'"
  qemu_size=$(qemu-img info -f raw --output=json disk.raw | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
  json_check "j['virtual-size'] == $qemu_size"
  run info --backing-chain --json disk.raw
  json_check "isinstance(j, list) and len(j) == 1 and j[0]['format'] == 'raw'"

  # write from a file, read back through cowtap and straight from the file
  head -c 65536 /dev/urandom >pattern
  run write disk.raw 1M --from pattern
  expect_rc 0 "write --from file"
  out_has "wrote 65536 bytes at offset 1048576"
  check "write landed at 1 MiB" cmp pattern <(dd if=disk.raw bs=64K skip=16 count=1 status=none)
  run read disk.raw 1M 64K
  expect_rc 0 "read"
  check "read returns what was written" cmp out pattern
  [ "$(size_of disk.raw)" = 4194304 ] && pass || fail "write changed the image size"

  # unaligned write from standard input
  head -c 1000 /dev/urandom >small
  "$COWTAP" write disk.raw 12345 --from - <small >out 2>err
  rc=$?
  expect_rc 0 "write --from -"
  check "stdin write landed at 12345" cmp small <(tail -c +12346 disk.raw | head -c 1000)
  run read disk.raw 12345 1000
  check "unaligned read" cmp out small

  # read --hex matches the bytes (checked against a Python rendering)
  run read --hex disk.raw 12345 40
  expect_rc 0 "read --hex"
  if python3 - small out <<'EOF'; then pass; else fail "read --hex output"; fi
import sys
data = open(sys.argv[1], "rb").read()[:40]
lines = open(sys.argv[2]).read().splitlines()
assert len(lines) == 3, lines
for n, line in enumerate(lines):
    chunk = data[16 * n:16 * n + 16]
    assert line.startswith("%08x  " % (12345 + 16 * n)), line
    hexes = line[10:59].split()
    assert hexes == ["%02x" % b for b in chunk], (hexes, chunk)
    ascii = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
    assert line.endswith("|" + ascii + "|"), line
EOF

  # writes that do not fit are refused before anything is written
  sum_before=$(sha256sum disk.raw)
  expect_error "beyond the image size" write disk.raw $((4194304 - 100)) --from pattern
  head -c 300 /dev/urandom | "$COWTAP" write disk.raw $((4194304 - 100)) --from - >out 2>err
  rc=$?
  expect_rc 1 "stdin write past the end"
  err_has "beyond the image size"
  [ "$(sha256sum disk.raw)" = "$sum_before" ] && pass || fail "a refused write changed disk.raw"
  expect_error "opening missing-input" write disk.raw 0 --from missing-input

  # zero and discard
  run zero disk.raw 1M 4K
  expect_rc 0 "zero"
  out_has "zeroed 4096 bytes at offset 1048576"
  run read disk.raw 1M 4K
  check "zeroed range reads as zeros" cmp out <(head -c 4096 /dev/zero)
  run read disk.raw $((1048576 + 4096)) 61440
  check "bytes after the zeroed range intact" cmp out <(tail -c +4097 pattern)
  run zero --unmap disk.raw $((1048576 + 8192)) 8K
  expect_rc 0 "zero --unmap"
  run read disk.raw $((1048576 + 8192)) 8K
  check "zero --unmap reads as zeros" cmp out <(head -c 8192 /dev/zero)
  run discard disk.raw $((1048576 + 32768)) 32K
  expect_rc 0 "discard"
  out_has "discarded 32768 bytes"
  run read disk.raw $((1048576 + 32768)) 32K
  check "discarded range reads as zeros" cmp out <(head -c 32768 /dev/zero)
  expect_error "beyond the image size" zero disk.raw 4M 1
  expect_error "beyond the image size" discard disk.raw 1 4M

  # dump equals the file, byte for byte (raw: guest bytes are file bytes)
  "$COWTAP" dump disk.raw >dumped 2>err
  rc=$?
  expect_rc 0 "dump"
  check "dump equals the raw file" cmp dumped disk.raw
  if script -qec "true" /dev/null >/dev/null 2>&1; then
    script -qec "$COWTAP dump disk.raw" /dev/null >tty-out 2>&1
    rc=$?
    expect_rc 1 "dump to a terminal"
    grep -q "terminal" tty-out && pass || fail "dump to a terminal should explain the refusal"
    script -qec "$COWTAP read disk.raw 0 1M" /dev/null >tty-out 2>&1
    rc=$?
    expect_rc 1 "large binary read to a terminal"
  fi

  # map: same extents as qemu-img map, and holes read as zeros
  run map --json disk.raw
  expect_rc 0 "map --json"
  json_check "all(k in e for e in j for k in ('start','length','depth','present','zero','data'))"
  json_check "sum(e['length'] for e in j) == 4194304 and j[0]['start'] == 0"
  json_check "all(a['start'] + a['length'] == b['start'] for a, b in zip(j, j[1:]))"
  json_check "any(e['data'] and e['start'] <= 1048576 + 16384 < e['start'] + e['length'] for e in j)"
  compare_map_with_qemu disk.raw raw
  run map disk.raw
  expect_rc 0 "map"
  out_has "Offset"
  out_has "disk.raw"
  run map --json --start-offset 1M --max-length 64K disk.raw
  expect_rc 0 "map with a window"
  json_check "j[0]['start'] == 1048576 and sum(e['length'] for e in j) == 65536"

  # check: raw has no check (63), or the check is not implemented yet
  run check disk.raw
  if grep -q "not implemented yet" err; then
    echo "SKIP: check on raw (CheckImage not implemented yet)"
  else
    expect_rc 63 "check on raw"
    err_has "does not support checks"
  fi

  # missing files
  for c in info map dump check; do expect_error "missing.raw" "$c" missing.raw; done
  expect_error "no such file" info missing.raw
  expect_error "no such file" read missing.raw 0 1
  expect_error "no such file" zero missing.raw 0 1
  expect_error "no such file" create -f qcow2 -b missing.raw over.qcow2

  # bad arguments
  run
  expect_rc 1 "no command"
  expect_error "unknown command 'frobnicate'" frobnicate
  expect_error "IMAGE" create
  expect_error "vmdk" create -f vmdk x.img 1M
  expect_error "give a SIZE" create -f raw nosize.raw
  expect_error "invalid size" create -f raw badsize.raw 12Q
  expect_error "invalid size" create -f raw badsize.raw -- -5
  [ -e badsize.raw ] && fail "failed create left a file" || pass
  expect_error "unknown option 'frob'" create -o frob=1 opt.qcow2 1M
  expect_error "cluster_size" create -o cluster_size=3000 opt.qcow2 1M
  expect_error "-F needs a backing image" create -F raw opt.qcow2 1M
  expect_error "LENGTH" read disk.raw 0
  expect_error "invalid size" read disk.raw abc 1
  expect_error "beyond the image size" read disk.raw 4M 1
  expect_error "beyond the image size" read disk.raw 18446744073709551615 2
  expect_error "--from" write disk.raw 0
  expect_error "repair" check --repair bogus disk.raw
  expect_error "LENGTH" zero disk.raw 0

  # truncated and garbage files are errors, never crashes
  printf 'QFI\xfb\x00\x00\x00\x09' >v9.img
  head -c 500 /dev/urandom >>v9.img
  for c in info map dump; do expect_error "version 9" "$c" v9.img; done
  expect_error "v9.img" read v9.img 0 1
  expect_error "v9.img" check v9.img
  qemu-img create -q -f qcow2 trunc.qcow2 1M
  truncate -s 50 trunc.qcow2
  for c in info map dump check; do expect_error "trunc.qcow2" "$c" trunc.qcow2; done
  expect_error "trunc.qcow2" read trunc.qcow2 0 1
  expect_error "trunc.qcow2" write trunc.qcow2 0 --from small
  { printf 'QFI\xfb\x00\x00\x00\x03'; head -c 4088 /dev/urandom; } >garbage.qcow2
  for c in info map dump check; do expect_error "garbage.qcow2" "$c" garbage.qcow2; done
  { printf 'QFI\xfb\x00\x00\x00\x01'; head -c 4088 /dev/urandom; } >garbage.qcow
  for c in info map dump; do expect_error "garbage.qcow" "$c" garbage.qcow; done
  # -f raw on a qcow2 file reads it as raw bytes: allowed, and exact.
  run read -f raw garbage.qcow2 0 8
  check "-f raw skips probing" cmp out <(head -c 8 garbage.qcow2)
}

# Skips the section (exit 77) when the format is not implemented in this build.
require_format() {
  local format=$1 probe=$2
  run info -f "$format" "$probe"
  if [ "$rc" -ne 0 ] && grep -q "not implemented yet" err; then
    echo "SKIP: $format is not implemented yet in this build ($(cat err))"
    exit 77
  fi
}

# ---------------------------------------------------------------------------
section_qcow2() {
  qemu-img create -q -f qcow2 probe.qcow2 1M
  require_format qcow2 probe.qcow2

  head -c 4194304 /dev/urandom >base.raw
  truncate -s 4M base.raw
  dd if=/dev/zero of=base.raw bs=1M seek=3 count=1 conv=notrunc status=none
  base_sum=$(sha256sum base.raw)

  # An overlay without a size takes the backing image's.
  run create -f qcow2 -b base.raw -F raw ov.qcow2
  expect_rc 0 "create overlay"
  out_has "(4194304 bytes)"
  out_has "backing=base.raw"
  check "qemu-img check on a new overlay" qemu-img check -q ov.qcow2
  qemu-img info --output=json ov.qcow2 >out
  json_check "j['virtual-size'] == 4194304 and j['backing-filename'] == 'base.raw' and j['format'] == 'qcow2'"

  run info --json ov.qcow2
  expect_rc 0 "info --json overlay"
  json_check "j['format'] == 'qcow2' and j['virtual-size'] == 4194304 and j['cluster-size'] == 65536"
  json_check "j['backing-filename'] == 'base.raw' and j['backing-filename-format'] == 'raw'"
  json_check "j['format-specific']['type'] == 'qcow2' and j['format-specific']['data']['compat'] == '1.1'"
  run info --backing-chain --json ov.qcow2
  json_check "len(j) == 2 and j[0]['format'] == 'qcow2' and j[1]['format'] == 'raw'"
  run info --backing-chain ov.qcow2
  out_has "backing file: base.raw"
  out_has "image: base.raw"

  # Writes go to the overlay only; reads merge the chain, as qemu-img sees it.
  head -c 100000 /dev/urandom >pattern
  run write ov.qcow2 $((2 * 1048576 + 4000)) --from pattern
  expect_rc 0 "write into overlay"
  run zero ov.qcow2 1M 64K
  expect_rc 0 "zero in overlay"
  [ "$(sha256sum base.raw)" = "$base_sum" ] && pass || fail "writing the overlay changed the base"
  check "qemu-img check after writes" qemu-img check -q ov.qcow2
  run read ov.qcow2 $((2 * 1048576 + 4000)) 100000
  check "read back through the overlay" cmp out pattern
  "$COWTAP" dump ov.qcow2 >dumped 2>err
  rc=$?
  expect_rc 0 "dump overlay"
  qemu-img convert -O raw ov.qcow2 qemu-dump.raw
  check "dump equals qemu-img convert" cmp dumped qemu-dump.raw
  check "qemu-io sees the written bytes" qemu-io -c "read -P 0 1M 64k" ov.qcow2
  run map --json ov.qcow2
  expect_rc 0 "map --json overlay"
  compare_map_with_qemu ov.qcow2 qcow2
  json_check "any(e['depth'] == 0 and e['data'] for e in j) and any(e['depth'] == 1 for e in j)"

  run check ov.qcow2
  if grep -q "not implemented yet" err; then
    echo "SKIP: check on qcow2 (CheckImage not implemented yet)"
  else
    expect_rc 0 "check on a clean overlay"
    out_has "No errors were found on the image."
    run check --json ov.qcow2
    json_check "j['check-errors'] == 0 and j['leaks'] == 0 and j['format'] == 'qcow2'"
  fi

  # check's exit codes on a leaked and on a corrupt image, as qemu-img gives
  # them. The image has clusters 0-5 in use (header, refcount table and block,
  # L1, L2, data); its refcount block is at 128 KiB.
  run check ov.qcow2
  if grep -q "not implemented yet" err; then
    echo "SKIP: check exit codes (CheckImage not implemented yet)"
  else
    qemu-img create -q -f qcow2 ref.qcow2 4M
    qemu-io -c "write -P 1 0 64k" ref.qcow2 >/dev/null
    if [ "$(size_of ref.qcow2)" = 393216 ]; then
      cp ref.qcow2 leak.qcow2
      truncate -s 458752 leak.qcow2  # cluster 6 exists, is referenced by nothing...
      printf '\x00\x01' | dd of=leak.qcow2 bs=1 seek=$((131072 + 12)) conv=notrunc status=none  # ...refcount 1
      check "qemu-img agrees leak.qcow2 leaks" bash -c "qemu-img check -q leak.qcow2; [ \$? -eq 3 ]"
      run check leak.qcow2
      expect_rc 3 "check on a leaking image"
      out_has "1 leaked clusters were found"
      run check --json leak.qcow2
      expect_rc 3 "check --json on a leaking image"
      json_check "j['leaks'] == 1 and j['check-errors'] == 0"
      run check --repair leaks leak.qcow2
      expect_rc 0 "check --repair leaks"
      out_has "1 leaked clusters"
      check "qemu-img check after repair" qemu-img check -q leak.qcow2
      cp ref.qcow2 corrupt.qcow2
      printf '\x00\x00' | dd of=corrupt.qcow2 bs=1 seek=$((131072 + 10)) conv=notrunc status=none  # data cluster refcount 0
      check "qemu-img agrees corrupt.qcow2 is corrupt" bash -c "qemu-img check -q corrupt.qcow2 2>/dev/null; [ \$? -eq 2 ]"
      run check corrupt.qcow2
      expect_rc 2 "check on a corrupt image"
      out_has "errors were found on the image"
      run check --json corrupt.qcow2
      json_check "j['check-errors'] > 0"
    else
      fail "qemu-img made an unexpected layout; the check exit-code cases need updating"
    fi
  fi

  # dump --snapshot: an internal snapshot's bytes, as qemu-img convert -l gives them.
  qemu-img create -q -f qcow2 snap.qcow2 1M
  qemu-io -c "write -P 0x61 0 64k" snap.qcow2 >/dev/null
  qemu-img snapshot -c before snap.qcow2
  qemu-io -c "write -P 0x62 0 128k" snap.qcow2 >/dev/null
  run info --json snap.qcow2
  json_check "[s['name'] for s in j.get('snapshots', [])] == ['before']"
  "$COWTAP" dump --snapshot before snap.qcow2 >dumped 2>err
  rc=$?
  expect_rc 0 "dump --snapshot"
  qemu-img convert -l snapshot.name=before -O raw snap.qcow2 qemu-snap.raw
  check "dump --snapshot equals qemu-img convert -l" cmp dumped qemu-snap.raw
  "$COWTAP" dump snap.qcow2 >dumped 2>err
  qemu-img convert -O raw snap.qcow2 qemu-snap.raw
  check "dump of the active layer next to a snapshot" cmp dumped qemu-snap.raw
  expect_error "nosuch" dump --snapshot nosuch snap.qcow2

  # Creation options land in the header (qemu-img is the judge).
  run create -o cluster_size=4k,refcount_bits=8,lazy_refcounts=on small.qcow2 1M
  expect_rc 0 "create with options"
  qemu-img info --output=json small.qcow2 >out
  json_check "j['cluster-size'] == 4096 and j['format-specific']['data']['refcount-bits'] == 8"
  json_check "j['format-specific']['data']['lazy-refcounts'] == True"
  run create -o compat=0.10 v2.qcow2 1M
  expect_rc 0 "create compat=0.10"
  qemu-img info --output=json v2.qcow2 >out
  json_check "j['format-specific']['data']['compat'] == '0.10'"
  run create -o compression_type=zstd zstd.qcow2 1M
  qemu-img info --output=json zstd.qcow2 >out
  json_check "j['format-specific']['data']['compression-type'] == 'zstd'"

  # Images qemu-img made read the same in cowtap.
  qemu-img create -q -f qcow2 -o cluster_size=2M big.qcow2 10M
  qemu-io -c "write -P 0x5a 3M 1M" big.qcow2 >/dev/null
  run info --json big.qcow2
  json_check "j['cluster-size'] == 2097152 and j['virtual-size'] == 10485760"
  run read big.qcow2 3M 1M
  check "read of a qemu-written 2M-cluster image" cmp out <(head -c 1048576 /dev/zero | tr '\0' 'Z')

  # A missing backing file and a corrupt L1 offset are errors, not crashes.
  qemu-img create -q -f qcow2 -u -b gone.raw -F raw orphan.qcow2 1M
  for c in info map dump; do expect_error "gone.raw" "$c" orphan.qcow2; done
  qemu-img create -q -f qcow2 badl1.qcow2 1M
  printf '\x00\x00\x00\x00\x00\x00\x12\x34' | dd of=badl1.qcow2 bs=1 seek=40 conv=notrunc status=none
  for c in info map dump; do expect_error "badl1.qcow2" "$c" badl1.qcow2; done
}

section_qcow() {
  qemu-img create -q -f qcow probe.qcow 1M
  require_format qcow probe.qcow
  qemu-img create -q -f qcow v1.qcow 4M
  qemu-io -f qcow -c "write -P 0x11 64k 64k" -c "write -P 0x22 3M 4k" v1.qcow >/dev/null
  run info --json v1.qcow
  expect_rc 0 "info qcow"
  json_check "j['format'] == 'qcow' and j['virtual-size'] == 4194304"
  "$COWTAP" dump v1.qcow >dumped 2>err
  rc=$?
  expect_rc 0 "dump qcow"
  qemu-img convert -f qcow -O raw v1.qcow qemu-dump.raw
  check "qcow dump equals qemu-img convert" cmp dumped qemu-dump.raw
  run map --json v1.qcow
  compare_map_with_qemu v1.qcow qcow
}

case "$SECTION" in
  raw) section_raw ;;
  qcow2) section_qcow2 ;;
  qcow) section_qcow ;;
  *) echo "unknown section $SECTION" >&2; exit 2 ;;
esac

echo "cowtap CLI tests ($SECTION): $passed passed, $failed failed"
[ "$failed" -eq 0 ]
