"""zfs_ram: a compressed tmpfs in FUSE.

File pages are compressed with lz4 and kept in a userspace re-implementation of the kernel's
zsmalloc allocator, whose compaction gives the memory of deleted files back to the OS.

Layers, bottom up (each imports only from the ones below it):
  pool/       frames, zsmalloc, zbud: pure, synchronous, knows nothing of files or FUSE
  codec       one 4 KiB page <-> compressed bytes
  pagestore   a file's page table over the pool
  fs/         inodes, namespace, the pyfuse3 Operations and the control directory
  daemon/     mount options, mount lifecycle, the background compactor
  cli         the zfs-ram command
"""

__version__ = "0.1.0"
