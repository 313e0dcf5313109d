"""Helpers shared by the benchmark scripts: presets, devices, peak memory, subprocess runs, tables, JSON.

Every benchmark exposes ``main(argv: list[str] | None = None) -> dict``, prints a table and, with
``--json OUT.json``, writes its result there (``write_json``). Peak memory is measured the same way by
all of them:

- CUDA: ``torch.cuda.max_memory_allocated`` during the measured call minus ``memory_allocated``
  just before it (the model, inputs and anything else already resident are left out);
- CPU: peak resident set size (VmHWM, i.e. ``ru_maxrss`` of the process's memory) during the call
  minus the resident set just before it, in a fresh process per measurement (``run_isolated``, with glibc
  malloc returning freed blocks to the OS: ``MALLOC_ENV``). On Linux the high-water mark is reset
  right before the call (``/proc/self/clear_refs``), so allocations made and freed while building
  the model or warming up do not mask the call's own peak. Measured calls are run once before (a
  warm-up) so one-time kernel and thread-pool set-up is not counted as activation memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_MARKER = "BENCH_RESULT "
#: glibc malloc with a fixed mmap threshold: freed tensors go back to the OS at once, so the RSS before a
#: measured call holds no freed memory its allocations could reuse unseen (the default threshold adapts
#: upwards, after which large freed blocks stay in the heap)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
MIB = 2**20


# --- presets and devices ----------------------------------------------------------------------


def load_preset(name: str) -> dict[str, Any]:
    """Constructor kwargs of a model preset ``conf/model/<name>.yaml`` (``_target_`` dropped, unresolved).

    DiT presets hold their kwargs under ``dit:``, VAE presets under ``vae:``. Interpolations (the
    DiT's ``context_dim``) stay strings: callers override them.
    """
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
        raise SystemExit(f"no model preset {name!r}: choose one of {choices}")
    config = config_option("model", name)
    config = config.get("dit", config.get("vae"))
    return {k: v for k, v in config.items() if k != "_target_"}


def config_option(group: str, option: str) -> dict[str, Any]:
    """One option of a config group composed by Hydra (with the defaults it includes), as plain data,
    interpolations unresolved: ``config_option("model", "dit_b")["dit"]``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=f"{group}/{option}")
    config = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(config, dict)
    return config[group] if group in config and len(config) == 1 else config


def build_dit(preset: str, context_dim: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A ``VideoDiT`` preset with ``context_dim`` text width; ``device="meta"`` allocates nothing."""
    from vdm.models.dit import VideoDiT

    with torch.device(device):
        return VideoDiT(**(load_preset(preset) | {"context_dim": context_dim}))


def build_vae(preset: str, device: torch.device | str = "cpu", **overrides: Any) -> torch.nn.Module:
    """A ``VideoVAE`` preset with random (initialised) weights, in eval mode."""
    from vdm.models.vae import VideoVAE

    with torch.device(device):
        return VideoVAE(**(load_preset(preset) | overrides)).eval()


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU here")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def cores() -> dict[str, int]:
    """CPU cores of the machine and those this process may run on, and torch's intra-op threads."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = torch.get_num_threads()
    return {"cpu_count": os.cpu_count() or 1, "usable_cores": usable, "torch_threads": threads}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {
        "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16,
    }
    if name not in dtypes:
        raise SystemExit(f"unknown dtype {name!r}: choose one of {sorted(dtypes)}")
    return dtypes[name]


@contextlib.contextmanager
def timer(device: torch.device, out: list[float]) -> Iterator[None]:
    """Append the wall seconds of the block to ``out`` (the device synchronised on both sides)."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    out.append(time.perf_counter() - start)


# --- peak memory -----------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes: VmHWM on Linux, else ``ru_maxrss``.

    Both are the same high-water mark, but ``ru_maxrss`` also takes the maximum with the peak recorded
    when any thread of the process exited, which ``reset_peak_rss`` cannot clear; VmHWM it can.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """(peak bytes ``fn`` needed above what was resident before it, its result); see the module docstring."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    gc.collect()
    if not reset_peak_rss():
        warnings.warn("cannot reset the RSS high-water mark: peaks include earlier allocations", stacklevel=2)
    base = current_rss()
    out = fn()
    return max(peak_rss() - base, 0), out


def run_isolated(
    module: str, function: str, kwargs: dict[str, Any], timeout: float = 600.0
) -> dict[str, Any]:
    """``module.function(**kwargs)`` in a fresh Python process; returns its dict (JSON-serialisable).

    A failure comes back as ``{"error": "..."}`` (the child's last stderr lines, or "timeout") so a
    sweep can record it and go on (an out-of-memory kill, say).
    """
    code = (
        "import json, sys\n"
        f"from {module} import {function} as fn\n"
        f"print({RESULT_MARKER!r} + json.dumps(fn(**json.loads(sys.argv[1]))), flush=True)\n"
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.update(MALLOC_ENV)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(kwargs)], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"error": f"exit code {proc.returncode}: {tail or 'no output'}"}


# --- output ----------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], title: str = ""
) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` = (key, header, format spec for floats)."""
    if title:
        print(title)
    cells = [[fmt(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(header), *(len(r[i]) for r in cells)]) for i, (_, header, _) in enumerate(columns)]
    numeric = [all(isinstance(r.get(key), (int, float, type(None))) for r in rows) for key, _, _ in columns]
    lines = [[header for _, header, _ in columns], *cells]
    for line in lines:
        padded = [c.rjust(w) if right else c.ljust(w) for c, w, right in zip(line, widths, numeric)]
        print("  ".join(padded).rstrip())


def print_summary(values: dict[str, Any]) -> None:
    """Print ``key  value`` lines (floats to 4 significant digits)."""
    width = max(len(k) for k in values)
    for key, value in values.items():
        print(f"{key:<{width}}  {fmt(value)}")


def write_json(result: dict[str, Any], path: str | Path | None) -> None:
    """Write ``result`` to ``path`` (parents created); nothing when ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the module docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def memory_method(device: torch.device) -> str:
    """How peak memory is measured on ``device``, for result records and table titles."""
    if device.type == "cuda":
        return "cuda max_memory_allocated - allocated before"
    return "peak RSS - RSS before (subprocess)"


def add_output_args(parser: Any) -> None:
    """``--json OUT.json``, ``--device`` (auto: CUDA when available) and ``--threads``."""
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, also in measurement subprocesses (default: torch's); "
                        "1 keeps small CPU ops steady on a machine shared with other jobs")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the result here")


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads here and (``OMP_NUM_THREADS``) in the subprocesses started after."""
    if threads is None:
        return
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
