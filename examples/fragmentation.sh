#!/usr/bin/env bash
# Fragmentation demo: does deleting files give memory back?
#
# Mounts zfs_ram on a temporary directory, fills it with a seeded mix of real files (copied
# from /usr/lib and /usr/share) and synthetic files of varied size and compressibility, deletes
# a random fraction of the files in a shuffled order, and prints zram's memory figures after
# each stage:
#   fill     after writing everything
#   delete   right after the delete
#   wait     after WAIT seconds idle (zfs_ram's background compactor works here; zram's doesn't)
#   compact  after `echo 1 > .zfs_ram/compact`
# ratio = mem_used / compr: memory per compressed byte. 1.0 is perfect packing; the kernel's
# zram on ext4 climbs to 1.4-1.9 after deleting half of the files and stays there until
# someone compacts it.
#
# Usage: bash examples/fragmentation.sh [FRACTION [SIZE_MIB [POOL [COMPACT [SEED]]]]]
#   FRACTION  share of the files to delete        (default 0.5)
#   SIZE_MIB  data to write, in MiB               (default 200)
#   POOL      zsmalloc or zbud                    (default zsmalloc)
#   COMPACT   auto (background compactor) or off  (default auto)
#   SEED      any integer; same seed, same files  (default 1)
# Environment: WAIT (seconds idle, default 5), REAL_SHARE (percent of bytes from real files,
# default 70), MIN_KIB (smallest real file taken, default 16: thousands of tiny files would
# make the fill slow, each file costs a few FUSE round trips; `zfs-ram experiment` takes all),
# KEEP=1 (print the mount point and keep it mounted until Enter is pressed).
# Needs zfs-ram on PATH (the venv's bin) and python3, find, awk, sort, xargs.
set -euo pipefail
export LC_ALL=C  # the same sort order, hence the same files, everywhere

fraction="${1:-0.5}"
size_mib="${2:-200}"
pool="${3:-zsmalloc}"
compact="${4:-auto}"
seed="${5:-1}"
wait_s="${WAIT:-5}"
real_share="${REAL_SHARE:-70}"
min_kib="${MIN_KIB:-16}"

case "$fraction" in ''|*[!0-9.]*) fraction=x ;; esac
awk -v f="$fraction" 'BEGIN { exit !(f == f + 0 && f >= 0 && f <= 1) }' \
    || { echo "fragmentation.sh: FRACTION must be a number in 0..1" >&2; exit 2; }
case "$pool" in zsmalloc|zbud) ;; *) echo "fragmentation.sh: POOL: zsmalloc or zbud" >&2; exit 2 ;;
esac
case "$size_mib$seed$wait_s$real_share$min_kib" in
    *[!0-9.]*) echo "fragmentation.sh: SIZE_MIB SEED WAIT REAL_SHARE MIN_KIB: numbers only" >&2
               exit 2 ;;
esac
command -v zfs-ram >/dev/null || { echo "fragmentation.sh: zfs-ram not on PATH" >&2; exit 2; }

budget=$(awk -v m="$size_mib" 'BEGIN { printf "%d", m * 1048576 }')
real_budget=$(( budget * real_share / 100 ))
synth_budget=$(( budget - real_budget ))

