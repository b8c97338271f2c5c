"""The live dashboard: the sweeps and jobs under an outputs folder with their status, each point's figures, the
report's tables and plots, and the comparison of two sweeps, in a page that polls for changes.

Served by `harness serve` (at /dashboard, beside the API, its jobs listed) and by `harness dashboard <folder>`
(read-only, no model loaded). Everything comes from the result files through a JSON API under /dashboard/api; the
page builds its DOM with textContent only and gives plotly.js (served from the installed plotly package, no CDN)
labels with markup escaped, so a hostile model name or output is shown, never run. Files of the outputs folder
(report.html, plots) are served under /dashboard/files/ only from inside the folder (404 otherwise) and in a
sandbox (Content-Security-Policy: sandbox), so even a report that carried script could not act for the user.
When the server has a token, the dashboard needs it too: the page asks for it once and keeps a cookie (an HMAC of
the token, HttpOnly, SameSite=Strict) that only the dashboard's paths accept.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

STATIC = Path(__file__).parent / "dashboard_static"
PREFIX = "/dashboard"
COOKIE = "harness_dashboard"
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'"
)
FILE_POLICY = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
FILE_TYPES = {".html": "text/html", ".png": "image/png", ".md": "text/plain", ".csv": "text/plain",
              ".json": "application/json", ".jsonl": "text/plain", ".txt": "text/plain"}  # fmt: skip
HEADLINE = ("ttft_ms", "tpot_ms", "e2e_ms", "decode_tok_s", "output_tok_s", "goodput_rps", "pass_rate",
            "perplexity", "weights_mib", "max_rate_rps")  # fmt: skip


def cookie_value(token: str) -> str:
    """What the dashboard's cookie holds: an HMAC of the token, never the token itself."""
    return hmac.new(token.encode(), b"harness-dashboard", hashlib.sha256).hexdigest()


def cookie_ok(header: str, token: str) -> bool:
    from http.cookies import CookieError, SimpleCookie

    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return False
    given = jar.get(COOKIE)
    return given is not None and hmac.compare_digest(given.value.encode(), cookie_value(token).encode())


