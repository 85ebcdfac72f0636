#!/usr/bin/env bash
# A CI job's scratch space on zfs_ram: a compressed RAM directory that gives its memory back
# when files are deleted, removed again when the job ends (also when it fails).
#
#   examples/ci-scratch.sh                 build and test a small C program and a venv in it
#   examples/ci-scratch.sh CMD [ARGS...]   run CMD in the scratch directory instead
#
# CMD runs with its working directory and $SCRATCH set to the mount. The script exits with
# CMD's status, after printing the mount's memory statistics and unmounting it.
# Environment: ZFS_RAM (the zfs-ram command, default: zfs-ram on PATH), SCRATCH_OPTIONS (mount
# options, default size=512m,noxattr: builds need no extended attributes, and without them
# every write costs the daemon one request instead of two).
set -euo pipefail

zfs_ram=${ZFS_RAM:-zfs-ram}
options=${SCRATCH_OPTIONS:-size=512m,noxattr}
base=$(mktemp -d "${TMPDIR:-/tmp}/ci-scratch.XXXXXX")
export SCRATCH="$base/mnt"
mkdir "$SCRATCH"

cleanup() {
    local status=$?
    cd /
    if grep -qF " $SCRATCH " /proc/self/mountinfo; then
        # What the job cost: zram's mm_stat line and the zramctl-like table.
        echo "mm_stat: $(cat "$SCRATCH/.zfs_ram/mm_stat" 2>/dev/null || echo unavailable)"
        "$zfs_ram" stat "$SCRATCH" || true
        # A busy mount (a background job still inside) is detached rather than left behind.
        "$zfs_ram" umount "$SCRATCH" || "$zfs_ram" umount -z "$SCRATCH" || true
    fi
    rmdir "$SCRATCH" "$base" 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$zfs_ram" mount "$SCRATCH" -o "$options"
echo "scratch: $SCRATCH ($options)"
cd "$SCRATCH"

demo_job() {
    # 1. Unpack a source tree (kernel UAPI headers) and compile against the copy.
    mkdir include
    tar -C /usr/include -cf - linux asm-generic | tar -C include -xf -
    diff -r /usr/include/linux include/linux
    cat > crc.c <<'EOF'
#include <linux/types.h>
#include <stdio.h>
#include <stdlib.h>
/* CRC-32 of a pseudo-random buffer, written to and read back from the scratch directory. */
static __u32 crc32(const unsigned char *p, size_t n) {
    __u32 c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & -(c & 1u));
    }
    return ~c;
}
int main(void) {
    enum { N = 8 << 20 };
    unsigned char *a = malloc(N), *b = malloc(N);
    unsigned x = 12345;
    for (size_t i = 0; i < N; i++) { x = x * 1103515245u + 12345u; a[i] = (x >> 16) & 0x0F; }
    FILE *f = fopen("blob", "wb");
    if (!f || fwrite(a, 1, N, f) != N || fclose(f)) return 1;
    f = fopen("blob", "rb");
    if (!f || fread(b, 1, N, f) != N || fclose(f)) return 2;
    __u32 ca = crc32(a, N), cb = crc32(b, N);
    printf("crc32 written %08x read %08x\n", ca, cb);
    return ca != cb;
}
EOF
    cc -O2 -I include -o crc crc.c  # -I: the copied headers win over /usr/include
    ./crc
    # 2. A Python virtual environment, used for a real import and byte-compilation.
    python3 -m venv --without-pip venv
    venv/bin/python -c 'import json, sys; print("venv python", sys.version.split()[0],
                                              json.dumps({"ok": True}))'
    venv/bin/python -m compileall -q include >/dev/null 2>&1 || true
    rm -rf include blob
}

# No "|| status=..." here: bash ignores set -e inside anything tested that way, so a failing
# step would go unnoticed. A failure ends the script; the EXIT trap reports and unmounts.
if (($#)); then
    "$@"
else
    demo_job
fi
