"""zfs_ram: a compressed tmpfs in FUSE.

File pages are compressed with lz4 and kept in a userspace re-implementation of the kernel's
zsmalloc allocator, whose compaction gives the memory of deleted files back to the OS.

Layers, bottom up (each imports only from the ones below it):
  vocabulary  the names and units every layer shares (page size, mm_stat, control files)
  pool/       frames, zsmalloc, zbud: pure, synchronous, knows nothing of files or FUSE
  codec       one 4 KiB page <-> compressed bytes
  pagestore   a file's page table over the pool
  fs/         the namespace, the control directory, the pyfuse3 Operations (translation)
  daemon/     the wiring of a mount (stack), the background compactor, mount options and
              lifecycle
  mounts, client  the mount table and the control directory's client, for the tools
  cli         the zfs-ram command
"""

__version__ = "0.1.0"
