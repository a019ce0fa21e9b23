import json

import pytest

from vmr.cli import main


@pytest.mark.slow
def test_bench_loader_quick_writes_positive_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "loader", "--quick", "--max-workers", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["torchcodec"]
    results = report["loader"]["results"]
    assert set(results) == {"raw_decode", "loader_workers_0", "loader_workers_1"}
    for entry in results.values():
        for name in ("samples_per_s", "frames_per_s"):
            fig = entry[name]
            assert fig["median"] > 0 and fig["min"] <= fig["median"] <= fig["max"] and fig["repetitions"] == 2
    assert "overhead_vs_raw_decode" in results["loader_workers_0"]
    assert "| raw_decode.samples_per_s |" in capsys.readouterr().out
