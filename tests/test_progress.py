"""Progress of long work: a point's reports (coalesced, through the sweep when the point runs in a process of its
own), the sweep's display (points done, time left) in plain lines and live, and a serve level's requests."""

from __future__ import annotations

import io
import time

from harness import progress
from harness.progress import PointReporter, SweepProgress, line_sink, parse
from tests.conftest import run_harness


def test_a_point_reports_phases_at_once_and_details_at_most_a_few_times_a_second():
    heard: list[dict] = []
    reporter = PointReporter(heard.append)
    reporter.phase("load")
    for n in range(50):
        reporter(f"run {n}")
    reporter.phase("measure")
    reporter.phase("measure")  # the same phase again says nothing
    assert [h["phase"] for h in heard] == ["load", "measure"]  # the details came too soon after the phase
    time.sleep(1.0 / progress.REPORT_HZ + 0.01)
    reporter("run 51")
    assert heard[-1] == {"phase": "measure", "detail": "run 51"}


def test_a_point_process_reports_in_marked_lines_that_only_the_sweep_reads():
    out = io.StringIO()
    PointReporter(line_sink(out)).phase("warm-up")
    (line,) = out.getvalue().splitlines(keepends=True)
    assert parse(line) == {"phase": "warm-up", "detail": ""}
    assert parse("[ok] model=gpt2 ...\n") is None and parse(progress.MARK + "{not json\n") is None


def test_plain_lines_give_points_done_the_time_left_and_the_running_points_state():
    out = io.StringIO()
    shown = SweepProgress(3, stream=out, interactive=False)
    shown.start_point("model=a bench=latency")
    shown.update({"phase": "load", "detail": ""})
    shown.update({"phase": "load", "detail": "quiet: within the interval"})
    shown.finish_point("ok")
    shown.start_point("model=b bench=latency")
    shown.finish_point("ok", skipped=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[progress 0/3 points] model=a bench=latency · load"
    assert lines[1].startswith("[progress 1/3 points, about ") and lines[1].endswith("model=a bench=latency · ok")
    assert len(lines) == 3 and shown.time_left() is not None and shown.time_left() < 1.0
    live = SweepProgress(2, stream=io.StringIO(), interactive=True)  # rich's live bar: updated and closed cleanly
    live.start_point("model=a")
    live.update({"phase": "measure", "detail": "latency prompt=8: 3 runs"})
    assert live.status_text() == "model=a · measure · latency prompt=8: 3 runs"
    live.finish_point("ok")
    live.close()


def test_a_sweep_shows_its_forked_points_progress_through_the_parent(tmp_path):
    done = run_harness(tmp_path, "-m", "model=tiny-gpt2", "bench=latency", "seed=0,1", "bench.prompt_lengths=[8]",
                       "bench.max_new_tokens=4", "bench.min_runs=3", "bench.max_runs=3", "bench.min_seconds=0",
                       "report=false")  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = [line for line in done.stderr.splitlines() if line.startswith("[progress")]
    assert "[progress 0/2 points] model=tiny-gpt2" in shown[0] and shown[0].endswith("· load")
    assert any(line.endswith("seed=1 · warm-up") for line in shown) and shown[-1].startswith("[progress 2/2 points]")
    assert progress.MARK not in done.stdout + done.stderr  # the marked lines never reach the user


def test_a_serve_level_reports_its_requests_sent_and_finished():
    from harness.loadgen import load
    from runners.benches.serve import watching

    heard: list[str] = []
    reporter = PointReporter(lambda state: heard.append(state["detail"]))

    class Record:
        def __init__(self, sent: float, ended: float) -> None:
            self.t_send, self.t_end = sent, ended

    with watching(reporter, "serve concurrency=2", every_s=0.05):
        load.running_level[:] = [[Record(1.0, 2.0), Record(1.0, 0.0), Record(0.0, 0.0)]]
        time.sleep(0.4)
    assert heard[0] == "serve concurrency=2: starting" and "serve concurrency=2: 2 sent, 1 finished" in heard
    assert load.running_level == []
