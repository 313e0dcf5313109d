"""Smoke tests of the benchmark scripts in bench/: tiny options, documented keys, sane values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import attention_memory, data_wait, run_all, sampling, vae_memory


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_data_wait(tmp_path: Path) -> None:
    out = tmp_path / "wait.json"
    argv = [
        "--dir", str(tmp_path / "corpus"), "--videos", "4", "--frames", "12", "--size", "64",
        "--num-frames", "5", "--stride", "2", "--batch-size", "2", "--workers", "1",
        "--steps", "4", "--warmup", "1", "--free-steps", "2", "--device", "cpu", "--json", str(out),
    ]
    result = data_wait.main(argv)
    assert load(out) == json.loads(json.dumps(result))
    assert result["latent"] == [2, 8, 8] and result["workers"] == 1 and result["usable_cores"] >= 1
    assert result["predicted_step_s"] > 0 and result["step_s"] == result["predicted_step_s"]
    assert result["step_flops"] > 0 and result["step_source"] == "predicted"
    assert 0.0 <= result["wait_fraction"] <= 1.0 and result["wall_s"] >= result["wait_s"] >= 0
    assert result["clips_per_s_needed"] == pytest.approx(2 / result["step_s"])
    assert result["clips_per_s_delivered"] > 0 and result["loader_clips_per_s_unthrottled"] > 0
    assert "wait" in run_all.summarize("data_wait", result)

    override = data_wait.main(argv[:-2] + ["--step-seconds", "0.02", "--free-steps", "0", "--workers", "0"])
    assert override["step_s"] == 0.02 and override["step_source"] == "--step-seconds"
    assert override["workers"] == 0 and not override["persistent_workers"]
    assert override["loader_clips_per_s_unthrottled"] is None


def test_vae_memory(tmp_path: Path) -> None:
    out = tmp_path / "vae.json"
    argv = ["--preset", "vae_tiny", "--size", "32", "--frames", "5", "33", "--chunk-frames", "4"]
    argv += ["--device", "cpu"]
    result = vae_memory.main([*argv, "--json", str(out)])
    assert load(out) == json.loads(json.dumps(result))
    assert result["chunk_frames"] == 4 and result["preset"] == "vae_tiny"
    assert [(r["frames"], r["mode"]) for r in result["rows"]] == [
        (5, "chunked"), (5, "one pass"), (33, "chunked"), (33, "one pass")
    ]
    for row in result["rows"]:
        assert row["error"] is None and row["peak_mib"] >= 0 and row["seconds"] > 0
        assert row["latent"] == [1, 16, 1 + (row["frames"] - 1) // 4, 4, 4]
    # the one-pass peak grows with the clip, the chunked one (4 frames at a time) much less
    assert result["one_pass_growth"] > 1.0 and result["one_pass_growth"] > result["chunked_growth"] + 0.5
    assert isinstance(result["goal_met"], bool)
    assert "chunked" in run_all.summarize("vae_memory", result)


def test_attention_memory(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    result = attention_memory.main(["--presets", "dit_b", "--seq", "256", "1024", "--device", "cpu",
                                    "--json", str(out)])
    assert load(out) == json.loads(json.dumps(result))
    assert {(r["impl"], r["seq"]) for r in result["rows"]} == {
        ("sdpa", 256), ("sdpa", 1024), ("explicit", 256), ("explicit", 1024)
    }
    for row in result["rows"]:
        assert row["error"] is None and row["peak_mib"] > 0 and row["ms"] > 0
        assert (row["heads"], row["head_dim"]) == (12, 64)
    growth = {g["impl"]: g for g in result["growth"]}
    # S x S scores: quadratic growth against SDPA's fused kernel's linear one
    assert growth["explicit"]["growth"] > 2 * growth["sdpa"]["growth"]
    assert growth["explicit"]["exponent"] > 1.5
    assert "exponent" in run_all.summarize("attention_memory", result)


def test_attention_explicit_matches_sdpa() -> None:
    import torch

    q, k, v = torch.randn(3, 1, 2, 16, 8, dtype=torch.float64).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention_memory.explicit_attention(q, k, v), expected)


def test_sampling(tmp_path: Path) -> None:
    out = tmp_path / "sampling.json"
    argv = ["--frames", "5", "--size", "32", "--steps", "1", "3", "--text-len", "8", "--repeats", "1"]
    result = sampling.main([*argv, "--device", "cpu", "--json", str(out)])
    assert load(out) == json.loads(json.dumps(result))
    assert result["preset"] == "dit_tiny" and result["latent"] == [2, 4, 4] and result["tokens"] == 8
    assert [r["steps"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["total_s"] > row["decode_s"] > 0 and row["denoise_s_per_step"] > 0
        assert row["s_per_video"] == row["total_s"]
    assert "per video" in run_all.summarize("sampling", result)


def test_run_all_records_a_failure_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = (["--frames", "not-a-number"], ["--frames", "not-a-number"], True)
    good = (["--frames", "5", "--size", "32", "--steps", "1", "--text-len", "8", "--repeats", "1"], [], True)
    monkeypatch.setattr(run_all, "BENCHMARKS", {"vae_memory": bad, "missing_bench": bad, "sampling": good})
    out = tmp_path / "all.json"
    result = run_all.main(["--device", "cpu", "--json", str(out)])
    assert load(out) == json.loads(json.dumps(result))
    entries = result["benchmarks"]
    assert entries["vae_memory"]["status"] == "error" and "SystemExit" in entries["vae_memory"]["error"]
    assert entries["missing_bench"]["status"] == "skipped"
    assert entries["sampling"]["status"] == "ok" and entries["sampling"]["result"]["rows"][0]["steps"] == 1
