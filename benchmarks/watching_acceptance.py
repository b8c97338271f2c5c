"""#25's acceptance in one run, for the notes: a 6-point sweep shows its progress, appears live in the dashboard in
Chromium, lands in a local MLflow server as 6 runs and exports its spans to an OTLP receiver; then the same sweep on
a deliberately slowed engine fails the regression gate against it, with the JUnit file written.

    python benchmarks/watching_acceptance.py [workdir]

Needs the tracking and telemetry extras, playwright and Chromium (the dev extra and .ci/run install them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.loadgen.launch import free_port  # noqa: E402
from harness.server.dashboard import create_dashboard_app  # noqa: E402
from tests.conftest import CHROMIUM, serving  # noqa: E402
from tests.test_tracing import Receiver  # noqa: E402

SWEEP = ["-m", "model=tiny-gpt2", "bench=latency", "seed=0,1,2,3,4,5", "bench.prompt_lengths=[16]",
         "bench.max_new_tokens=8", "bench.min_runs=10", "bench.max_runs=20", "bench.min_seconds=0"]  # fmt: skip


def mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(folder / "mlflow.log", "wb")  # noqa: SIM115 - the server's for its whole life
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(uri + "/health", timeout=1).read()
            return proc, uri
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow did not start")


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="watching-"))
    outputs = work / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"}
    proc, uri = mlflow_server(work)
    seen: list[tuple[float, int]] = []  # (seconds since the sweep started, points the dashboard showed)
    try:
        with Receiver() as receiver, serving(create_dashboard_app(outputs, None)) as base:
            from playwright.sync_api import sync_playwright

            folder = outputs / "multirun" / "base"
            t0 = time.monotonic()
            command = [sys.executable, "-m", "harness", *SWEEP, "tracking=mlflow", f"tracking_uri={uri}",
                       f"telemetry.otlp_endpoint={receiver.url}", f"hydra.sweep.dir={folder}"]  # fmt: skip
            sweep = subprocess.Popen(
                command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            stderr: list[str] = []
            reader = threading.Thread(target=lambda: stderr.extend(sweep.stderr), daemon=True)
            reader.start()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page()
                page.goto(base + "/dashboard/")
                while sweep.poll() is None:
                    shown = page.evaluate("Number(document.querySelector('#runs tbody tr td:nth-child(3)')"
                                          "?.textContent || 0)")  # fmt: skip
                    if not seen or seen[-1][1] != shown:
                        seen.append((round(time.monotonic() - t0, 1), shown))
                    page.wait_for_timeout(500)
                page.wait_for_timeout(3000)
                seen.append(
                    (
                        round(time.monotonic() - t0, 1),
                        page.evaluate(
                            "Number(document.querySelector('#runs tbody tr td:nth-child(3)')?.textContent || 0)"
                        ),
                    )
                )
                browser.close()
            out = sweep.stdout.read() if sweep.stdout else ""
            reader.join(5)
            print(f"sweep exit {sweep.returncode} in {time.monotonic() - t0:.0f} s")
            progress = [line for line in stderr if line.startswith("[progress")]
            print(f"{len(progress)} progress lines, e.g.:\n  " + "\n  ".join(progress[:3] + progress[-2:]))
            print(f"the dashboard's point count over time (s, points): {seen}")
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=uri)
            runs = client.search_runs([client.get_experiment_by_name("base").experiment_id])
            print(f"MLflow: {len(runs)} runs in experiment 'base'")
            roots = {s["trace"] for s in receiver.spans}
            print(f"OTLP: {len(receiver.spans)} spans in {len(roots)} traces")
            print(out.splitlines()[-1] if out else "")
        slowed_folder = outputs / "multirun" / "slowed"
        command = [sys.executable, "-c", SLOWED, *SWEEP, "isolation=inline", f"hydra.sweep.dir={slowed_folder}"]
        slowed = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        print(f"slowed sweep exit {slowed.returncode}")
        gate = subprocess.run([sys.executable, "-m", "analysis", "--compare", str(folder), str(slowed_folder),
                               "--fail-on", "tpot_ms[prompt=16].p50:+10%", "--fail-on", "decode_tok_s:-10%"],
                              cwd=work, env=env, capture_output=True, text=True)  # fmt: skip
        junit = slowed_folder / "gate.junit.xml"
        print(f"gate exit {gate.returncode}; {junit} written: {junit.is_file()}")
        print("\n".join(gate.stdout.splitlines()[:4]))
        print(json.dumps({"work": str(work)}))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return 0


# The same sweep with engine=transformers run by the slowed engine of the tests (sleeps per token).
SLOWED = (
    "import sys; sys.argv = ['harness', *sys.argv[1:]]; "
    "from harness.engines import ENGINES; ENGINES['transformers'] = 'slow_engine'; "
    "from harness.__main__ import _main_guarded; sys.exit(_main_guarded())"
)

if __name__ == "__main__":
    sys.exit(main())