# --- mount, and always unmount on the way out -------------------------------------------------
tmp="$(mktemp -d /tmp/zfs_ram-demo.XXXXXX)"
mnt="$tmp/mnt"
mkdir "$mnt"
cleanup() {
    if grep -qs " $mnt " /proc/mounts; then
        zfs-ram umount "$mnt" 2>/dev/null || fusermount3 -u "$mnt" 2>/dev/null \
            || fusermount3 -u -z "$mnt" || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Room for all the data twice over: the demo must never hit ENOSPC.
zfs-ram mount "$mnt" -o "size=$(( budget * 2 + 64 * 1048576 )),pool=$pool,compact=$compact"
ctl="$mnt/.zfs_ram"
pid="$(cat "$ctl/pid")"

# --- one line per stage -----------------------------------------------------------------------
printf '%-8s %9s %9s %9s %7s %9s %8s %7s\n' \
    stage orig_MiB compr_MiB mem_MiB ratio compacted rss_MiB seconds
report() {  # report STAGE SECONDS
    local rss
    rss="$(awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$pid/status")"
    # mm_stat: orig compr mem_used mem_limit mem_used_max same_pages pages_compacted huge ...
    awk -v stage="$1" -v rss="$rss" -v secs="$2" '{
        ratio = ($2 > 0) ? sprintf("%.3f", $3 / $2) : "-"
        printf "%-8s %9.1f %9.1f %9.1f %7s %9d %8.1f %7.2f\n", stage,
            $1 / 1048576, $2 / 1048576, $3 / 1048576, ratio, $7, rss / 1048576, secs
    }' "$ctl/mm_stat"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# A seeded shuffle of stdin's lines (awk's rand() is deterministic for a given srand seed).
shuffle() {
    awk -v seed="$1" 'BEGIN { srand(seed) } { printf "%.15f\t%s\n", rand(), $0 }' \
        | sort -k1,1 | cut -f2-
}

# --- fill -------------------------------------------------------------------------------------
t0="$(now)"
# Real files: regular, MIN_KIB..16 MiB, picked in a seeded random order until the budget is
# met (files that would overshoot it are skipped). cp --parents keeps their /usr/... paths.
mkdir "$mnt/real"
find /usr/lib /usr/share -type f -size "+$(( min_kib * 1024 - 1 ))c" -size -16M \
        -printf '%s\t%p\n' 2>/dev/null \
    | grep -v $'\t.*\t' | sort -t$'\t' -k2 | shuffle "$seed" \
    | awk -F'\t' -v left="$real_budget" 'left > 0 && ($1 <= left || left < 4096) {
          print $2; left -= $1 }' \
    | xargs -d '\n' -r cp --parents -t "$mnt/real" 2>/dev/null || true

# Synthetic files: sizes log-uniform 4 KiB..1 MiB; each page holds compressible text, then a
# share s of random bytes (lz4 cannot shrink them), s ~ U(0.02, 0.98) per file,
# +-0.05 per page, so the compressed pages spread over the allocator's size classes.
mkdir "$mnt/synthetic"
python3 - "$mnt/synthetic" "$synth_budget" "$seed" <<'EOF'
import random, sys
root, left, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
filler = b"zfs_ram synthetic page filler: the quick brown fox jumps over the lazy dog.\n" * 64
n = 0
while left > 0:
    size = min(left, round(4096 * 256 ** rng.random()))
    share = rng.uniform(0.02, 0.98)
    with open(f"{root}/s{n:05d}", "wb") as f:
        for off in range(0, size, 4096):
            length = min(4096, size - off)
            k = round(min(1.0, max(0.0, share + rng.uniform(-0.05, 0.05))) * length)
            f.write(filler[: length - k] + rng.randbytes(k))
    left -= size
    n += 1
EOF
sync
nfiles="$(find "$mnt/real" "$mnt/synthetic" -type f | wc -l)"
echo "# $nfiles files, $size_mib MiB, pool=$pool compact=$compact seed=$seed;" \
     "deleting $fraction of the files" >&2
report fill "$(since "$t0")"
read -r _ fill_compr fill_mem _ < "$ctl/mm_stat"

# --- delete a random fraction of the files, in shuffled order ----------------------------------
t0="$(now)"
ndel="$(awk -v n="$nfiles" -v f="$fraction" 'BEGIN { printf "%d", n * f + 0.5 }')"
# (awk, not head: head would stop reading early and pipefail would count that as a failure)
find "$mnt/real" "$mnt/synthetic" -type f | sort | shuffle "$seed" | awk -v n="$ndel" 'NR <= n' \
    | xargs -d '\n' -r rm -f
sync
report delete "$(since "$t0")"

# --- wait: does memory come back by itself? ---------------------------------------------------
t0="$(now)"
sleep "$wait_s"
report wait "$(since "$t0")"

# --- explicit compaction ----------------------------------------------------------------------
t0="$(now)"
echo 1 > "$ctl/compact"
report compact "$(since "$t0")"

# How much of what the deleted files occupied (compressed) came back as memory?
read -r _ compr mem _ < "$ctl/mm_stat"
awk -v c0="$fill_compr" -v m0="$fill_mem" -v c="$compr" -v m="$mem" 'BEGIN {
    if (c0 - c <= 0) exit
    printf "# the delete freed %.1f MiB of compressed data; mem_used fell by %.1f MiB (%.0f%%)\n",
        (c0 - c) / 1048576, (m0 - m) / 1048576, 100 * (m0 - m) / (c0 - c)
}'

if [ "${KEEP:-0}" = 1 ]; then
    echo "# mounted on $mnt; press Enter to unmount" >&2
    read -r _
fi
