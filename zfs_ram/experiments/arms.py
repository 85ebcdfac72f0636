"""The experiment's arms: what each compares, as data.

An arm is a name, the mount options of a fresh zfs_ram mount, and the control-file writes to
make once the fill is done (zram's second tier: mark pages idle, recompress or write them
back). The runner records the stage "tier" after those steps, so the bytes they save show
beside the fill's. Adding an arm is one entry in ARMS; ``{tmpdir}`` in its options becomes the
run's own temporary directory (which holds the mount point and is removed after the run), for
options that name a file, as the backing file of lz4-writeback.

The kernel's zram is not an arm here: it is not a zfs_ram mount (targets.KernelZramTarget).
"""

from __future__ import annotations

from dataclasses import dataclass

from zfs_ram.vocabulary import ControlFile

# The compressor of a mount that names none (zram's default too); the arms' byte ratios are
# taken against an arm that stores with it and has no tier steps.
REFERENCE_ALGORITHM = "lz4"


@dataclass(frozen=True)
class Step:
    """One write to a control file of the mount, e.g. ``echo type=idle > .zfs_ram/recompress``."""

    control_file: str
    text: str

    def __str__(self) -> str:
        return f"echo {self.text.strip()} > {self.control_file}"


# Every stored page idle: the fill is over, nothing has been read since.
IDLE_ALL = Step(ControlFile.IDLE, "all\n")


@dataclass(frozen=True)
class Arm:
    """A zfs_ram configuration to run the workload on."""

    name: str
    options: str = ""  # beyond size=, pool=, compact= and log=, comma-separated
    pool: str = "zsmalloc"
    compact: str = "auto"
    after_fill: tuple[Step, ...] = ()

    @property
    def algorithm(self) -> str:
        """The compressor the fill stores with (comp_algorithm=, else lz4)."""
        for option in self.options.split(","):
            key, _, value = option.partition("=")
            if key.strip() == ControlFile.COMP_ALGORITHM:
                return value.strip()
        return REFERENCE_ALGORITHM

    @property
    def is_reference(self) -> bool:
        """Stores with lz4 and changes nothing after the fill: the byte ratios' yardstick."""
        return self.algorithm == REFERENCE_ALGORITHM and not self.after_fill

    def describe(self) -> str:
        """One line for the plot's panels: pool, compaction, options and steps."""
        parts = [f"pool={self.pool}", f"compact={self.compact}"]
        parts += [o for o in self.options.split(",") if o]
        parts += [str(s) for s in self.after_fill]
        return ", ".join(parts)


ARMS: tuple[Arm, ...] = (
    Arm("zsmalloc-off", compact="off"),
    Arm("zsmalloc-auto"),
    Arm("zbud", pool="zbud"),
    Arm("zstd", "comp_algorithm=zstd"),
    # zram's way to a smaller footprint for data that stays: store fast with lz4, then
    # recompress what nobody touched with zstd (the idle_recompress= option does it on a timer).
    Arm(
        "lz4-idle-zstd",
        "recomp_algorithm=zstd",
        after_fill=(IDLE_ALL, Step(ControlFile.RECOMPRESS, "type=idle\n")),
    ),
    # zram's third tier: what nobody touched goes out to a file on disk (backing_dev).
    Arm(
        "lz4-writeback",
        "backing_file={tmpdir}/backing",
        after_fill=(IDLE_ALL, Step(ControlFile.WRITEBACK, "idle\n")),
    ),
)
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}
