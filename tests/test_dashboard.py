"""The dashboard in a real headless Chromium (driven by Playwright, using the system's browser): it asks for the
token, shows the sweeps and their points, draws interactive plotly charts, updates when a new sweep's point lands,
compares two sweeps, and shows a hostile model name and output as text, never running them. Over HTTP: 401 without
the token, 404 outside the outputs folder; `harness serve` carries it beside its jobs."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runners import run_point
from tests.conftest import CHROMIUM, serving

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")

TOKEN = "dash-secret"
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until(page, expression: str, timeout_s: float = 15.0) -> None:
    """Poll a page expression from here: the page's Content-Security-Policy forbids the string evaluation that
    Playwright's own wait_for_function injects (as it would forbid any injected script)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        page.wait_for_timeout(100)


def sweep_folder(outputs: Path, name: str, result: dict, model: str) -> Path:
    """A sweep folder holding one point: `result` with its model renamed."""
    folder = outputs / "multirun" / name
    point = folder / f"model={name}"
    point.mkdir(parents=True)
    data = json.loads(json.dumps(result))
    data["point"]["model"] = model
    (point / "result.json").write_text(json.dumps(data))
    (folder / "command.txt").write_text(f"python -m harness -m model={model} bench=latency\n")
    return folder


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, compose):
    root = tmp_path_factory.mktemp("outputs")
    cfg = compose("model=tiny-gpt2", "bench=latency", "bench.prompt_lengths=[8,16]", "bench.max_new_tokens=4",
                  "bench.min_runs=3", "bench.max_runs=3", "bench.min_seconds=0")  # fmt: skip
    point = root / "made"
    result = run_point(cfg, point)
    assert result.status == "ok", result.error
    data = json.loads((point / "result.json").read_text())
    shutil.rmtree(point)
    data["outputs"] = [{"text": "<script>window.__pwned=2</script>"}]
    sweep_folder(root, "first", data, HOSTILE)
    return root, data


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_the_dashboard_in_chromium_asks_for_the_token_shows_updates_compares_and_never_runs_hostile_text(outputs):
    from harness.server.dashboard import create_dashboard_app

    root, data = outputs
    with serving(create_dashboard_app(root, TOKEN)) as base:
        assert get(base + "/dashboard/api/state")[0] == 401
        status, page = get(base + "/dashboard/")
        assert status == 401 and 'name="token"' in page
        assert get(base + "/dashboard/files/../../../etc/passwd", TOKEN)[0] == 404
        assert get(base + "/dashboard/files/multirun/first/model=first/result.json", TOKEN)[0] == 200
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/dashboard/")
            page.fill("#token", "wrong")
            page.click("#sign-in")
            assert "not this server's" in page.text_content("#why")
            page.fill("#token", TOKEN)
            page.click("#sign-in")
            page.wait_for_selector("#points tbody tr")
            # The hostile name and output are text: shown as typed, never run.
            assert HOSTILE in page.text_content("#points tbody")
            assert page.evaluate("window.__pwned") is None and dialogs == []
            assert page.locator("#points img").count() == 0
            # plotly drew the chart; picking another metric and dropping the point redraws it.
            page.wait_for_selector("#chart .main-svg")
            assert page.get_attribute("#chart", "data-traces") == "1"
            page.select_option("#metric", "tpot_ms")
            assert page.evaluate("document.querySelector('#chart').layout.yaxis.title.text").startswith("tpot_ms")
            page.uncheck("#point-picks input")
            assert page.get_attribute("#chart", "data-traces") == "0"
            # A new sweep's point lands: the page shows it without a reload.
            sweep_folder(root, "second", data, HOSTILE)
            wait_until(page, "document.querySelectorAll('#runs tbody tr').length === 2")
            # The two sweeps compared (the same figures: every change 0%, none significant).
            page.select_option("#compare-a", "multirun/first")
            page.select_option("#compare-b", "multirun/second")
            page.click("#compare-go")
            wait_until(page, "Number(document.querySelector('#compare').dataset.rows) > 0")
            compared = page.text_content("#compare tbody")
            assert "ttft_ms[prompt=8]" in compared and HOSTILE in compared
            assert page.evaluate("window.__pwned") is None and dialogs == [] and errors == []
            browser.close()


def test_harness_serve_carries_the_dashboard_beside_its_jobs(tmp_path, outputs):
    from harness.server import ServerSettings, create_app

    root, _ = outputs
    settings = ServerSettings(token=TOKEN, jobs_dir=str(tmp_path / "api-jobs"), dashboard_dir=str(root))
    with serving(create_app(settings)) as base:
        assert get(base + "/dashboard/api/state")[0] == 401
        status, body = get(base + "/dashboard/api/state", TOKEN)
        state = json.loads(body)
        assert status == 200 and state["jobs"] == [] and state["runs"][0]["folder"] == "multirun/first"
        status, body = get(base + "/dashboard/api/sweep?folder=multirun/first", TOKEN)
        assert status == 200 and json.loads(body)["points"][0]["point"]["model"] == HOSTILE
        assert get(base + "/dashboard/api/sweep?folder=../..", TOKEN)[0] == 404
        assert get(base + "/dashboard/assets/plotly.min.js", TOKEN)[0] == 200
        assert get(base + "/v1/models")[0] == 401  # the API's own gate is unchanged