def login_page(why: str) -> bytes:
    page = (STATIC / "login.html").read_text()
    return page.replace("{{why}}", why.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")).encode()


def plotly_js() -> Path:
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise HTTPException(404, "plotly is not installed: pip install plotly")
    return Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"


def _finite(value: Any) -> Any:
    """JSON cannot carry NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _inside(root: Path, relative: str) -> Path:
    """A path under root, or 404 (`..`, absolute paths and links out of the folder included)."""
    try:
        target = (root / relative).resolve()
        inside = target.is_relative_to(root.resolve()) and target.exists()
    except (ValueError, OSError):  # a NUL byte, a name too long: no such file either
        inside = False
    if not inside:
        raise HTTPException(404, "no such file in the outputs folder")
    return target


def _point(result: dict[str, Any], folder: Path, root: Path) -> dict[str, Any]:
    given = result.get("metrics")
    metrics = {
        str(key): {k: _finite(stat.get(k)) for k in ("mean", "ci95", "unit", "n", "p50", "p99")}
        for key, stat in (given.items() if isinstance(given, dict) else [])
        if isinstance(stat, dict) and isinstance(stat.get("mean"), int | float)
    }
    error = result.get("error") if isinstance(result.get("error"), dict) else {}
    return {
        "folder": str(folder.relative_to(root)),
        "status": result.get("status"),
        "point": {k: str(v) for k, v in (result.get("point") or {}).items()},
        "metrics": metrics,
        "error": f"{error.get('type', '')}: {error.get('message', '')}" if error else None,
        "outputs": [str(o.get("text", ""))[:500] for o in (result.get("outputs") or [])[:2]],
    }


def sweep_view(root: Path, relative: str) -> dict[str, Any]:
    from analysis.table import point_labels

    folder = _inside(root, relative)
    if not folder.is_dir():
        raise HTTPException(404, "not a sweep folder")
    results, folders = [], []
    for path in sorted(folder.rglob("result.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("point"), dict):
            data["path"] = str(path)  # where two points share a label, their folders tell them apart
            results.append(data)
            folders.append(path.parent)
    labels = point_labels(results) if results else []
    points = [{**_point(r, f, root), "label": label} for r, f, label in zip(results, folders, labels, strict=True)]
    command = folder / "command.txt"
    plots = sorted(str(p.relative_to(root)) for p in (folder / "plots").glob("*.png"))
    report = folder / "report.html"
    return {
        "folder": relative,
        "command": command.read_text().strip() if command.is_file() else "",
        "points": points,
        "report": str(report.relative_to(root)) if report.is_file() else None,
        "plots": plots,
        "headline": [m for m in HEADLINE if any(k.split("[")[0] == m for p in points for k in p["metrics"])],
    }


def compare_view(root: Path, a: str, b: str) -> dict[str, Any]:
    from analysis.compare import compare_frame
    from analysis.results import SchemaError, load_results

    try:
        sweeps = [load_results(_inside(root, a)), load_results(_inside(root, b))]
        frame = compare_frame(sweeps, [a, b])
    except (SchemaError, FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise HTTPException(404, f"nothing to compare: {exc}") from None
    rows = []
    for r in frame.itertuples() if not frame.empty else []:
        rows.append({
            "point": f"{r.model} q={r.quant} {r.engine} {r.bench}",
            "metric": f"{r.metric}[{r.case}]" if r.case else r.metric,
            "unit": r.unit_a, "a": _finite(float(r.mean_a)), "a_ci": _finite(float(r.ci95_a)),
            "b": _finite(float(r.mean_b)), "b_ci": _finite(float(r.ci95_b)),
            "delta_pct": _finite(float(r.delta_pct)), "significant": bool(r.significant),
        })  # fmt: skip
    return {"a": a, "b": b, "rows": rows}


def state(root: Path, jobs: Callable[[], list[dict[str, Any]]] | None) -> dict[str, Any]:
    from analysis.history import list_runs

    runs = list_runs(root) if root.is_dir() else []
    job_list = jobs() if jobs else []
    newest = max((p.stat().st_mtime for p in root.rglob("result.json")), default=0.0) if root.is_dir() else 0.0
    fingerprint = json.dumps([[(r["folder"], r["points"], r["ok"]) for r in runs], newest,
                              [(j["id"], j["status"]) for j in job_list]])  # fmt: skip
    return {"version": hashlib.sha256(fingerprint.encode()).hexdigest()[:16], "runs": runs, "jobs": job_list}


def router(root: Path, jobs: Callable[[], list[dict[str, Any]]] | None = None) -> APIRouter:
    """The dashboard's routes over the outputs folder `root` (and a server's jobs)."""
    api = APIRouter(prefix=PREFIX)

    def static(name: str, media: str) -> Response:
        return Response((STATIC / name).read_bytes(), media_type=media, headers={"Cache-Control": "no-cache"})

    @api.get("", include_in_schema=False)
    @api.get("/", include_in_schema=False)
    async def page() -> Response:
        body = (STATIC / "index.html").read_bytes()
        return HTMLResponse(body, headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})

    @api.get("/assets/dashboard.js", include_in_schema=False)
    async def script() -> Response:
        return static("dashboard.js", "text/javascript")

    @api.get("/assets/dashboard.css", include_in_schema=False)
    async def style() -> Response:
        return static("dashboard.css", "text/css")

    @api.get("/assets/plotly.min.js", include_in_schema=False)
    async def plotly() -> Response:
        return FileResponse(plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @api.get("/api/state")
    async def current() -> JSONResponse:
        return JSONResponse(state(root, jobs))

    @api.get("/api/sweep")
    async def sweep(folder: str) -> JSONResponse:
        return JSONResponse(sweep_view(root, folder))

    @api.get("/api/compare")
    async def compare(a: str, b: str) -> JSONResponse:
        return JSONResponse(compare_view(root, a, b))

    @api.get("/files/{relative:path}", include_in_schema=False)
    async def files(relative: str) -> Response:
        target = _inside(root, relative)
        kind = FILE_TYPES.get(target.suffix)
        if not target.is_file() or kind is None:
            raise HTTPException(404, "not a file the dashboard shows")
        return FileResponse(target, media_type=kind, headers={"Content-Security-Policy": FILE_POLICY,
                                                              "X-Content-Type-Options": "nosniff"})  # fmt: skip

    return api


async def login(request: Request, token: str | None) -> Response:
    """POST /dashboard/login (form field `token`): the cookie, then the dashboard; the form again when wrong."""
    from urllib.parse import parse_qs

    given = parse_qs((await request.body()).decode("utf-8", "replace")).get("token", [""])[0]
    if token and not hmac.compare_digest(given.encode(), token.encode()):
        return HTMLResponse(login_page("That token is not this server's."), status_code=401)
    response = Response(status_code=303, headers={"Location": PREFIX + "/"})
    if token:
        response.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="strict", path=PREFIX)
    return response


def create_dashboard_app(root: Path, token: str | None) -> Any:
    """`harness dashboard <folder>`: the dashboard alone (read-only), behind the server's token gate."""
    from fastapi import FastAPI

    from harness.server.app import Gate
    from harness.server.metrics import ServerMetrics
    from harness.server.settings import ServerSettings

    app = FastAPI(title="harness dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router(root))

    @app.post(PREFIX + "/login", include_in_schema=False)
    async def sign_in(request: Request) -> Response:
        return await login(request, token)

    @app.get("/", include_in_schema=False)
    async def home() -> Response:
        return Response(status_code=307, headers={"Location": PREFIX + "/"})

    app.add_middleware(Gate, settings=ServerSettings(token=token or "", jobs_dir=str(root)), metrics=ServerMetrics())
    return app
