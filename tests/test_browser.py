"""A real run folder in headless Chromium, offline: the report ``index.html`` and an attention view render.

The run is made by the runner itself (``--only 01 --ci``) into a temporary folder. Chromium is
Debian's ``chromium`` (installed here with apt-get when missing and running as root; otherwise the
tests are skipped with the reason). It is driven over the Chrome DevTools protocol through
``--remote-debugging-pipe``: NUL-separated JSON on file descriptors 3 and 4, standard library only,
no websocket client and no driver download. That gives exact answers where scraping
``--enable-logging`` output would guess: uncaught exceptions and console errors of every frame
(the figures are iframes), each request made (any that is not ``file:``/``data:`` fails the test,
and the network is emulated offline besides), the DOM after scripts ran, and PNG screenshots,
decoded here (numpy) to check they are not blank.

``python tests/test_browser.py RUN_DIR OUT.png`` takes the README's screenshot of a run's report.
"""

from __future__ import annotations

import base64
import fcntl
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.notebook]
REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--hide-scrollbars", "--mute-audio",
         # nothing leaves the machine: every http(s) request goes to a closed local port
         "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


def find_chromium() -> str | None:
    """``BROWSER_PATH`` when set, else chromium / google-chrome on PATH."""
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def ensure_chromium() -> str:
    """Path of a Chromium; installs Debian's ``chromium`` when missing and root, else skips with the reason."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        reason = "no Chromium found and cannot install it (needs root and apt-get): apt-get install chromium"
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            reason = f"installing chromium failed ({' '.join(cmd)}): {done.stderr.strip()[-500:]}"
            print(f"SKIP: {reason}", file=sys.stderr)
            pytest.skip(reason)
    found = find_chromium()
    if not found:
        pytest.skip("apt-get installed chromium but no chromium is on PATH")
    return found


class Chromium:
    """A headless Chromium and one page, driven over the DevTools protocol on a pipe."""

    def __init__(self, executable: str, width: int = 1280, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="sinklens-chromium-")
        to_browser, self._commands = os.pipe()
        self._replies_fd, from_browser = os.pipe()

        def as_fds_3_and_4():  # the browser reads commands on fd 3 and writes on fd 4
            commands, replies = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser))
            os.dup2(commands, 3)
            os.dup2(replies, 4)

        self.stderr = open(os.path.join(self.profile, "stderr.log"), "wb")
        self.proc = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe"],
                                     preexec_fn=as_fds_3_and_4, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr)
        os.close(to_browser)
        os.close(from_browser)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)
        self.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                        "uploadThroughput": -1}, session=True)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                          "mobile": False}, session=True)

    def _read(self):
        buffer = b""
        while chunk := os.read(self._replies_fd, 1 << 20):
            *messages, buffer = (buffer + chunk).split(b"\0")
            with self._cv:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self._cv.notify_all()

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        self._next += 1
        ident = self._next
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        with self._cv:
            if not self._cv.wait_for(lambda: ident in self._replies, timeout):
                raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, path: Path, timeout: float = 60) -> None:
        """Navigate to a local file and wait for its load event."""
        with self._cv:
            self.events.clear()
        self.send("Page.navigate", {"url": path.resolve().as_uri()}, session=True)
        with self._cv:
            if not self._cv.wait_for(lambda: any(e["method"] == "Page.loadEventFired" for e in self.events), timeout):
                raise TimeoutError(f"{path} did not finish loading within {timeout} s")

    def evaluate(self, expression: str, context: int | None = None):
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context is not None:
            params["contextId"] = context
        result = self.send("Runtime.evaluate", params, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def frames(self) -> dict[str, int]:
        """``{frame url: id of its main JavaScript context}`` for every frame of the page."""
        contexts, frame_urls = {}, {}
        for event in list(self.events):
            if event["method"] == "Runtime.executionContextCreated":
                ctx = event["params"]["context"]
                if ctx.get("auxData", {}).get("isDefault"):
                    contexts[ctx["auxData"]["frameId"]] = ctx["id"]
            elif event["method"] == "Runtime.executionContextsCleared":
                contexts.clear()

        def walk(node):
            frame_urls[node["frame"]["id"]] = node["frame"]["url"]
            for child in node.get("childFrames", []):
                walk(child)
        walk(self.send("Page.getFrameTree", session=True)["frameTree"])
        return {url: contexts[fid] for fid, url in frame_urls.items() if fid in contexts}

    def wait_for(self, check, timeout: float = 90, interval: float = 0.5):
        """Poll ``check()`` until it returns something truthy; return its last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(interval)

    def screenshot(self, full_page: bool = False, scale: float = 1) -> bytes:
        params: dict = {"format": "png"}
        if full_page or scale != 1:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            width = self.evaluate("window.innerWidth")
            height = size[1] if full_page else self.evaluate("window.innerHeight")
            params |= {"clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": scale},
                       "captureBeyondViewport": full_page}
        return base64.b64decode(self.send("Page.captureScreenshot", params, session=True)["data"])

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors, error log entries and non-local requests seen so far."""
        found = []
        for event in list(self.events):
            method, params = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"uncaught: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                args = [a.get("value", a.get("description")) for a in params["args"]]
                found.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
            elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(LOCAL_SCHEMES):
                found.append(f"network request: {params['request']['url'][:200]}")
        return found

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        os.close(self._commands)
        shutil.rmtree(self.profile, ignore_errors=True)


def decode_png(data: bytes) -> np.ndarray:
    """8-bit RGB(A)/grey PNG (non-interlaced, as Chromium writes) to an array [height, width, channels]."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    depth, color, interlace = header[8], header[9], header[12]
    assert depth == 8 and interlace == 0 and color in (0, 2, 4, 6), f"unsupported PNG: depth {depth}, type {color}"
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prior = np.zeros(stride, np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: running sum per channel
            row = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            row = (line + prior) % 256
        else:  # Average, Paeth: sequential along the row
            row, prev, up = [0] * stride, prior.tolist(), line.tolist()
            for x in range(stride):
                left = row[x - bpp] if x >= bpp else 0
                if kind == 3:
                    row[x] = (up[x] + (left + prev[x]) // 2) % 256
                else:
                    upper_left = prev[x - bpp] if x >= bpp else 0
                    p = left + prev[x] - upper_left
                    pa, pb, pc = abs(p - left), abs(p - prev[x]), abs(p - upper_left)
                    pred = left if pa <= pb and pa <= pc else prev[x] if pb <= pc else upper_left
                    row[x] = (up[x] + pred) % 256
            row = np.array(row, np.int32)
        out[y] = row
        prior = row
    return out.reshape(height, width, bpp)


def ink(png: bytes) -> tuple[float, int]:
    """Share of pixels that are not near-white, and the number of distinct colours (on a 4-bit grid)."""
    image = decode_png(png)[..., :3].astype(np.int32)
    share = float((image.min(-1) < 235).mean())
    quantized = image >> 4
    colours = len(np.unique(quantized[..., 0] << 8 | quantized[..., 1] << 4 | quantized[..., 2]))
    return share, colours


# --- the tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium_path():
    return ensure_chromium()


@pytest.fixture(scope="module")
def ci_run(chromium_path, tmp_path_factory):
    """A real run folder: the runner with --ci on notebook 01 (its report written by the runner)."""
    from sinklens.__main__ import main

    out = tmp_path_factory.mktemp("browser-runs")
    start = time.perf_counter()
    code = main(["run", "--only", "01", "--ci", "--out", str(out), "--notebooks", str(REPO / "notebooks")])
    assert code == 0
    print(f"runner --only 01 --ci: {time.perf_counter() - start:.0f} s")
    return (out / "latest").resolve()


@pytest.fixture
def browser(chromium_path):
    chromium = Chromium(chromium_path)
    yield chromium
    chromium.close()


_FRAME_STATE = """(() => {
  const plotly = document.querySelector('.plotly-graph-div');
  const views = [...document.querySelectorAll('div[id^="circuits-vis-"]')];
  return {ready: document.readyState,
          plotly: !!plotly && !!plotly.querySelector('.main-svg') && typeof Plotly === 'object',
          views: views.length, rendered: views.filter(v => v.querySelector('svg, canvas, table, span')).length};
})()"""


def open_report(browser: Chromium, run_dir: Path, timeout: float = 120) -> dict[str, dict] | None:
    """Open a run's index.html, load every (lazy) figure iframe and wait until each has drawn; return
    ``{figure file: its state}``, or None when they did not all render in time."""
    expected = len(list((run_dir / "figures").glob("*.html")))
    browser.open(run_dir / "index.html")
    browser.evaluate("document.querySelectorAll('iframe').forEach(f => { f.loading = 'eager'; })")

    def states():
        frames = {url: ctx for url, ctx in browser.frames().items() if "/figures/" in url}
        if len(frames) < expected:
            return None
        found = {url.rsplit("/", 1)[-1]: browser.evaluate(_FRAME_STATE, ctx) for url, ctx in frames.items()}
        done = all(s["ready"] == "complete" and (s["plotly"] or (s["views"] and s["rendered"] == s["views"]))
                   for s in found.values())
        return found if done else None
    return browser.wait_for(states, timeout=timeout)


def test_report_renders_offline(ci_run, browser, tmp_path):
    figures = sorted((ci_run / "figures").glob("*.html"))
    assert (ci_run / "index.html").is_file() and figures
    found = open_report(browser, ci_run)
    assert found, f"figures did not all render: {browser.frames()} {browser.problems()}"
    assert set(found) == {f.name for f in figures}
    assert sum(s["views"] > 0 for s in found.values()) >= 1  # the attention view is among them
    assert browser.problems() == []

    dom = browser.evaluate("document.documentElement.outerHTML")
    assert '<span class="status ok">ok</span>' in dom and "01 Sink discovery" in dom
    assert dom.count("<iframe") == len(figures)
    assert 'href="01_sink_discovery.ipynb"' in dom and 'href="tables/census.csv"' in dom
    # the findings, written from this run's own summary, and the labelled headline numbers are on the page
    summary = json.loads((ci_run / "sink_discovery.json").read_text())
    findings = browser.evaluate("[...document.querySelectorAll('ul.findings li')].map(li => li.textContent)")
    assert findings and findings[0].startswith(f"Sink^{summary['eps']:g} = {summary['sink_rate_pct']:.1f} % of the "
                                               f"{summary['n_heads']} heads"), findings
    strongest = summary["strongest_head"]
    assert f"the strongest sink head is L{strongest['layer']}H{strongest['head']}" in findings[0]
    labels = browser.evaluate("[...document.querySelectorAll('#headline ~ .cards th')].map(th => th.textContent)")
    assert "sink rate Sink^eps: heads with alpha_0 > eps" in labels and "sink_rate_pct" not in labels, labels
    captions = browser.evaluate("[...document.querySelectorAll('p.caption')].map(p => p.textContent)")
    assert len(captions) == len(figures), captions  # every figure of notebook 01 says what to look at
    share, colours = screenshot_ink(browser, tmp_path / "index.png")
    assert share > 0.03 and colours > 20


def screenshot_ink(browser, path: Path) -> tuple[float, int]:
    """Save a screenshot of the open page and return its share of non-white pixels and its colour count."""
    png = browser.screenshot()
    path.write_bytes(png)
    share, colours = ink(png)
    print(f"{path.stem} screenshot: {share:.1%} ink, {colours} colours ({path})")
    return share, colours


def test_attention_view_renders_offline(ci_run, browser, tmp_path):
    view = ci_run / "figures" / "attention_strongest_head.html"
    browser.open(view)
    state = browser.wait_for(lambda: (s := browser.evaluate(_FRAME_STATE))["rendered"] and s, timeout=60)
    assert state and state["views"] == 1 and state["rendered"] == 1, state
    assert browser.problems() == []
    dom = browser.evaluate("document.documentElement.outerHTML")
    assert "<svg" in dom or "<canvas" in dom
    share, colours = screenshot_ink(browser, tmp_path / "view.png")
    assert share > 0.03 and colours > 20


def test_pngs_of_the_plotly_figures(ci_run):
    """The runner's report step exported every plotly figure at twice its layout size (kaleido + Chromium)."""
    from sinklens.series import outputs, pngs

    plotly = [f for f in sorted((ci_run / "figures").glob("*.html")) if outputs.classify_figure(f).kind == "plotly"]
    assert plotly
    try:
        import kaleido  # noqa: F401
    except ImportError:
        assert html.escape(pngs.NO_KALEIDO) in (ci_run / "index.html").read_text()
        return
    assert f"PNGs: {len(plotly)} written" in (ci_run / "index.html").read_text()
    for figure in plotly:
        png = figure.with_suffix(".png").read_bytes()
        layout = pngs.plotly_spec(figure)["layout"]
        size = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert size == (2 * (layout.get("width") or 700), 2 * (layout.get("height") or 500)), figure.name
    share, colours = ink(plotly[0].with_suffix(".png").read_bytes())
    assert share > 0.02 and colours > 10


def test_a_remote_script_is_caught(chromium_path, browser, tmp_path):
    """The checks above can fail: a page that loads a CDN script is reported."""
    page = tmp_path / "cdn.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><script src="https://cdn.example.org/x.js"></script>'
                    "<script>missingFunction()</script></body></html>")
    browser.open(page)
    problems = " ".join(browser.problems())
    assert "network request: https://cdn.example.org/x.js" in problems and "missingFunction" in problems
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    browser.open(blank)
    assert ink(browser.screenshot())[0] < 0.001


# --- the cross-model report of three real runs, made as Ray tasks -----------------------------------------------

@pytest.fixture(scope="module")
def models_run(chromium_path, tmp_path_factory):
    """``run --models`` of the embedded model and two tiny random families (Qwen2, GPT-NeoX) with ``--ray`` (a new
    local cluster), notebooks 01 and 02 with --ci: three run folders and their comparison."""
    from sinklens.__main__ import main

    from helpers import build_family_checkpoint

    root = tmp_path_factory.mktemp("browser-models")
    tiny = [str(build_family_checkpoint(root / family, family, n_layers=4, max_positions=256))
            for family in ("qwen2", "gpt_neox")]
    out = root / "runs"
    start = time.perf_counter()
    code = main(["run", "--models", "smollm2-135m", *tiny, "--only", "01", "02", "--ci", "--ray", "--out", str(out),
                 "--notebooks", str(REPO / "notebooks")])
    print(f"run --models (3) --only 01 02 --ci --ray: {time.perf_counter() - start:.0f} s")
    assert code == 0
    (report,) = out.glob("*-compare/index.html")
    return report, sorted(p for p in out.iterdir() if p.is_dir() and not p.name.endswith("-compare")
                          and not p.is_symlink())


_COMPARE_STATE = """(() => {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  return {ready: document.readyState, plotly: typeof Plotly === 'object', figures: divs.length,
          drawn: divs.filter(d => d.querySelector('.main-svg')).length,
          lines: divs.map(d => (d.data || []).length),
          rows: [...document.querySelectorAll('#summary tr')].slice(1).map(
            tr => [...tr.querySelectorAll('td')].map(td => td.textContent))};
})()"""


def test_cross_model_report_renders_offline(models_run, browser, tmp_path):
    report, runs = models_run
    assert len(runs) == 3
    browser.open(report)
    state = browser.wait_for(lambda: (lambda s: s if s["ready"] == "complete" and s["figures"] and
                                      s["drawn"] == s["figures"] else None)(browser.evaluate(_COMPARE_STATE)))
    assert state, browser.problems()
    assert browser.problems() == []
    assert state["figures"] == 4 and state["lines"][0] == 3  # sink rate by relative depth: one line per model
    # the table: one row per model, its sink rate and share of sink-specialized heads as its run folder wrote them
    rows = {row[0]: row for row in state["rows"]}
    assert set(rows) == {"smollm2-135m", "qwen2", "gpt_neox"}
    for run in runs:
        discovery = json.loads((run / "sink_discovery.json").read_text())
        heads = json.loads((run / "specialized_heads.json").read_text())
        row = rows[json.loads((run / "manifest.json").read_text())["model"].rstrip("/").rsplit("/", 1)[-1]]
        rate = discovery["sink_rate_pct"]
        assert row[5] == (f"{rate:.3g}" if abs(rate) < 1 else f"{rate:.1f}"), row
        share = heads["n_specialized"] / heads["n_heads"]
        assert row[6] == (f"{share:.3g}" if abs(share) < 1 else f"{share:.1f}"), row
    print("compared:", {model: (row[5], row[6], row[7]) for model, row in rows.items()})
    share, colours = screenshot_ink(browser, tmp_path / "compare.png")
    assert share > 0.03 and colours > 20


def screenshot_report(run_dir: Path, out: Path, height: int = 1700, scale: float = 0.6) -> None:
    """Save a screenshot of the top ``height`` pixels of a run's report, figures drawn, to ``out``."""
    chromium = Chromium(ensure_chromium(), width=1280, height=height)
    try:
        if not open_report(chromium, run_dir):
            raise RuntimeError(f"the figures of {run_dir / 'index.html'} did not all render: {chromium.problems()}")
        out.write_bytes(chromium.screenshot(scale=scale))
    finally:
        chromium.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/test_browser.py RUN_DIR OUT.png")
    screenshot_report(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
