"""Run the ``refine`` CLI in this process and SIGKILL it at a chosen point: a real crash, not an exception.

    python -m tests.reliability.fault_runner <point>:<n> -- <refine arguments>

Points (the ``n``-th time the process gets there, counting from 1):

* ``optimizer``: just before an optimizer step (mid training step, after the forward and backward passes);
* ``checkpoint-tmp``: a checkpoint's files are written and synced in its temporary directory, not yet renamed;
* ``checkpoint-marker``: the checkpoint directory has its final name but not yet its ``COMPLETE`` marker.

And one fault that is not a kill: ``enospc:<n>`` makes the ``n``-th weights file written fail with "No space left on
device" (errno 28), as a full disk does.
"""

from __future__ import annotations

import os
import signal
import sys


def _kill_on(count: list[int], n: int) -> None:
    count[0] += 1
    if count[0] == n:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    count = [0]
    if point == "optimizer":
        import torch

        step = torch.optim.AdamW.step

        def killing_step(self, *args, **kwargs):
            _kill_on(count, n)
            return step(self, *args, **kwargs)

        torch.optim.AdamW.step = killing_step
    elif point == "checkpoint-tmp":
        from refine_core.training import checkpoint

        fsync_tree = checkpoint._fsync_tree

        def killing_fsync(root):
            fsync_tree(root)
            if root.name.startswith(".tmp-step_"):
                _kill_on(count, n)

        checkpoint._fsync_tree = killing_fsync
    elif point == "checkpoint-marker":
        from refine_core.training.checkpoint import CheckpointManager

        write_marker = CheckpointManager._write_marker

        def killing_marker(directory, step):
            _kill_on(count, n)
            return write_marker(directory, step)

        CheckpointManager._write_marker = staticmethod(killing_marker)
    elif point == "enospc":
        import errno

        from refine_core.models import hub

        save_file = hub.save_file

        def full_disk(tensors, filename, *args, **kwargs):
            count[0] += 1
            if count[0] == n:
                raise OSError(errno.ENOSPC, "No space left on device", filename)
            return save_file(tensors, filename, *args, **kwargs)

        hub.save_file = full_disk

        # Checkpoint weights are written by torch.distributed.checkpoint: its writer counts as one weights file.
        from refine_core.training import sharded_state

        class FullDiskWriter(sharded_state.FileSystemWriter):
            def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
                count[0] += 1
                if count[0] == n:
                    raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
                return super().write_data(plan, planner)

        sharded_state.FileSystemWriter = FullDiskWriter
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    spec, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: fault_runner <point>:<n> -- <refine arguments>"
    point, n = spec.split(":")
    arm(point, int(n))
    from refine_core.cli import main

    raise SystemExit(main(args))
