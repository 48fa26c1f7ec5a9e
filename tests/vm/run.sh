#!/bin/bash
# Proof in a real kernel (issue 6): boots Debian's own kernel (the package
# linux-image-amd64 names, only downloaded and unpacked, never installed)
# under QEMU with a busybox initramfs holding dm-mod, loop and nbd, the dm
# test binaries and their shared libraries. Inside, init.sh loads the
# modules, runs the real-kernel tests of dm/kernel_test.cc (LoopDevice,
# NbdDevice, the libdevmapper DeviceMapper: a skip inside the VM is a
# failure, since that is where they must run) and, when built, the
# end-to-end offload test (cowtap_vm_offload_e2e: a dm table of loop-linear
# and nbd-miss segments over a qcow2 overlay served by cowtap's engine,
# a verified random workload with reloads under load). Afterwards the host
# checks the image the VM left (qemu-img check, content against the model
# the VM wrote) and prints the stages with timings and "N passed, M failed".
#
# Usage: tests/vm/run.sh <build-dir> [work-dir]
#   COWTAP_VM_BENCH=SECONDS   the `cowtap bench --offload` rows run this long
#                             per device and run (default 1.5; 0: not run)
#   COWTAP_VM_ACCEL=kvm|tcg   force an accelerator (default: kvm if it
#                             starts here, else tcg,thread=multi)
# Needs (Debian 12, installed here when missing and we are root):
#   qemu-system-x86 busybox-static cpio e2fsprogs qemu-utils binutils
# Exit: 0 all passed, 1 something failed, 77 a prerequisite is missing.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
src=$(cd "$(dirname "$0")/../.." && pwd)
build=$(realpath "${1:?usage: $0 <build-dir> [work-dir]}")
work=${2:-$build/vm-e2e}
dm_test="$build/dm/cowtap_dm_test"
e2e_bin="$build/tests/vm/cowtap_vm_offload_e2e"
cowtapd_bin="$build/tools/cowtapd"
cowtap_bin="$build/tools/cowtap"
mkdir -p "$work"
work=$(realpath "$work")
cd "$work"

