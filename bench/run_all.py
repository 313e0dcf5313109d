"""Run every benchmark with quick settings, print one combined table and write one JSON file.

Benchmarks, in order: ``data_throughput`` (pipeline vs raw decoding), ``data_wait`` (loader wait at
the predicted H100 step time), ``vae_memory`` (chunked vs one-pass encode memory), ``dit_step``
(DiT training-step FLOP/s; only where ``bench/dit_step.py`` exists), ``attention_memory`` (attention
memory vs sequence length) and ``sampling`` (seconds per video vs steps). Each one's ``main(argv)``
runs in this process with the quick arguments below (``--full``: the script's own defaults), plus
``--device`` and ``--threads`` where the script takes them. A benchmark that raises (or exits) is
recorded as ``{"status": "error", "error": ...}`` and the run goes on.

JSON: ``{"device", "cores", "started", "seconds", "benchmarks": {name: {"status": "ok" | "error" |
"skipped", "seconds", "argv", "summary", "result" | "error"}}}``.

    python bench/run_all.py [--json bench/results.json] [--only data_wait sampling] [--skip dit_step] [--full]
                            [--device auto] [--threads N]
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    cores,
    device_name,
    fmt,
    make_parser,
    print_table,
    resolve_device,
    write_json,
)

#: name -> (quick arguments on the CPU, quick arguments on a GPU, takes --device/--threads)
BENCHMARKS: dict[str, tuple[list[str], list[str], bool]] = {
    "data_throughput": (["--videos", "24", "--batches", "12", "--rounds", "2"],
                        ["--videos", "24", "--batches", "12", "--rounds", "2"], False),
    "data_wait": (["--videos", "24", "--steps", "30", "--warmup", "5", "--free-steps", "10"],
                  ["--videos", "24", "--steps", "30", "--warmup", "5", "--free-steps", "10"], True),
    "vae_memory": (["--frames", "17", "129"], ["--frames", "17", "65", "129"], True),
    "dit_step": (["--latent", "8", "32", "32", "--batch", "1", "--steps", "2", "--warmup", "1"],
                 ["--steps", "10"], False),
    "attention_memory": (["--seq", "512", "1024", "2048"], ["--seq", "1024", "4096", "16384"], True),
    "sampling": (["--steps", "10", "25", "50"], ["--steps", "10", "25", "50"], True),
}


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:+.1%}"


def summarize(name: str, result: dict[str, Any]) -> str:
    """One line of the headline numbers of a benchmark's result."""
    if name == "data_throughput":
        rates = result["clips_per_s"]
        return (f"pipeline uint8 {rates['pipeline_uint8']:.1f} clips/s "
                f"({result['ratio_vs_best_raw']['uint8']:.2f}x raw decode)")
    if name == "data_wait":
        return (f"wait {result['wait_fraction']:.1%} of wall; needs {result['clips_per_s_needed']:.1f} "
                f"clips/s, delivered {result['clips_per_s_delivered']:.1f} "
                f"(step {result['step_s'] * 1e3:.1f} ms, "
                f"{result['workers']} workers, {result['usable_cores']} cores)")
    if name == "vae_memory":
        return (f"{result['preset']} peak growth chunked {_pct(result['chunked_growth'])}, one pass "
                f"{_pct(result['one_pass_growth'])} (goal <= {result['goal_growth']:.0%}: "
                f"{'met' if result['goal_met'] else 'NOT met'})")
    if name == "dit_step":
        extra = f", MFU {result['mfu']:.1%}" if "mfu" in result else ""
        return (f"{result['preset']} step {result['step_s']:.3f} s, {result['achieved_tflops']:.3g} TFLOP/s "
                f"= {result['fraction_of_matmul']:.0%} of matmul{extra}")
    if name == "attention_memory":
        parts = [f"{g['preset']}/{g['impl']} x{fmt(g['exponent'], '.2f')}" for g in result["growth"]]
        return "memory exponent " + ", ".join(parts)
    if name == "sampling":
        parts = [f"{r['steps']} steps {r['s_per_video']:.2f} s" for r in result["rows"]]
        decode = result["rows"][0]["decode_s_per_video"] if result["rows"] else None
        return f"{result['preset']}: " + ", ".join(parts) + f" per video (decode {fmt(decode, '.2f')} s)"
    return ""


def run_one(name: str, argv: list[str]) -> dict[str, Any]:
    """Import ``bench.<name>`` and run its main(argv); an exception or exit becomes an error entry."""
    start = time.perf_counter()
    entry: dict[str, Any] = {"argv": argv}
    try:
        main: Callable[[list[str]], dict[str, Any]] = importlib.import_module(f"bench.{name}").main
        result = main(argv)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - one failing benchmark must not stop the rest
        message = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        seconds = time.perf_counter() - start
        entry.update(status="error", error=message, summary=message[:200], seconds=seconds)
        return entry
    entry.update(status="ok", result=result, seconds=time.perf_counter() - start)
    try:
        entry["summary"] = summarize(name, result)
    except (KeyError, TypeError, ValueError) as error:  # a script whose result keys changed: keep its result
        entry["summary"] = f"(no summary: {type(error).__name__}: {error})"
    return entry


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json", metavar="OUT.json")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None)
    parser.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[])
    parser.add_argument("--full", action="store_true", help="each script's own defaults, not the quick ones")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="passed to the scripts that take it")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    start = time.perf_counter()
    entries: dict[str, dict[str, Any]] = {}
    for name, (cpu_argv, gpu_argv, takes_device) in BENCHMARKS.items():
        if (args.only and name not in args.only) or name in args.skip:
            continue
        if not (ROOT / "bench" / f"{name}.py").is_file():
            entries[name] = {"status": "skipped", "summary": f"bench/{name}.py not found", "seconds": 0.0}
            continue
        bench_argv = [] if args.full else list(gpu_argv if cuda else cpu_argv)
        if takes_device:
            bench_argv += ["--device", args.device]
            if args.threads is not None:
                bench_argv += ["--threads", str(args.threads)]
        elif name == "dit_step":
            bench_argv += ["--device", str(device)]
        print(f"\n=== {name} {' '.join(bench_argv)}", flush=True)
        entries[name] = run_one(name, bench_argv)
    result = {
        "device": device_name(device),
        "cores": cores(),
        "started": started,
        "seconds": time.perf_counter() - start,
        "quick": not args.full,
        "benchmarks": entries,
    }
    rows = [{"name": name, **entry} for name, entry in entries.items()]
    print()
    print_table(rows, [("name", "benchmark", ""), ("status", "status", ""), ("seconds", "s", ".1f"),
                       ("summary", "summary", "")], title=f"benchmarks on {result['device']}")
    write_json(result, args.json)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
