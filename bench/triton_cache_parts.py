"""The Triton cache carried between device slots as ``triton-cache.tar.xz.partNN`` files (each small enough to travel).

``bench_gpu.py run --pack-cache`` writes the parts to the slot's output folder; ``--unpack-cache`` restores them into
the state folder of the next slot, so its kernels need no new compile or autotune.
"""

from __future__ import annotations

import tarfile
from pathlib import Path


def pack_cache(state: Path, out: Path, part_mib: int = 15) -> None:
    """``<state>/triton`` as ``triton-cache.tar.xz.partNN`` files of at most ``part_mib`` MiB in ``out``."""
    blob = state / "triton-cache.tar.xz"
    with tarfile.open(blob, "w:xz", preset=1) as tar:
        tar.add(state / "triton", arcname="triton")
    data = blob.read_bytes()
    size = part_mib * 2**20
    for i in range(0, len(data), size):
        (out / f"triton-cache.tar.xz.part{i // size:02d}").write_bytes(data[i : i + size])
    print(f"packed the Triton cache: {len(data) / 2**20:.1f} MiB in {(len(data) + size - 1) // size} part(s)")


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
