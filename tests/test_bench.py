"""`python -m eval.bench --smoke` completes and its JSON has every field (no timing assertions: machines are noisy)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SD_METHODS = ["ours:1", "ours:8", "ours:32", "lora:4", "lora:32", "naive:32"]


def has(d: dict, path: str) -> bool:
    """Whether the dotted key path exists in nested dicts."""
    for key in path.split("/"):
        if not isinstance(d, dict) or key not in d:
            return False
        d = d[key]
    return True


@pytest.mark.slow
def test_bench_smoke_writes_every_field(tmp_path):
    out = tmp_path / "tmp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "eval.bench", "--smoke", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### Targets" in proc.stdout
    res = json.loads(out.read_text())

    for key in ["date", "device", "torch", "diffusers", "peft", "loadavg_start", "loadavg_end", "seconds"]:
        assert has(res, f"meta/{key}"), key
    for key in ["full_lu", "top_r_ldu_r1", "top_r_ldu_r8", "top_r_ldu_r32", "add_loldu_r32"]:
        assert has(res, f"injection/times/{key}/median"), key
    assert has(res, "injection/speedup_vs_full_lu/top_r_ldu_r32/median")
    for load in ("quiet", "busy"):
        assert has(res, f"injection/load_threads/{load}/1_threads/median"), load
    assert isinstance(res["llama"], dict) and res["llama"]

    sd = res["sd"]
    for key in ["unet_params", "build_s", "n_target_layers", "rounds/base/infer/median", "rounds/scale_hook_s/median",
                "files/format/packed/header_bytes", "files/format/per_layer_keys/header_bytes",
                "pipeline/load/ours:32/median", "pipeline/load/lora:4/median", "pipeline/load_ratio/median",
                "pipeline/load_busy/ours:32/median",
                "pipeline/switch/ours:32/median", "pipeline/switch/lora:4/median"]:
        assert has(sd, key), key
    for spec in SD_METHODS:
        worker = sd["train"][spec]
        assert "error" not in worker, worker.get("error")
        for key in ["inject_s_cold", "trainable", "floor_step/median", "step/median", "step_ratio/median",
                    "floor_peak_bytes", "peak_bytes", "peak_increase_bytes", "floor_flops", "flops", "flops_ratio"]:
            assert has(worker, key), (spec, key)
        assert worker["flops"] > 0 and worker["floor_flops"] > 0
        for key in ["inject/median", "infer/median", "infer_first/median", "infer_ratio/median", "infer_ratio/best",
                    "trainable"]:
            assert has(sd["rounds"][spec], key), (spec, key)
        assert sd["files"][spec]["bytes"] > 0
    for spec in ["ours:32", "lora:4", "naive:32"]:
        assert has(sd["rounds"][spec], "fuse/median") and has(sd["rounds"][spec], "infer_fused_ratio/median"), spec
    for spec in ["ours:32", "lora:4"]:
        assert has(sd["rounds"][spec], "unfuse/median"), spec

    batch = res["batch"]
    for key in ["ours base", "ours one", "ours mixed:1", "ours mixed:4", "ours mixed:16", "ours seq:4", "ours seq:16",
                "lora one", "lora mixed:1", "lora mixed:4", "lora mixed:16"]:
        assert has(batch, f"rounds/vs_ours_one/{key}/median") and has(batch, f"rounds/times/{key}/median"), key
    for key in ["n", "file_bytes", "first_load_s", "load_all_s", "load_each_s/median", "nbytes_per_adapter",
                "rss_per_adapter"]:
        assert has(res, f"library/{key}"), key

    assert len(res["targets"]) == 13
    assert all(t["pass"] in (True, False) for t in res["targets"]), [t for t in res["targets"] if t["pass"] is None]
    for t in res["targets"]:
        assert {"target", "required", "measured", "value", "pass"} <= set(t)


def fake_run(switch_ours: list[float]) -> dict:
    """Results in eval.bench's JSON layout for the figures the record keeps (times in seconds, three rounds)."""
    def v(*xs):
        return {"values": list(xs), "median": sorted(xs)[1]}

    return {"meta": {"date": "d", "device": "cpu"},
            "injection": {"times": {"top_r_ldu_r32": v(0.10, 0.11, 0.12), "full_lu": v(2.0, 2.1, 2.2)}},
            "sd": {"rounds": {"ours:32": {"inject": v(0.10, 0.10, 0.11), "infer_ratio": v(1.0, 1.01, 1.02)},
                              "lora:4": {"inject": v(0.30, 0.32, 0.31)}},
                   "pipeline": {"load_ratio": v(0.20, 0.21, 0.22),
                                "switch": {"ours:32": v(*switch_ours), "lora:4": v(0.005, 0.0052, 0.0051)}},
                   "train": {"ours:32": {"step_ratio": v(1.0, 1.02, 1.01)}, "lora:4": {"step_ratio": v(1.05, 1.04,
                                                                                                      1.06)}}}}


def test_compare_flags_an_artificially_slowed_switch_and_nothing_else():
    """A copy of a run whose switch took 20 ms longer (a delay, as a regression would add) shows in --compare."""
    from eval.bench import record

    recorded = record.summarise(fake_run([0.0010, 0.0011, 0.0012]))
    assert len(recorded["figures"]) == 7
    same = record.compare(record.summarise(fake_run([0.0011, 0.0010, 0.0012])), recorded)
    assert [r["figure"] for r in same if r["moved"]] == []
    slowed = record.compare(record.summarise(fake_run([t + 0.020 for t in (0.0010, 0.0011, 0.0012)])), recorded)
    assert [(r["figure"], r["verdict"]) for r in slowed if r["moved"]] == [("switch ours / set_adapters LoRA",
                                                                             "slower")]


def test_committed_record_holds_ratios_only():
    from eval.bench import record

    rec = record.load_record()
    assert rec["figures"] and all(set(f) == {"median", "spread"} for f in rec["figures"].values())
    assert set(rec["figures"]) <= set(record.figures(fake_run([0.001, 0.001, 0.001])))
