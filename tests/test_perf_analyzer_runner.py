"""The perf_analyzer runner's retry of a level whose profile export came back broken (perf_analyzer 2.51
now and then exits 0 with an empty export). The flake cannot be provoked in the real binary, so a stand-in
takes its place for this test only (tests/serving/test_perf_analyzer.py runs the real one): its first run
leaves the export empty, and like the real one it refuses an export path that already exists."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[1] / "perf_analyzer_configs" / "run_perf_analyzer.py"

STAND_IN = """#!{python}
import json, sys
from pathlib import Path
argv = sys.argv[1:]
csv_path, export = Path(argv[argv.index("-f") + 1]), Path(argv[argv.index("--profile-export-file") + 1])
if export.exists():
    print("error: Failed to parse --profile-export-file. Path must not already exist.")
    sys.exit(1)
calls = Path(__file__).with_suffix(".calls")
first = not calls.exists()
calls.write_text("1")
csv_path.write_text("Concurrency,Inferences/Second\\n1,2.0\\n")
params = json.dumps({{"max_tokens": 3, "ignore_eos": True}})
request = {{"timestamp": 0, "response_timestamps": [10**6, 2 * 10**6, 3 * 10**6],
            "request_inputs": {{"sampling_parameters": params}}}}
export.write_text("" if first else json.dumps({{"experiments": [{{"requests": [request]}}]}}))
"""


def test_a_broken_export_is_run_again_and_both_attempts_are_kept(tmp_path):
    stand_in = tmp_path / "perf_analyzer"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    spec = importlib.util.spec_from_file_location("run_perf_analyzer", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    out = tmp_path / "out"
    assert runner.main(["--concurrency", "1", "--out", str(out), "--perf-analyzer", str(stand_in)]) == 0
    (level,) = json.loads((out / "summary.json").read_text())["levels"]
    assert level["ok"] and level["requests"] == 1 and level["output_tokens"] == 3
    assert [e.split(":")[0] for e in level["first_attempt_errors"]] == [runner.PROFILE_EXPORT_BROKEN]
    assert sorted(p.name for p in out.glob("c1.first-attempt.*")) == [
        "c1.first-attempt.csv", "c1.first-attempt.log", "c1.first-attempt.profile.json"
    ]  # fmt: skip
