#!/bin/bash
# Boots Xen 4.17 + a Debian 6.1 dom0 under QEMU (TCG) and runs
# cowtap_libxen_smoke in dom0: the libxen platform against a real hypervisor.
# Not part of `make test` (needs ~1-2 min and the packages below).
#
# Needs (Debian 12): qemu-system-x86 xen-hypervisor-4.17-amd64 xen-utils-4.17
# busybox-static cpio, and the kernel package that linux-image-amd64 names
# (fetched with apt-get download, unpacked with dpkg-deb -x; nothing installed).
# Usage: xen-glue/xen_lab_smoke.sh <build-dir> [work-dir]
# Exit: 0 all checks passed, 1 a check failed or the VM did not run them,
# 77 a prerequisite is missing (ctest reports a skip).
set -euo pipefail
build=$(realpath "${1:?usage: $0 <build-dir> [work-dir]}")
work=${2:-/tmp/cowtap-xenlab}
smoke="$build/xen-glue/cowtap_libxen_smoke"
[[ -x "$smoke" ]] || { echo "build the cowtap_libxen_smoke target first" >&2; exit 1; }
for tool in qemu-system-x86_64 busybox cpio; do
  command -v "$tool" >/dev/null || { echo "skip: missing $tool (see the header)" >&2; exit 77; }
done
[[ -f /boot/xen-4.17-amd64.gz ]] || { echo "skip: missing xen-hypervisor-4.17-amd64" >&2; exit 77; }
[[ -x /usr/lib/xen-4.17/bin/xenstored ]] || { echo "skip: missing xen-utils-4.17" >&2; exit 77; }
mkdir -p "$work" && cd "$work"

kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
if [[ ! -d k ]]; then
  apt-get download "$kpkg" >/dev/null 2>&1 || { echo "skip: cannot download $kpkg" >&2; exit 77; }
  dpkg-deb -x "$kpkg"_*.deb k
fi
kver=${kpkg#linux-image-}
mods=k/lib/modules/$kver/kernel/drivers/xen

rm -rf root
mkdir -p root/{bin,proc,sys,dev,run,tmp,var/run/xenstored,var/lib/xenstored,var/lib/xen,var/log/xen,lib/modules}
cp "$(command -v busybox)" root/bin/busybox
cp "$mods"/{xen-evtchn,xen-gntdev,xen-gntalloc,xen-privcmd}.ko "$mods"/xenfs/xenfs.ko root/lib/modules/
for bin in /usr/lib/xen-4.17/bin/xenstored /usr/lib/xen-4.17/bin/xen-init-dom0 "$smoke"; do
  cp "$bin" root/bin/
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "root$(dirname "$lib")" && cp -L "$lib" "root$lib"
  done
done
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run
mkdir -p /run/xenstored
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs; do insmod /lib/modules/$m.ko; done
mkdir -p /proc/xen && mount -t xenfs xenfs /proc/xen
xenstored --pid-file /run/xenstored.pid && sleep 1 && xen-init-dom0
echo "=== cowtap_libxen_smoke ==="
cowtap_libxen_smoke
echo "=== smoke exit $? ==="
poweroff -f
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../dom0-initrd.gz)
gunzip -c /boot/xen-4.17-amd64.gz > xen.elf
cp "k/boot/vmlinuz-$kver" vmlinuz

timeout 600 qemu-system-x86_64 -accel tcg,thread=multi -cpu qemu64,+svm -m 2048 -smp 2 -nographic -no-reboot \
  -kernel xen.elf -append "console=com1 com1=115200 dom0_mem=1024M noreboot" \
  -initrd "vmlinuz console=hvc0,dom0-initrd.gz" > vm.log 2>&1 || true
sed -n '/=== cowtap_libxen_smoke ===/,/=== smoke exit/p' vm.log
grep -q "=== smoke exit 0 ===" vm.log
