"""The benchmarks run end to end in a smoke size, so they cannot rot."""

import json
import subprocess
import sys

from helpers import DEADLINE_S, PROJECT_DIR


def run_benchmark(*arguments: str, timeout: float = DEADLINE_S) -> str:
    """Run a benchmark script; its printed figures."""
    result = subprocess.run([sys.executable, *arguments], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_serving_benchmark_prints_raw_served_baseline_ray_and_training_rows_and_the_ratios_of_its_targets(models_dir, tmp_path):
    figures_file = tmp_path / "serving.json"
    output = run_benchmark(
        "benchmarks/bench_serving.py", "--model", str(models_dir / "demo"), "--requests", "2", "--clients", "1,2", "--steps", "2",
        "--max-batch-size", "4", "--engine", "local,ray", "--ray-layouts", "1x1", "--training-steps", "15",
        "--json", str(figures_file), timeout=2 * DEADLINE_S,  # sixteen rows, each in fresh processes
    )  # fmt: skip

    for row in ("| raw loop, main thread | 4 |", "| raw loop, worker thread | 4 |", "| raw loop, worker thread + PNG | 1 |",
                "| service, batching off | 1 | 1 |", "| service, batching on | 4 | 2 |", "| baseline server | 1 | 2 |",
                "| service on Ray, 1 replica(s) x 1 CPU, batching on | 4 | 2 |", "| training, raw trainer (main thread) |",
                "| training, the service's device thread |"):  # fmt: skip
        assert row in output, row
    figures = json.loads(figures_file.read_text())
    assert set(figures["ratios"]) == {
        "served_over_raw_1_clients", "served_over_raw_2_clients", "service_over_baseline_1_clients",
        "service_over_baseline_2_clients", "batching_off_1_client_over_raw_batch_1", "training_served_over_raw",
    }  # fmt: skip
    assert all(0 < row["load_cpu_share"] < 1 for row in figures["rows"] if row.get("clients"))
    assert all(row["failed_requests"] == 0 for row in figures["rows"] if row["row"].startswith("service"))


def test_the_cluster_simulation_prints_a_row_per_gpu_and_user_count():
    output = run_benchmark("benchmarks/sim_ray_cluster.py", "--gpus", "1", "2", "--users", "10", "100", "--requests", "300")

    rows = [line for line in output.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "10"], ["| 1", "100"], ["| 2", "10"], ["| 2", "100"]]


def test_the_model_switching_benchmark_runs_and_prints_its_tables():
    output = run_benchmark("benchmarks/bench_models.py", "--steps", "1", "--users", "1,3", "--min-images", "2")

    assert "| time to first image | seconds |" in output and "| one more user | bytes on the device |" in output
    assert "| 3 |" in output


def test_the_training_benchmark_runs_and_prints_its_tables():
    output = run_benchmark("benchmarks/bench_training.py", "--steps", "1", "--requests", "2", "--resolution", "64", "--photos-to-model", "2")

    assert "| demo | cpu | 64 | 1 |" in output
    assert "| with / without |" in output
    assert "| succeeded, active: True | cpu | 2 | 64 |" in output


def test_the_training_quality_benchmark_runs_and_prints_its_figures(tmp_path):
    output = run_benchmark(
        "benchmarks/bench_training_quality.py", "--steps", "2", "--class-images", "2", "--seeds", "1", "--drift-prompts", "2",
        "--json", str(tmp_path / "quality.json"),
    )  # fmt: skip

    figures = json.loads((tmp_path / "quality.json").read_text())
    assert set(figures["in_context"]) == {"a sks shape on a black background", "a sks shape on a gray background", "a sks shape on a blue background",
                                          "a small sks shape on a white background", "a large sks shape on a white background"}  # fmt: skip
    assert 0 <= figures["recontextualisation"] <= 1 and 0 <= figures["prompts_unchanged"] <= 1
    assert figures["settings"]["defaults_from"] == "demo/training_defaults.json" and '"recontextualisation"' in output


def test_the_lora_batching_benchmark_runs_and_prints_its_tables():
    output = run_benchmark(
        "benchmarks/bench_lora_batching.py", "--users", "1,2", "--requests", "4", "--concurrency", "2", "--steps", "2",
        "--batch-sizes", "1,2", "--repeats", "1", "--slot-ranks", "4,8",
    )  # fmt: skip

    assert "| 1 | off |" in output and "| 2 | on |" in output
    assert "| B | no adapter s | one adapter s | B distinct adapters s |" in output and "| 2 |" in output
    assert "Largest difference of a mixed call's output" in output
    assert "| B | slots rank 4 s | slots rank 8 s |" in output