declare -a stage_names=() stage_secs=()
stage_t0=0
now() { date +%s.%N; }
stage() {  # stage NAME: closes the previous stage, opens NAME
  local t; t=$(now)
  if [[ ${#stage_names[@]} -gt 0 ]]; then
    stage_secs+=("$(awk -v a="$t" -v b="$stage_t0" 'BEGIN{printf "%.1f", a - b}')")
  fi
  [[ -n "${1:-}" ]] && { stage_names+=("$1"); echo "=== stage: $1"; }
  stage_t0=$t
}
skip() { echo "skip: $*" >&2; exit 77; }
t_start=$(now)

# --- prerequisites ----------------------------------------------------------
stage prerequisites
[[ -x "$dm_test" ]] || { echo "build the cowtap_dm_test target first ($dm_test)" >&2; exit 1; }
host_pkgs=(qemu-system-x86 busybox-static cpio e2fsprogs qemu-utils binutils)
missing=()
for p in "${host_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  [[ $(id -u) -eq 0 ]] || skip "missing ${missing[*]} (and not root to install them)"
  echo "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    skip "cannot install ${missing[*]}"
fi
for tool in qemu-system-x86_64 qemu-img busybox cpio mkfs.ext4 debugfs strings strip ldd apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || skip "$tool not found"
done
mkdir -p debs stage
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
[[ -n "$kpkg" ]] || skip "cannot resolve linux-image-amd64 (apt-get update?)"
kver=${kpkg#linux-image-}
fetch() {  # fetch PACKAGE DIR: apt-get download + dpkg-deb -x, once
  [[ -d "stage/$2" ]] && return 0
  (cd debs && ls "$1"_*.deb >/dev/null 2>&1 || apt-get download "$1" >/dev/null 2>&1) || return 1
  rm -rf "stage/$2.tmp"
  dpkg-deb -x debs/"$1"_*.deb "stage/$2.tmp" && mv "stage/$2.tmp" "stage/$2"
}
fetch "$kpkg" kernel || skip "cannot download $kpkg"
have_e2e=0
[[ -x "$e2e_bin" ]] && have_e2e=1 || echo "note: $e2e_bin not built: the offload end-to-end stage is skipped"
bench_seconds=${COWTAP_VM_BENCH:-1.5}
[[ $bench_seconds == 0 ]] && bench_seconds=
have_service=0
[[ $have_e2e -eq 1 && -x "$cowtapd_bin" && -x "$cowtap_bin" ]] && have_service=1 ||
  echo "note: cowtapd or cowtap not built: the service stage (ctl offload) is skipped"

# --- images -------------------------------------------------------------------
stage images
rm -rf data && mkdir data
if [[ $have_e2e -eq 1 ]]; then
  # A qcow2 base with a pattern in its first half, and the overlay the VM
  # serves; the VM writes its model of the final content next to them.
  "$e2e_bin" fill-base data/base.raw $((32 << 20))
  qemu-img convert -q -f raw -O qcow2 -o cluster_size=65536 data/base.raw data/base.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=65536 -b base.qcow2 -F qcow2 data/overlay.qcow2 32M
  # The overlay the service stage offloads through cowtapd.
  [[ $have_service -eq 1 ]] && qemu-img create -q -f qcow2 -o cluster_size=65536 -b base.qcow2 -F qcow2 data/svc.qcow2 32M
  rm data/base.raw
fi
mkfs.ext4 -q -F -O ^metadata_csum,^has_journal -L cowtapvm -d data data.img 512M

# --- initramfs ----------------------------------------------------------------
stage initramfs
kmods=stage/kernel/lib/modules/$kver
modfile() {  # module name (either - or _) -> its .ko path
  local n=$1 f
  f=$(find "$kmods/kernel" \( -name "$n.ko" -o -name "${n//_/-}.ko" -o -name "${n//-/_}.ko" \) | head -1)
  [[ -n "$f" ]] || { echo "module $n not found in $kpkg" >&2; return 1; }
  echo "$f"
}
# The dependencies of a module: modules.dep where the package has one (it is
# written by depmod at install time, so an unpacked package usually has
# not), else the module's own modinfo "depends=" field, which is what depmod
# reads to write it.
mod_deps() {  # mod_deps KO_PATH -> names of its direct dependencies
  local f=$1 rel
  if [[ -f $kmods/modules.dep ]]; then
    rel=${f#"$kmods"/}
    sed -n "s|^$rel: *||p" "$kmods/modules.dep" | tr ' ' '\n' | sed 's|.*/||; s|\.ko.*||'
  else
    strings -a "$f" | sed -n 's/^depends=//p' | head -1 | tr ',' '\n'
  fi
}
declare -A mod_seen=()
mod_order=()
add_module() {  # add_module NAME: NAME after its dependencies, once
  local f d
  if grep -qE "/(${1}|${1//_/-}|${1//-/_})\.ko$" "$kmods/modules.builtin" 2>/dev/null; then return 0; fi
  f=$(modfile "$1")
  [[ -n "${mod_seen[$f]:-}" ]] && return 0
  mod_seen[$f]=1
  for d in $(mod_deps "$f"); do [[ -n $d ]] && add_module "$d"; done
  mod_order+=("$f")
}
copy_with_libs() {  # copy_with_libs ROOT FILE [DEST]: FILE and its ldd closure, without debug info
  local root=$1 bin=$2 dest=${3:-$2} lib
  mkdir -p "$root$(dirname "$dest")" && cp -L "$bin" "$root$dest"
  strip --strip-debug "$root$dest"
  for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*'); do
    [[ -e "$root$lib" ]] || { mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"; }
  done
  if ldd "$bin" 2>/dev/null | grep -q 'not found'; then
    echo "$bin: missing libraries: $(ldd "$bin" | grep 'not found' | tr -d '\t' | tr '\n' ' ')" >&2
    return 1
  fi
}
rm -rf root && mkdir -p root/{bin,sbin,proc,sys,dev,run,tmp,data,lib/modules}
cp "$(command -v busybox)" root/bin/busybox
# nbd, loop, dm-mod for the tests; virtio and ext4 for the data disk.
for m in dm-mod loop nbd virtio_pci virtio_blk crc32c_generic ext4; do add_module "$m"; done
for f in "${mod_order[@]}"; do cp "$f" root/lib/modules/; basename "$f" .ko; done > root/lib/modules/order
echo "modules: $(tr '\n' ' ' < root/lib/modules/order)"
copy_with_libs root "$dm_test" /bin/cowtap_dm_test
[[ $have_e2e -eq 1 ]] && copy_with_libs root "$e2e_bin" /bin/cowtap_vm_offload_e2e
if [[ $have_service -eq 1 ]]; then
  copy_with_libs root "$cowtapd_bin" /bin/cowtapd
  copy_with_libs root "$cowtap_bin" /bin/cowtap
fi
cp "$src/tests/vm/init.sh" root/init
chmod +x root/init
(cd root && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../initrd.gz)
cp "stage/kernel/boot/vmlinuz-$kver" vmlinuz
echo "initramfs: $(du -h initrd.gz | cut -f1)"

# --- the VM -------------------------------------------------------------------
# KVM when it starts here (a 3 s probe that must still be running), else TCG.
accel=${COWTAP_VM_ACCEL:-}
if [[ -z $accel ]]; then
  accel=tcg
  if [[ -r /dev/kvm && -w /dev/kvm ]]; then
    rc=0
    (timeout 3 qemu-system-x86_64 -accel kvm -M q35 -cpu host -display none -monitor none -serial none -nodefaults \
      >/dev/null 2>&1) 2>/dev/null || rc=$?
    [[ $rc -eq 124 ]] && accel=kvm
  fi
fi
case $accel in
  kvm) qaccel=(-accel kvm -cpu host) ;;
  *) qaccel=(-accel tcg,thread=multi -cpu max) ;;
esac
stage "vm (boot, tests; accel $accel)"
rc=0
timeout 780 qemu-system-x86_64 "${qaccel[@]}" -M q35 -m 1024 -smp 2 -nographic -no-reboot \
  -kernel vmlinuz -initrd initrd.gz \
  -append "console=ttyS0 loglevel=4 panic=-1 e2e=$have_e2e${bench_seconds:+ bench=$bench_seconds}" \
  -drive file=data.img,if=virtio,format=raw,cache=unsafe > vm.log 2>&1 || rc=$?
[[ $rc -eq 124 ]] && echo "the VM did not power off within 780 s (see $work/vm.log)"
tr -d '\r' < vm.log > vm.txt

# --- host-side checks ---------------------------------------------------------
stage "host checks"
passed=0 failed=0
check() {  # check NAME OK DETAIL
  if [[ $2 -eq 1 ]]; then passed=$((passed + 1)); echo "PASS $1 $3"; else failed=$((failed + 1)); echo "FAIL $1 $3"; fi
}
grep -q "=== vm done ===" vm.txt && check vm_finished 1 "" ||
  check vm_finished 0 "init did not reach its end (see $work/vm.log)"
# Every VMCHECK line the VM printed: "VMCHECK <name> PASS|FAIL <detail>".
while read -r _ name verdict detail; do
  [[ $verdict == PASS ]] && check "vm/$name" 1 "$detail" || check "vm/$name" 0 "$detail"
done < <(grep '^VMCHECK ' vm.txt || true)
if [[ $have_e2e -eq 1 ]]; then
  rm -rf out && mkdir out
  for f in overlay.qcow2 base.qcow2 expected.raw; do debugfs -R "dump /$f out/$f" data.img >/dev/null 2>&1 || true; done
  if [[ -s out/expected.raw && -s out/overlay.qcow2 ]]; then
    if qemu-img check -q out/overlay.qcow2 > out/check.txt 2>&1; then check host/qemu_img_check 1 "clean"; else
      check host/qemu_img_check 0 "$(head -3 out/check.txt | tr '\n' ' ')"; fi
    if (cd out && qemu-img compare -q -f qcow2 -F raw overlay.qcow2 expected.raw) > out/compare.txt 2>&1; then
      check host/content 1 "overlay (through its base) equals the VM's model"
    else check host/content 0 "$(head -3 out/compare.txt | tr '\n' ' ')"; fi
    qemu-img check -q out/base.qcow2 >/dev/null 2>&1 && check host/base_check 1 "" || check host/base_check 0 ""
  else
    check host/images 0 "the VM left no expected.raw / overlay.qcow2 in data.img"
  fi
  if [[ $have_service -eq 1 ]]; then
    for f in svc.qcow2 svc-expected.raw; do debugfs -R "dump /$f out/$f" data.img >/dev/null 2>&1 || true; done
    if [[ -s out/svc-expected.raw ]]; then
      if qemu-img check -q out/svc.qcow2 > out/svc-check.txt 2>&1; then check host/service_qemu_img_check 1 "clean"; else
        check host/service_qemu_img_check 0 "$(head -3 out/svc-check.txt | tr '\n' ' ')"; fi
      if (cd out && qemu-img compare -q -f qcow2 -F raw svc.qcow2 svc-expected.raw) > out/svc-compare.txt 2>&1; then
        check host/service_content 1 "the image cowtapd offloaded equals the VM's model"
      else check host/service_content 0 "$(head -3 out/svc-compare.txt | tr '\n' ' ')"; fi
    else
      check host/service_images 0 "the service stage left no svc-expected.raw in data.img"
    fi
  fi
fi
stage ""

# --- report -------------------------------------------------------------------
echo
echo "=== stages ==="
for i in "${!stage_names[@]}"; do printf '%-40s %8.1f s\n' "${stage_names[$i]}" "${stage_secs[$i]}"; done
grep -E '^VMSTAGE ' vm.txt | sed 's/^VMSTAGE /  vm: /' || true
printf '%-40s %8.1f s\n' total "$(awk -v a="$(now)" -v b="$t_start" 'BEGIN{printf "%.1f", a - b}')"
echo
echo "vm dm: $passed passed, $failed failed (logs: $work/vm.log)"
[[ $failed -eq 0 ]]
