"""`make soak`'s runner, briefly: a real server under random mixed traffic, churn, bad loads, smuggling
attempts and unloads racing evictions, whose summary line must say PASS (the full run is
`make soak SOAK_S=600`). Marked long: `make test-long` runs it, not `make test-main`."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("vllm")


@pytest.mark.long
def test_a_short_soak_passes_and_prints_its_summary_line():
    result = subprocess.run([sys.executable, "-m", "perf.soak", "--seconds", "15", "--workers", "3"],
                            capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    match = re.fullmatch(r"soak 15 s, 3 workers: requests (\d+) ok / 0 failed, (\d+) streams aborted, loads (\d+) / "
                         r"unloads \3, (\d+) bad loads refused, (\d+) smuggling attempts refused, (\d+) unloads raced "
                         r"an eviction; server RSS [\d.]+ -> [\d.]+ GiB \(ok\), open fds \d+ -> \d+ \(ok\), mapped "
                         r"([\d.]+) MiB vs base \7 MiB \(ok\): PASS", summary)
    assert match, summary
    assert all(int(match[i]) > 0 for i in (1, 3, 4, 5, 6)), summary
