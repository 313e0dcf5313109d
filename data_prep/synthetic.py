"""Procedurally generated captioned video corpus: the built-in default training data.

    python -m data_prep.synthetic OUT [--num-train 512 --num-val 64 --frames 17 --size 64 --fps 8]

Real H.264 mp4 files (short keyframe interval) of coloured shapes moving on named backgrounds, written
through the same shard writer as make_shards, plus ``prompts_heldout.jsonl`` / ``.txt`` with prompts
made of attribute pairs that never occur in training. Deterministic by seed: the same options give
byte-identical shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_prep.shard_writer import EncodedSample, ShardSink, read_manifest, sample_key
from vdm.data.encode import EncodeOptions, encode_frames
from vdm.data.probe import probe_media
from vdm.synthetic.scenes import Scene, evaluation_prompts, heldout_prompts, render_scene, sample_scene
from vdm.utils.io import atomic_dir, atomic_write

log = logging.getLogger(__name__)

GENERATOR = "vdm-synthetic"
GENERATOR_VERSION = 1
PROMPTS_JSONL = "prompts_heldout.jsonl"
PROMPTS_TXT = "prompts_heldout.txt"
PROMPTS_EVAL = "prompts_eval.jsonl"
_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the corpus bytes (recorded in the manifest's "options")."""

    seed: int = 0
    num_train: int = 512
    num_val: int = 64
    num_frames: int = 17
    height: int = 64
    width: int = 64
    fps: int = 8
    keyframe_interval: int = 8
    crf: int = 18
    preset: str = "faster"  # x264 preset; tiny clips gain little from slower ones
    two_object_fraction: float = 0.2
    max_samples_per_shard: int = 256
    prompts_per_pair: int = 4

    def __post_init__(self) -> None:
        if self.height % 2 or self.width % 2 or min(self.height, self.width) < 16:
            raise ValueError(f"height and width must be even and >= 16, got {self.height}x{self.width}")
        if self.num_train < 1 or self.num_val < 0 or self.num_frames < 1 or self.fps < 1:
            raise ValueError("need num_train >= 1, num_val >= 0, num_frames >= 1, fps >= 1")
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError(f"two_object_fraction must be in [0, 1], got {self.two_object_fraction}")
        EncodeOptions(self.keyframe_interval, self.crf, self.preset)  # validates

    def options(self) -> dict[str, Any]:
        """Manifest "options": generator id/version plus every field."""
        return {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}


def scene_for(config: SyntheticConfig, split: str, index: int) -> Scene:
    """The scene of video ``index`` of ``split``; depends only on (seed, split, index)."""
    rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
    return sample_scene(rng, config.height, config.width, config.num_frames, config.two_object_fraction)


def make_sample(config: SyntheticConfig, split: str, index: int) -> EncodedSample:
    """Render, encode and probe one video."""
    scene = scene_for(config, split, index)
    frames = render_scene(scene, config.num_frames, config.height, config.width)
    encode = EncodeOptions(config.keyframe_interval, config.crf, config.preset)
    mp4 = encode_frames(frames, config.fps, encode)
    name = f"{split}/{index:06d}.mp4"
    info = probe_media(mp4, "mp4")
    return EncodedSample(sample_key(name), name, split, "mp4", mp4, scene.caption(), info, False,
                         scene.attributes())


def _make_sample_task(task: tuple[SyntheticConfig, str, int]) -> EncodedSample:
    return make_sample(*task)


def _samples(config: SyntheticConfig, workers: int | None) -> Iterator[EncodedSample]:
    tasks = [(config, "train", i) for i in range(config.num_train)]
    tasks += [(config, "val", i) for i in range(config.num_val)]
    if workers is None:  # a process pool costs ~1.5 s to start: only worth it for larger corpora
        workers = min(4, os.cpu_count() or 1) if len(tasks) >= 128 else 1
    if workers <= 1:
        yield from map(_make_sample_task, tasks)
        return
    # spawn: the caller (train.py) may already hold torch/decoder threads
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_make_sample_task, tasks, chunksize=16)


def write_prompts(out_dir: Path, config: SyntheticConfig) -> None:
    """``prompts_heldout.jsonl`` ({"prompt", "seed", "attributes"} per line) and ``.txt`` (one per line), and
    ``prompts_eval.jsonl``: the held-out prompts plus as many of seen combinations, with their ``group``."""
    heldout = heldout_prompts(config.seed, config.prompts_per_pair)
    evaluation = evaluation_prompts(config.seed, config.prompts_per_pair)
    files = {
        PROMPTS_JSONL: "".join(json.dumps(p, sort_keys=True) + "\n" for p in heldout),
        PROMPTS_TXT: "".join(p["prompt"] + "\n" for p in heldout),
        PROMPTS_EVAL: "".join(json.dumps(p, sort_keys=True) + "\n" for p in evaluation),
    }
    for name, text in files.items():
        atomic_write(out_dir / name, text)


