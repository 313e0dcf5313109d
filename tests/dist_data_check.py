"""Run under ``torch.distributed.run`` (gloo): report what each rank's loaders yield, as JSON.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/dist_data_check.py ROOT OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from vdm.data.datamodule import VideoDataModule


def main(root: str, out: str) -> None:
    dist.init_process_group("gloo")
    try:
        dm = VideoDataModule(root=root, num_frames=5, height=32, width=32, batch_size=2, val_batch_size=2,
                             num_workers=2, resampled=False, seed=3)
        dm.setup("fit")
        train_batches = sum(1 for _ in dm.train_dataloader())
        val_keys, val_batches = [], 0
        for batch in dm.val_dataloader():
            val_batches += 1
            val_keys += [k for k, m in zip(batch["key"], batch["meta"]) if not m.get("pad", False)]
        report = {"rank": dist.get_rank(), "train_batches": train_batches, "val_batches": val_batches,
                  "val_keys": val_keys}
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