def test_the_modes_benchmark_runs_and_prints_txt2img_img2img_and_inpainting_rows(models_dir):
    output = run_benchmark(
        "benchmarks/bench_modes.py", "--model", str(models_dir / "demo"), "--requests", "3", "--concurrency", "2", "--steps", "4"
    )

    assert "| txt2img |" in output and "| img2img |" in output and "| inpaint |" in output


def test_the_upload_benchmark_runs_and_prints_its_table():
    output = run_benchmark("benchmarks/bench_uploads.py", "--uploads", "2", "--photos", "3", "--side", "256", "--same-user")

    assert "| GET /jobs p50 s |" in output and "1x 202, 1x 429" in output


def test_the_fairness_benchmark_prints_the_backlog_equal_and_weighted_scenarios(tmp_path):
    figures_file = tmp_path / "fairness.json"
    run_benchmark(
        "benchmarks/bench_fairness.py", "--duration", "4", "--warm-up", "1", "--heavy-jobs", "2", "--steps", "2",
        "--json", str(figures_file), timeout=2 * DEADLINE_S,  # five servers, one after the other
    )  # fmt: skip

    result = json.loads(figures_file.read_text())
    backlog_fair = next(row for row in result["rows"] if row["scenario"] == "backlog" and row["scheduling"] == "fair")
    assert backlog_fair["light_status_code"] == 202 and backlog_fair["batches_ahead"] >= 0
    assert set(result["figures"]) >= {"fair_over_fifo_throughput", "fair_jain_index", "weighted_ratio"}
    # At this size (seconds, on a busy machine) the shares say nothing; bench_fairness's full run measures them.
    assert 0 <= result["figures"]["fair_jain_index"] <= 1 and result["figures"]["weighted_ratio"] >= 0


def test_the_previews_benchmark_prints_images_per_second_with_and_without_previews():
    output = run_benchmark("benchmarks/bench_previews.py", "--requests", "2", "--steps", "6", "--rounds", "1", "--batches", "1", "--preview-every", "2")

    row = json.loads(output.splitlines()[0])
    assert row["batch"] == 1 and row["images_per_s_with"] > 0 and row["with_over_without"] > 0


def test_the_provenance_benchmark_prints_the_cost_of_the_marks_and_the_watermarks_survival(tmp_path):
    figures_file = tmp_path / "provenance.json"
    output = run_benchmark("benchmarks/bench_provenance.py", "--images", "2", "--steps", "2", "--json", str(figures_file))

    figures = json.loads(figures_file.read_text())
    assert "| all marks / drawing |" in output and "| watermark read after 50% resize, then JPEG 75 |" in output
    assert figures["signatures_valid"] == 2 and figures["false_alarms_on_unmarked"] == 0
    assert set(figures["detected"]) == {"as served", "JPEG 75", "50% resize", "10% crop", "screenshot PNG", "50% resize, then JPEG 75"}
    assert figures["mark_ms"]["all marks"] > 0 and 0 < figures["mark_share_of_draw"] < 1
    assert {"6 photographs at 512px", "6 photographs at 256px"} <= set(figures["other_pictures"])


def test_the_gpu_benchmark_script_runs_raw_and_served_with_compile_off_and_on_at_smoke_size(tmp_path):
    figures_file = tmp_path / "gpu.json"
    result = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "--smoke", "--json", str(figures_file)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=4 * DEADLINE_S,  # four parts, two of them compile
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    figures = json.loads(figures_file.read_text())
    assert figures["errors"] == {} and figures["skipped"] == []
    for mode in ("eager", "compiled"):
        raw, served = figures["raw"][mode], figures["served"][mode]
        assert raw["single"]["it_per_s"] > 0 and raw["batch_2"]["images_per_s"] > 0
        assert served["single"]["it_per_s"] > 0 and served["first_request_s"] > 0 and served["start_to_ready_s"] > 0
        for row in ("batch_2", "one_lora", "distinct_loras"):
            assert served[row]["failed_requests"] == 0 and served[row]["images_per_s"] > 0, (mode, row, served[row])
        assert set(figures["ratios"][mode]) == {"served_over_raw_single", "served_over_raw_batch_2", "distinct_over_one_lora"}
    compiled = figures["served"]["compiled"]["compile"]
    assert compiled["enabled"] and compiled["mode"] == figures["compile_mode"] == "default", compiled
    assert compiled["compiles"] == 6 and compiled["compiles_on_requests"] == 0, "a base and a LoRA UNet graph and a VAE graph per batch size"
    assert compiled["lora_batches_uncompiled"] == 0, "the LoRA rows ran compiled, from the slots"
    assert figures["raw"]["compiled"]["compile_s"] > 0 and figures["served"]["eager"]["compile"]["enabled"] is False