def generate_synthetic_corpus(out_dir: str | Path, config: SyntheticConfig, *, workers: int | None = None,
                              progress: bool = False) -> dict[str, Any]:
    """Write the corpus (shards, samples.jsonl, prompts, manifest.json last) into ``out_dir``."""
    from tqdm import tqdm

    out = Path(out_dir)
    with ShardSink(out, max_samples_per_shard=config.max_samples_per_shard) as sink:
        total = config.num_train + config.num_val
        for sample in tqdm(_samples(config, workers), total=total, unit="video", disable=not progress):
            sink.add(sample)
        write_prompts(out, config)
        return sink.finish(source=f"synthetic:seed={config.seed}", options=config.options(),
                           extra_fields={"prompts": PROMPTS_JSONL})


def corpus_is_current(root: Path, options: dict[str, Any]) -> bool:
    """True when ``root`` holds a complete corpus generated with exactly these options."""
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError):
        return False
    if manifest.get("options") != json.loads(json.dumps(options)):
        return False
    needed = [root / manifest.get("index", ""), root / PROMPTS_JSONL, root / PROMPTS_TXT]
    if not all(p.is_file() for p in needed):
        return False
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    return all((root / s["name"]).is_file() and (root / s["name"]).stat().st_size == s["bytes"]
               for s in shards)


def ensure_synthetic_corpus(root: str | Path, *, seed: int = 0, num_train: int = 512, num_val: int = 64,
                            num_frames: int = 17, height: int = 64, width: int = 64, fps: int = 8,
                            keyframe_interval: int = 8, crf: int = 18, preset: str = "faster",
                            two_object_fraction: float = 0.2, max_samples_per_shard: int = 256,
                            prompts_per_pair: int = 4, workers: int | None = None,
                            progress: bool = False) -> Path:
    """Return ``root`` holding the synthetic corpus for these options, generating it if needed.

    Reuses an existing corpus whose manifest options match; otherwise builds into a temporary
    sibling folder and swaps it in by rename. Refuses to replace a non-empty folder that is not a
    synthetic corpus. ``workers``: processes for generation (None: up to 4 for >= 128 videos); the
    output does not depend on it.
    """
    config = SyntheticConfig(seed, num_train, num_val, num_frames, height, width, fps, keyframe_interval,
                             crf, preset, two_object_fraction, max_samples_per_shard, prompts_per_pair)
    root = Path(root).resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root.parent / f".{root.name}.lock"):
        if corpus_is_current(root, config.options()):
            log.info("reusing synthetic corpus at %s", root)
            if not (root / PROMPTS_EVAL).is_file():  # a corpus written before the evaluation prompts existed
                write_prompts(root, config)
            return root
        _check_replaceable(root)
        start = time.perf_counter()
        with atomic_dir(root) as tmp:
            generate_synthetic_corpus(tmp, config, workers=workers, progress=progress)
        log.info("generated synthetic corpus at %s in %.1f s", root, time.perf_counter() - start)
    return root


def _check_replaceable(root: Path) -> None:
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    try:
        generator = read_manifest(root).get("options", {}).get("generator")
    except (OSError, ValueError):
        generator = None
    if generator != GENERATOR:
        raise FileExistsError(f"{root} exists and is not a synthetic corpus; refusing to replace it")


class _lock:
    """Exclusive advisory file lock (so concurrent callers do not generate the same corpus twice)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> None:
        import fcntl

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    d = SyntheticConfig()
    p = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="corpus folder (reused when its options match)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val)
    p.add_argument("--frames", dest="num_frames", type=int, default=d.num_frames, help="frames per video")
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--fps", type=int, default=d.fps)
    p.add_argument("--keyframe-interval", type=int, default=d.keyframe_interval)
    p.add_argument("--crf", type=int, default=d.crf)
    p.add_argument("--preset", default=d.preset, help="x264 preset")
    p.add_argument("--two-object-fraction", type=float, default=d.two_object_fraction)
    p.add_argument("--max-samples-per-shard", type=int, default=d.max_samples_per_shard)
    p.add_argument("--prompts-per-pair", type=int, default=d.prompts_per_pair)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.pop("out")
    progress = not args.pop("no_progress")
    start = time.perf_counter()
    root = ensure_synthetic_corpus(out, progress=progress, **args)
    totals = read_manifest(root)["totals"]
    print(f"{root}: {totals['samples']} videos, {totals['bytes'] / 1e6:.1f} MB "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    from data_prep.synthetic import main as _main  # the package module, so worker processes can import it

    sys.exit(_main())
