"""Operating a host: `logs --follow` and `ps`, on real workers."""

import re
import subprocess
import time

from conftest import PIKU_PY, PYTHON, TEST_APPS, wait_until


def test_logs_follow_shows_new_lines_at_once_and_keeps_following_across_rotation(piku, emperor, make_app):
    app = make_app(TEST_APPS / "ticker", "ticker")
    app.push()
    log = piku.root / "logs" / "ticker" / "worker.1.log"
    wait_until(lambda: log.exists() and "tick" in log.read_text(errors="replace"), message="ticks in the log")
    follower = subprocess.Popen([PYTHON, str(PIKU_PY), "logs", "ticker", "worker", "-n", "0"], env=piku.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latencies, counts = [], []
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            line = follower.stdout.readline()
            match = re.search(r"tick ([0-9]+) ([0-9]+\.[0-9]{3})", line)   # uWSGI may glue its rotation note on
            if match:
                counts.append(int(match.group(1)))
                latencies.append(time.time() - float(match.group(2)))
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    rotated = list(log.resolve().parent.glob("worker.1.log.old*"))
    assert rotated, "the 8 KiB log rotated while it was followed"
    assert len(counts) > 100, counts[:5]
    missing = sorted(set(range(counts[0], counts[-1] + 1)) - set(counts))
    assert not missing, f"lines lost across rotation: {missing[:10]}"
    latencies.sort()
    median, worst = latencies[len(latencies) // 2], latencies[-1]
    print(f"logs --follow: {len(counts)} lines, median latency {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms")
    assert median < 0.5, (median, worst)
