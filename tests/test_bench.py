"""`vmr bench all --quick`: the report's schema and that every figure is a positive number.
No test asserts a speed: speeds are measured by the suite and written to benchmarks/reports/."""

import json

import pytest

from vmr.cli import main


def _figures(report: dict):
    for part in ("decode", "loader", "train", "infer", "features", "encode", "search", "backbones", "backbones_quality"):
        for name, entry in report[part]["results"].items():
            for key, fig in ([(name, entry)] if "median" in entry else entry.items()):
                yield f"{part}.{key}", fig


@pytest.mark.slow
def test_bench_all_quick_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "all", "--quick", "--max-workers", "1", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["torch"] and machine["torchcodec"] and machine["ffmpeg"]
    assert report["device"] == "cpu" and report["quick"] is True
    assert set(report["loader"]["results"]) == {"raw_decode", "loader_workers_0", "loader_workers_1"}
    assert {"shards_frames_per_s", "baseline_frames_per_s", "speedup_vs_baseline"} <= set(report["decode"]["results"])
    assert {"steps_per_s", "samples_per_s", "data_wait_fraction", "peak_memory", "model_tflops_per_s",
            "loop_step_s", "model_alone_step_s", "loop_overhead", "model_alone_tflops_per_s"} <= set(
        report["train"]["results"])
    assert "scaling_efficiency" in report["loader"]["results"]["loader_workers_1"]
    assert {"latency_ms_p50", "latency_ms_p95", "batched_videos_per_s_batch8", "end_to_end_ms_from_file",
            "peak_memory"} <= set(report["infer"]["results"])
    assert {"extract_frames_per_s", "extract_vs_decode_plus_forward", "frozen_step_from_videos_s",
            "frozen_step_from_features_s", "features_speedup"} <= set(report["features"]["results"])
    assert {"first_query_s", "later_query_s", "later_query_speedup", "full_pass_per_query_s",
            "encoding_mb_per_video_minute"} <= set(report["encode"]["results"])
    assert {"index_videos_per_s", "ann_build_1000_videos_s", "search_1000_videos_memory_mb", "search_1000_videos_ms",
            "search_1000_videos_shortlist_ms", "search_1000_videos_recall",
            "contrast_lookup_100000_sentences_ms"} <= set(report["search"]["results"])
    assert report["search"]["results"]["search_1000_videos_recall"]["median"] == 1.0  # exact at this size
    costs = report["backbones"]["results"]
    for tower in ("clip_b32", "siglip_b16"):
        assert {f"{tower}_{k}" for k in ("params_m", "vision_frames_per_s", "text_queries_per_s", "infer_window_s",
                                         "train_step_s")} <= set(costs)
    assert costs["clip_b32_patches_per_frame"]["median"] == 49 and costs["siglip_b16_patches_per_frame"]["median"] == 196
    assert {"clip_tiny_r1_at_0.5", "siglip_tiny_r1_at_0.5"} <= set(report["backbones_quality"]["results"])
    assert report["train"]["flops_per_step"] > 0
    names = []
    for name, fig in _figures(report):
        names.append(name)
        assert fig["unit"] and fig["repetitions"] >= 1, name
        # an overhead may be negative; 10 steps of the quick quality run may find nothing yet
        assert fig["median"] > 0 or "overhead" in name or name.startswith("backbones_quality."), name
        if "min" in fig and not name.startswith("infer.latency_ms_p"):
            assert fig["min"] <= fig["median"] <= fig["max"], name
    assert len(names) >= 15
    table = capsys.readouterr().out
    assert "| infer.latency_ms_p50 |" in table and "| features.features_speedup |" in table
    assert "| train.loop_overhead |" in table and "| loader.loader_workers_1.scaling_efficiency |" in table
    assert "original promise" in table and "| encode.later_query_speedup |" in table
    assert "| backbones.siglip_vs_clip_train_step_s |" in table and "| backbones_quality.siglip_tiny_r1_at_0.5 |" in table


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "loader", "--max-workers", "-1"]) == 2
    assert "--max-workers must be >= 0" in capsys.readouterr().err
    assert main(["bench", "train", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_compares_variants_in_one_run(tmp_path, capsys):
    """One command, the base run and a variant beside it, each with the loop, the model alone and
    their ratio."""
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--quick", "--device", "cpu", "--batch-size", "1", "2",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())["train"]
    assert report["batch_size"] == 1 and set(report["variants"]) == {"batch2"}
    assert report["variants"]["batch2"]["batch_size"] == 2
    for results in (report["results"], report["variants"]["batch2"]["results"]):
        assert results["loop_overhead"]["median"] > 0 and results["model_alone_step_s"]["median"] > 0
    assert report["variants"]["batch2"]["flops_per_step"] > report["flops_per_step"]
    table = capsys.readouterr().out
    assert "| train.loop_overhead |" in table and "| train[batch2].loop_overhead |" in table
