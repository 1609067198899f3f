"""The Triton cache carried between device slots as ``triton-cache.tar.xz.partNN`` files (each small enough to travel).

``bench_gpu.py run --pack-cache`` writes the parts to the slot's output folder; ``--unpack-cache`` restores them into
the state folder of the next slot, so its kernels need no new compile or autotune.

Only what a cache hit reads travels: each kernel's metadata (``<name>.json``, the ``__grp__`` group file) and its
binary (``.cubin``), plus the autotuner's ``*.autotune.json`` results. Triton 3.6's ``compile()`` takes a kernel from
the cache when its group file names an existing ``.json`` (``FileCacheManager.get_group`` drops children that are
missing) and ``CompiledKernel`` loads only the binary; the intermediate IRs (``.ttir``, ``.ttgir``, ``.llir``,
``.ptx``) and ``.source`` are there for debugging. They were four fifths of the cache: 743 MB unpacked, 62 MiB packed,
past the 64 MiB a device call carries with the working tree.
"""

from __future__ import annotations

import tarfile
from pathlib import Path


def pack_cache(state: Path, out: Path, part_mib: int = 15) -> None:
    """``<state>/triton`` as ``triton-cache.tar.xz.partNN`` files of at most ``part_mib`` MiB in ``out``."""
    blob = state / "triton-cache.tar.xz"
    with tarfile.open(blob, "w:xz", preset=1) as tar:
        tar.add(state / "triton", arcname="triton", filter=_needed_for_a_hit)
    data = blob.read_bytes()
    size = part_mib * 2**20
    for i in range(0, len(data), size):
        (out / f"triton-cache.tar.xz.part{i // size:02d}").write_bytes(data[i : i + size])
    print(f"packed the Triton cache: {len(data) / 2**20:.1f} MiB in {(len(data) + size - 1) // size} part(s)")


# what a cache hit reads (see the module docstring); everything else in a kernel's folder is left behind
_KEPT_SUFFIXES = (".json", ".cubin", ".hsaco")


def _needed_for_a_hit(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return member if member.isdir() or member.name.endswith(_KEPT_SUFFIXES) else None


def unpack_cache(state: Path, source: Path) -> None:
    parts = sorted(source.glob("triton-cache.tar.xz.part*"))
    if not parts:
        return
    blob = state / "triton-cache.tar.xz"
    blob.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(blob, "r:xz") as tar:
        tar.extractall(state, filter="data")
    print(f"unpacked the Triton cache from {len(parts)} part(s): {_count(state / 'triton')} kernels")


def _count(path: Path) -> int:
    return sum(1 for p in path.iterdir() if p.is_dir()) if path.is_dir() else 0
