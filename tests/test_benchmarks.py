"""The benchmark scripts keep working: each runs end to end in its tiny mode (seconds)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` from the repository root with this checkout's soflow_core first."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        env=os.environ | (env or {}) | {"PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_loss_kernels_tiny(tmp_path):
    pytest.importorskip("triton")
    # The interpreter only where there is no GPU; on a CUDA machine the compiled kernels run.
    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    result = run_benchmark(
        "bench_loss_kernels.py", "--preset", "tiny", "--out-dir", str(tmp_path), "--out", "t", env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "t.json").read_text())
    ops = {row["op"] for row in rows}
    assert ops == {"path_build", "teacher_state", "guided_target", "flow_matching", "consistency"}
    assert {row["provider"] for row in rows} == {"eager", "triton", "kernel"}
    for row in rows:
        assert row["median_ms"] > 0 and row["bytes"] > 0 and row["device"] and row["commit"] and row["torch"]
        # Device time from a CUDA-graph replay exists exactly where there is a GPU.
        assert (row["graph_ms"] is not None) == torch.cuda.is_available()
    table = (tmp_path / "t.md").read_text()
    assert "| consistency | full |" in table


def test_bench_loss_kernels_rejects_bad_arguments():
    result = run_benchmark("bench_loss_kernels.py", "--preset", "tiny", "--ops", "softmax", timeout=300)
    assert result.returncode == 2 and "--ops: unknown 'softmax'" in result.stderr


def test_jvp_vs_soflow_tiny(tmp_path):
    result = run_benchmark("jvp_vs_soflow.py", "--preset", "tiny", "--out-dir", str(tmp_path), "--out", "t")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "t.json").read_text())
    names = [row["variant"] for row in rows]
    assert names == [
        "soflow",
        "soflow_reference_style",
        "ref+attn_math",
        "ref+attn_default",
        "ref+joint",
        "ref+fused",
        "meanflow_shared_primal",
        "meanflow_separate",
        "meanflow_subset",
    ]
    by_name = {row["variant"]: row for row in rows}
    meanflow = ("shared_primal", "separate", "subset")
    fastest = min(meanflow, key=lambda mf: by_name[f"meanflow_{mf}"]["median_ms"])
    for row in rows:
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["images_per_s"] > 0
        assert row["device"] and row["torch"] and row["commit"] and row["config"]["model"] == "DiT-tiny"
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        for mf in meanflow:
            expected = row["median_ms"] / by_name[f"meanflow_{mf}"]["median_ms"]
            assert abs(row[f"time_vs_meanflow_{mf}"] - expected) < 1e-9
        # The headline ratio is against the fastest MeanFlow row, whichever it is.
        assert row["fastest_meanflow"] == f"meanflow_{fastest}"
        assert row["time_vs_fastest_meanflow"] == row[f"time_vs_meanflow_{fastest}"]
        assert row["peak_memory_mb"] is None and row["memory_vs_leanest_meanflow"] is None  # CPU, not isolated
        assert row["flops_per_step"] > 0
    assert by_name["meanflow_shared_primal"]["time_vs_meanflow_shared_primal"] == 1.0
    assert by_name["ref+attn_math"]["attention"] == "math"
    assert by_name["meanflow_separate"]["attention"].startswith("math for the JVP")
    assert (by_name["soflow"]["forward_batching"], by_name["soflow_reference_style"]["forward_batching"]) == (
        "joint",
        "split",
    )
    table = (tmp_path / "t.md").read_text()
    assert "| meanflow_separate |" in table and "math attention" in table
    png = tmp_path / "t.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jvp_vs_soflow_compiled_rows_interleaved(tmp_path):
    """Whole-step-compiled rows timed round-robin; the JVP-on-a-subset row cannot compile and says why."""
    variants = "soflow,soflow+compile,meanflow_separate,meanflow_separate+compile,meanflow_subset+compile"
    result = run_benchmark(
        "jvp_vs_soflow.py", "--preset", "tiny", "--out-dir", str(tmp_path), "--out", "t", "--variants", variants,
        "--compile", "--compile-backend", "aot_eager", "--interleave", "--iters", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((tmp_path / "t.json").read_text())}
    assert rows["meanflow_subset+compile"]["status"] == "unsupported"
    assert "data-dependent" in rows["meanflow_subset+compile"]["error"]
    ok = [row for row in rows.values() if row["status"] == "ok"]
    assert len(ok) == 4 and all(row["config"]["interleave"] for row in ok)
    fastest = min((row for row in ok if row["method"] == "meanflow"), key=lambda row: row["median_ms"])
    for row in ok:
        assert row["fastest_meanflow"] == fastest["variant"]
        assert abs(row["time_vs_fastest_meanflow"] - row["median_ms"] / fastest["median_ms"]) < 1e-9
    # Counted FLOPs: compiling changes none.
    assert rows["soflow+compile"]["flops_per_step"] == rows["soflow"]["flops_per_step"] > 0
    assert rows["meanflow_separate+compile"]["flops_per_step"] == rows["meanflow_separate"]["flops_per_step"]
    table = (tmp_path / "t.md").read_text()
    assert "`soflow+compile`: step time" in table
    assert "`meanflow_subset+compile` (unsupported): torch.compile cannot compile this step" in table
    assert "data-dependent" not in table  # the exception's text stays in the JSON, not in the page's table


def test_jvp_vs_soflow_rejects_bad_arguments():
    result = run_benchmark("jvp_vs_soflow.py", "--preset", "tiny", "--variants", "soflow,jvp", timeout=300)
    assert result.returncode == 2 and "--variants: unknown 'jvp'" in result.stderr


def _run_quality(tmp_path, *extra):
    return run_benchmark(
        "quality_at_equal_budget.py", "--preset", "tiny", "--out-dir", str(tmp_path), "--out", "q", *extra
    )


def test_quality_at_equal_budget_tiny(tmp_path):
    result = _run_quality(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "q.json").read_text())
    config = json.loads((tmp_path / "q-config.json").read_text())
    toys = ["checkerboard", "eight_gaussians", "two_moons"]
    assert config["datasets"] == toys and config["seeds"] == [0] and config["budget_s"] == 2.0
    nfe = {
        "soflow": [len(times) for times in config["soflow_times"]],
        "meanflow": config["meanflow_nfe"],
        "flow_matching": config["flow_matching_nfe"],
    }
    expected = {(method, n) for method, values in nfe.items() for n in values}
    assert {("soflow", 1), ("soflow", 2), ("meanflow", 1), ("flow_matching", 8)} <= expected
    # each method's own loss settings: SoFlow's toy recipe, Flow Matching without the adaptive weight
    assert config["soflow_preset"] == "toy" and config["flow_matching_p"] == 0.0
    assert config["soflow_times"][1] == [1.0, 0.3]
    metric_keys = ("energy_distance", "mmd", "sliced_wasserstein")
    for dataset in toys:
        for seed in (0, "mean"):
            samples = [r for r in rows if r["kind"] == "sample" and r["dataset"] == dataset and r["seed"] == seed]
            assert {(r["method"], r["nfe"]) for r in samples} == expected
            floors = [r for r in rows if r["kind"] == "floor" and r["dataset"] == dataset and r["seed"] == seed]
            assert len(floors) == 1 and all(floors[0][k] > 0 for k in metric_keys)
            for row in samples:
                assert row["device"] and row["commit"] and row["torch"] and row["config"]["budget_s"] == 2.0
                assert row["steps"] > 0
                # every method trained for the whole CPU-time budget, and not much more than one step beyond it
                assert 2.0 <= row["train_seconds"] < 2.0 + 5.0
                assert row["train_wall_seconds"] > 0
                if not row["diverged"]:
                    assert all(row[k] >= 0 for k in metric_keys)
        means = [r for r in rows if r["dataset"] == dataset and r.get("seed") == "mean" and r["kind"] == "sample"]
        assert all(r["num_seeds"] == 1 and r["energy_distance_std"] == 0.0 for r in means)
    table = (tmp_path / "q.md").read_text()
    assert "real vs real (floor)" in table and "SoFlow 1-NFE vs MeanFlow 1-NFE" in table
    assert "SoFlow 1-NFE vs the best Flow Matching result: energy distance" in table
    # toy scores and floors are means over independent evaluation draws, and the table says so
    assert config["toy_eval_draws"] == 2 and "each value the mean over 2 draws of 256 samples" in table
    for name in [f"q-samples-{d}.png" for d in toys] + ["q-vs-nfe.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # the table can be redrawn from the JSON alone, identically
    (tmp_path / "q.md").unlink()
    redraw = run_benchmark("quality_at_equal_budget.py", "--table-from", str(tmp_path / "q.json"), timeout=300)
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert (tmp_path / "q.md").read_text() == table


def test_quality_verdict_against_the_best_flow_matching_result():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality_at_equal_budget import against_flow_matching

    def row(method, nfe, value, seed="mean"):
        return {"kind": "sample", "dataset": "digits", "method": method, "nfe": nfe, "seed": seed, **value}

    rows = [
        row("soflow", 1, {"frechet_distance": 6.0}),
        row("flow_matching", 1, {"frechet_distance": 200.0}),
        row("flow_matching", 16, {"frechet_distance": 5.5}),
        row("flow_matching", 100, {"frechet_distance": float("nan")}),  # a diverged run is no best
        row("flow_matching", 32, {"frechet_distance": 1.0}, seed=0),  # one seed is no seed mean
    ]
    line = against_flow_matching(rows, "digits")
    assert line == (
        "SoFlow 1-NFE vs the best Flow Matching result: Fréchet distance 6 vs 5.5 at 16 Euler steps "
        "(seed means; SoFlow above it)."
    )
    rows[0]["frechet_distance"] = 5.5
    assert against_flow_matching(rows, "digits").endswith("(seed means; SoFlow at most it).")
    assert against_flow_matching(rows[1:], "digits") is None


def test_quality_at_equal_budget_digits(tmp_path):
    pytest.importorskip("sklearn")
    result = _run_quality(tmp_path, "--datasets", "digits", "--budget-s", "0.5", "--methods", "soflow,flow_matching")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "q.json").read_text())
    (classifier,) = [r for r in rows if r["kind"] == "classifier"]
    assert classifier["test_accuracy"] > 0.8
    floor = next(r for r in rows if r["kind"] == "floor" and r["seed"] == 0)
    assert floor["frechet_distance"] > 0 and floor["class_coverage"] == 10 and floor["confident_fraction"] > 0.5
    samples = [r for r in rows if r["kind"] == "sample" and r["seed"] == 0]
    assert {r["method"] for r in samples} == {"soflow", "flow_matching"}
    for row in samples:
        assert row["frechet_distance"] >= 0 and 0 <= row["class_coverage"] <= 10
        assert 0 <= row["confident_fraction"] <= 1 and 0 <= row["class_entropy"] <= math.log(10) + 1e-9
    assert (tmp_path / "q-samples-digits.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_at_equal_budget_rejects_bad_arguments(tmp_path):
    result = _run_quality(tmp_path, "--datasets", "mnist")
    assert result.returncode == 2 and "--datasets: unknown" in result.stderr
    result = _run_quality(tmp_path, "--budget-s", "0")
    assert result.returncode == 2 and "--budget-s must be > 0" in result.stderr


def test_toy_recipe_ablation_tiny(tmp_path):
    result = run_benchmark("toy_recipe_ablation.py", "--preset", "tiny", "--out-dir", str(tmp_path), "--out", "a")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "a.json").read_text())
    assert [r["row"] for r in rows] == ["before", "recipe", "p=0"]
    for row in rows:
        assert row["device"] and row["commit"] and row["train_cpu_seconds"] > 0
        assert row["energy_distance_1_step_over_floor"] > 0 and 0 <= row["share_on_squares_1_step"] <= 1
    assert rows[0]["two_step_time"] == 0.5 and rows[1]["two_step_time"] == 0.3
    table = (tmp_path / "a.md").read_text()
    assert "this recipe" in table and "before tuning" in table
    result = run_benchmark("toy_recipe_ablation.py", "--rows", "recipe,nope", "--out-dir", str(tmp_path))
    assert result.returncode == 2 and "--rows: unknown or empty ['nope']" in result.stderr


def test_fid_cost_counts_the_evaluation_and_the_training_flops(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "tests"))
    from _fidelity import import_torch_fidelity, placeholder_root

    import_torch_fidelity(tmp_path / "placeholder")
    placeholder = placeholder_root()  # torch-fidelity imports torchvision: the placeholder where there is none
    if placeholder is not None:
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(p for p in (str(placeholder), os.environ.get("PYTHONPATH")) if p)
        )
    result = run_benchmark("fid_cost.py", "--preset", "tiny", "--out-dir", str(tmp_path), "--fid-samples", "5000")
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads((tmp_path / "fid_cost.json").read_text())
    # DiT-B/4: forward and training step as dit_throughput.py counted them; the SD-VAE decoder and the
    # Inception (5.7 G multiply-adds) counted on the meta device
    assert row["forward_gflop_per_image"] == pytest.approx(11.13, rel=1e-3)
    assert row["train_gflop_per_image"] == pytest.approx(50.13, rel=1e-3)
    assert row["vae_decoder_gflop_per_image"] == pytest.approx(622.2, rel=1e-3)
    assert row["inception_gflop_per_image"] == pytest.approx(11.43, rel=1e-3)
    evaluation = 5000 * (3 * row["forward_gflop_per_image"] + 2 * (622.2 + 11.43)) / 1e6
    assert row["fid_pflop_per_evaluation"] == pytest.approx(evaluation, rel=1e-3)
    assert row["flop_share"] == pytest.approx(evaluation / (evaluation + 25_000 * 256 * 50.13e-6), rel=1e-3)


def test_dit_throughput_tiny_counts_the_step_flops(tmp_path):
    result = run_benchmark("dit_throughput.py", "--preset", "tiny", "--out-dir", str(tmp_path), "--out", "t")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "t.json").read_text())
    (flops,) = [r for r in rows if r["kind"] == "train_flops"]
    # FM sub-batch: 1 grad + 1 no-grad forward; consistency: 3 no-grad + 1 grad; backward = 2x the
    # grad forwards. With λ = 0.75 that is 0.75·(1 + 1 + 2) + 0.25·(4 + 2) = 4.5 forward passes.
    assert 4.3 < flops["forward_equivalents"] < 4.7
    assert flops["flops_per_step"] == flops["flops_per_image"] * flops["batch"] > 0
    (sampling,) = [r for r in rows if r["kind"] == "sampling"]
    assert sampling["images_per_s"] > 0 and sampling["device"] and sampling["commit"]


def test_toy_training_metrics_tiny_records_the_curves_and_probes_the_quotient(tmp_path):
    result = run_benchmark("toy_training_metrics.py", "--preset", "tiny", "--out-dir", str(tmp_path), "--out", "m")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "m.json").read_text())
    assert all(row["device"] and row["commit"] for row in rows)
    training = [row for row in rows if row["kind"] == "training"]
    assert [row["step"] for row in training] == [*range(0, 30, 2), 29]
    assert training[0]["r"] == 1.0 and training[-1]["r"] < training[0]["r"] and training[-1]["finite"] == 1.0
    probes = {(row["step"], row["r"]): row for row in rows if row["kind"] == "probe"}
    assert sorted({step for step, _ in probes}) == [0, 2, 8, 15, 22, 30]
    # untrained, F ≡ 0 makes f(x, t, s) = x: the quotient along the conditional velocity is that velocity at any r
    # (mean of (noise − data)², about 1 + E[data²] = 2.33 on the checkerboard), and along the network's own
    # velocity (0) it is 0
    initial = [probes[0, r] for r in (1.0, 0.1, 0.002)]
    assert all(abs(row["conditional"] - initial[0]["conditional"]) < 1e-4 for row in initial)
    assert 1.9 < initial[0]["conditional"] < 2.8 and all(row["model_velocity"] == 0.0 for row in initial)
    assert probes[30, 0.002]["conditional"] != initial[0]["conditional"]  # trained copies differ
    # consistency_loss carries (t − ℓ)/(2|b(t, s)|) = r/2 (Euler) except where s was clamped: it falls with r untrained
    assert initial[0]["loss"] > 5 * initial[1]["loss"] > 5 * initial[2]["loss"] > 0
    assert initial[0]["loss_share_pinned"] < initial[2]["loss_share_pinned"] <= 1
    (evaluation,) = [row for row in rows if row["kind"] == "evaluation"]
    assert evaluation["energy_distance_1_step"] > 0 and evaluation["steps"] == 30
    assert "| optimizer steps done | r = 1 | r = 0.1 | r = 0.002 |" in (tmp_path / "m.md").read_text()
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_cpu_threads_tiny_times_each_count_in_turns(tmp_path):
    result = run_benchmark(
        "cpu_threads.py", "--preset", "tiny", "--threads", "1,2,0", "--out-dir", str(tmp_path), "--out", "c"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "c.json").read_text())
    assert [row["threads"] for row in rows][:2] == [1, 2] and [row["torch_default"] for row in rows] == [0, 0, 1]
    assert all(row["steps_timed"] == 6 and row["median_step_ms"] > 0 and row["device"] for row in rows)
    assert rows[0]["wall_vs_one_thread"] == 1.0 and rows[1]["wall_vs_one_thread"] > 0
    assert "| 1 | " in (tmp_path / "c.md").read_text()
    result = run_benchmark("cpu_threads.py", "--threads", "1,-1", "--out-dir", str(tmp_path))
    assert result.returncode == 2 and "--threads: give thread counts >= 0" in result.stderr


def test_summary_is_read_from_the_committed_results(tmp_path):
    result = run_benchmark("summary.py", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "summary.json").read_text())
    speed = {(row["run"], row["soflow_variant"]): row for row in rows if row["kind"] == "speed"}
    results = ROOT / "benchmarks" / "results"
    h100 = {r["variant"]: r for r in json.loads((results / "jvp_vs_soflow-dit-b-2-h100.json").read_text())}
    row = speed["jvp_vs_soflow-dit-b-2-h100", "soflow"]  # there the shared-primal MeanFlow ran out of memory
    assert row["fastest_meanflow"] == "meanflow_separate" and h100["meanflow_shared_primal"]["status"] == "oom"
    assert row["time_ratio"] == pytest.approx(h100["soflow"]["time_vs_meanflow_separate"])
    cpu = {r["variant"]: r for r in json.loads((results / "jvp_vs_soflow-dit-s-4-bs16-cpu.json").read_text())}
    for variant in ("soflow", "soflow+compile"):  # the benchmark's own "fastest MeanFlow row" and ratio
        row = speed["jvp_vs_soflow-dit-s-4-bs16-cpu", variant]
        assert row["fastest_meanflow"] == cpu[variant]["fastest_meanflow"] == "meanflow_subset"
        assert row["time_ratio"] == pytest.approx(cpu[variant]["time_vs_fastest_meanflow"])
    assert speed["jvp_vs_soflow-dit-s-4-bs16-cpu", "soflow"]["memory_ratio"] == pytest.approx(
        cpu["soflow"]["memory_vs_leanest_meanflow"]
    )
    quality = {row["dataset"]: row for row in rows if row["kind"] == "quality"}
    assert quality["checkerboard"]["soflow_1"] == pytest.approx(0.0012343345, rel=1e-6)
    assert (
        quality["checkerboard"]["flow_matching_best_nfe"] == 100 and quality["digits"]["metric"] == "frechet_distance"
    )
    # the summary the docs include is the one these results give
    assert (tmp_path / "summary.md").read_text() == (results / "summary.md").read_text()
    for chart in ("summary-speed.png", "summary-quality.png"):
        assert (tmp_path / chart).read_bytes()[:4] == b"\x89PNG"
