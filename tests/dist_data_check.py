"""Run under ``torch.distributed.run`` (gloo): report what each rank's loaders yield, as JSON.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/dist_data_check.py ROOT OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from vdm.data.datamodule import VideoDataModule


def datamodule(root: str) -> VideoDataModule:
    dm = VideoDataModule(root=root, num_frames=5, height=32, width=32, batch_size=2, val_batch_size=2,
                         num_workers=2, resampled=False, seed=3, shuffle_buffer=4)
    dm.setup("fit")
    return dm


def resumed_keys(root: str, cut: int) -> tuple[list[list[str]], int]:
    """Train keys of an epoch read up to ``cut`` batches, checkpointed (a collective), restored in a new
    loader and read to the end; and the number of rank positions the state holds."""
    loader = datamodule(root).train_dataloader()
    head = []
    for batch in loader:
        head.append(batch["key"])
        if len(head) == cut:
            break
    state = loader.state_dict()
    resumed = datamodule(root).train_dataloader()
    resumed.load_state_dict(state)
    return head + [batch["key"] for batch in resumed], len(state["ranks"])


def main(root: str, out: str) -> None:
    dist.init_process_group("gloo")
    try:
        dm = datamodule(root)
        train_keys = [batch["key"] for batch in dm.train_dataloader()]
        train_batches = len(train_keys)
        keys_after_resume, state_ranks = resumed_keys(root, cut=1)
        val_keys, val_batches = [], 0
        for batch in dm.val_dataloader():
            val_batches += 1
            val_keys += [k for k, m in zip(batch["key"], batch["meta"]) if not m.get("pad", False)]
        report = {"rank": dist.get_rank(), "train_batches": train_batches, "val_batches": val_batches,
                  "val_keys": val_keys, "train_keys": train_keys, "resumed_train_keys": keys_after_resume,
                  "state_ranks": state_ranks}
        gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, report)
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
