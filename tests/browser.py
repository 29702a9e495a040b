"""Headless Chromium for tests: find (or once install) Chromium, dump DOMs, take screenshots, and drive a page
over the Chrome DevTools Protocol (CDP) to evaluate JavaScript and record every network request it makes.

    from tests.browser import require_chromium, Page
    with Page() as page:                      # skips the test (with the reason) where Chromium can't be had
        page.goto(path.as_uri())
        page.eval('document.querySelectorAll("table").length')
        page.requests                         # URLs the page asked for (Network.requestWillBeSent)
"""
from __future__ import annotations
import json, os, shutil, signal, subprocess, tempfile, time, urllib.request
from pathlib import Path

CANDIDATES = ('/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome', '/usr/bin/google-chrome-stable')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-default-apps', '--disable-extensions',
         '--hide-scrollbars', '--mute-audio', '--disable-dev-shm-usage']
_install_tried = False


def find_chromium(install: bool = True) -> str | None:
    "Path of a Chromium binary; when missing and running as root, try `apt-get install -y chromium` once."
    global _install_tried
    for c in (*CANDIDATES, shutil.which('chromium'), shutil.which('chromium-browser')):
        if c and os.path.exists(c): return c
    if install and not _install_tried and hasattr(os, 'geteuid') and os.geteuid() == 0 and shutil.which('apt-get'):
        _install_tried = True
        env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
        try:
            subprocess.run(['apt-get', 'update', '-q'], env=env, capture_output=True, timeout=300)
            subprocess.run(['apt-get', 'install', '-y', '-q', 'chromium'], env=env, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired): pass
        return find_chromium(install=False)
    return None


def require_chromium() -> str:
    "The Chromium path, or skip the calling test with the reason."
    import pytest
    c = find_chromium()
    if c is None:
        why = 'not root' if hasattr(os, 'geteuid') and os.geteuid() != 0 else 'apt-get install -y chromium failed or apt-get is missing'
        pytest.skip(f'headless Chromium is not installed ({", ".join(CANDIDATES)}) and could not be installed: {why}')
    return c


def _run(args, timeout=60):
    # Chromium's helper processes can outlive the browser for a moment and still write into the profile
    with tempfile.TemporaryDirectory(prefix='supra-chrome-', ignore_cleanup_errors=True) as prof:
        r = subprocess.run([require_chromium(), *FLAGS, f'--user-data-dir={prof}', *args], capture_output=True, timeout=timeout)
    return r


def dump_dom(url: str, budget_ms: int = 2000, timeout: float = 60) -> str:
    "The DOM of `url` after its scripts ran (`--dump-dom`, with a virtual time budget)."
    r = _run([f'--virtual-time-budget={budget_ms}', '--dump-dom', url], timeout)
    return r.stdout.decode('utf-8', 'replace')


def screenshot(url: str, out, size=(1280, 2400), budget_ms: int = 2000, timeout: float = 60) -> Path:
    "A PNG screenshot of `url` at `size` (width, height)."
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([f'--window-size={size[0]},{size[1]}', f'--virtual-time-budget={budget_ms}', f'--screenshot={out}', url], timeout)
    if not out.exists(): raise RuntimeError(f'Chromium wrote no screenshot for {url}')
    return out


class Page:
    "One headless Chromium tab driven over CDP (websocket-client). Records every request the page makes."

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 30):
        self.width, self.height, self.timeout = width, height, timeout
        self.requests: list[str] = []
        self.events: list[dict] = []
        self._id = 0

    def __enter__(self):
        import websocket
        exe = require_chromium()
        self._prof = tempfile.TemporaryDirectory(prefix='supra-cdp-', ignore_cleanup_errors=True)
        self.proc = subprocess.Popen([exe, *FLAGS, f'--user-data-dir={self._prof.name}', '--remote-debugging-port=0',
                                      '--remote-allow-origins=*', f'--window-size={self.width},{self.height}', 'about:blank'],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self._prof.name) / 'DevToolsActivePort'
        t0 = time.monotonic()
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() - t0 > self.timeout or self.proc.poll() is not None:
                self.__exit__(None, None, None); raise RuntimeError('Chromium did not open its DevTools port')
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        while True:   # the page target appears shortly after the port file
            targets = json.load(urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=5))
            pages = [t for t in targets if t.get('type') == 'page']
            if pages: break
            if time.monotonic() - t0 > self.timeout: raise RuntimeError('Chromium opened no page target')
            time.sleep(0.05)
        self.ws = websocket.create_connection(pages[0]['webSocketDebuggerUrl'], timeout=self.timeout, suppress_origin=True)
        self.send('Network.enable'); self.send('Page.enable'); self.send('Runtime.enable')
        return self

    def __exit__(self, *exc):
        try: self.ws.close()
        except Exception: pass
        if getattr(self, 'proc', None) is not None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
            try: os.killpg(self.proc.pid, signal.SIGKILL)   # helper processes (renderer, GPU, crashpad) of the session
            except (ProcessLookupError, PermissionError): pass
        self._prof.cleanup()

    def _recv(self, timeout):
        self.ws.settimeout(timeout)
        msg = json.loads(self.ws.recv())
        if msg.get('method') == 'Network.requestWillBeSent': self.requests.append(msg['params']['request']['url'])
        if 'method' in msg: self.events.append(msg)
        return msg

    def send(self, method: str, **params):
        "Send a CDP command and return its result (events that arrive meanwhile are recorded)."
        self._id += 1; mid = self._id
        self.ws.send(json.dumps(dict(id=mid, method=method, params=params)))
        t0 = time.monotonic()
        while True:
            msg = self._recv(max(0.1, self.timeout - (time.monotonic() - t0)))
            if msg.get('id') == mid:
                if 'error' in msg: raise RuntimeError(f'{method}: {msg["error"]}')
                return msg.get('result', {})

    def wait_event(self, method: str, timeout: float | None = None, since: int = 0) -> dict:
        "Wait for the next CDP event `method` (or one already recorded after index `since`)."
        for ev in self.events[since:]:
            if ev['method'] == method: return ev
        t0, timeout = time.monotonic(), timeout or self.timeout
        while time.monotonic() - t0 < timeout:
            try: msg = self._recv(max(0.05, timeout - (time.monotonic() - t0)))
            except Exception: break
            if msg.get('method') == method: return msg
        raise TimeoutError(f'no {method} within {timeout}s')

    def goto(self, url: str, timeout: float | None = None):
        "Navigate and wait for the load event."
        n = len(self.events)
        self.send('Page.navigate', url=url)
        self.wait_event('Page.loadEventFired', timeout, since=n)

    def eval(self, js: str):
        "Evaluate a JavaScript expression in the page; return its JSON value."
        r = self.send('Runtime.evaluate', expression=js, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in r: raise RuntimeError(f'JS error in {js!r}: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def wait_for(self, js: str, timeout: float, every: float = 0.5, what: str | None = None):
        """Evaluate `js` every `every` seconds until it returns a truthy value, and return that value; past `timeout`,
        TimeoutError naming `what` (or the expression) and the last value it returned."""
        t0, last = time.monotonic(), None
        while True:
            last = self.eval(js)
            if last: return last
            if time.monotonic() - t0 > timeout: raise TimeoutError(f'{what or js!r} not true within {timeout:g}s (last value: {last!r})')
            self.pump(every)

    def pump(self, seconds: float):
        "Keep recording events for `seconds` (lets timers and reloads happen)."
        t0 = time.monotonic()
        while (left := seconds - (time.monotonic() - t0)) > 0:
            try: self._recv(left)
            except Exception: pass

    def screenshot(self, out) -> Path:
        "A PNG of the full page."
        import base64
        h = int(self.eval('document.documentElement.scrollHeight') or self.height)
        self.send('Emulation.setDeviceMetricsOverride', width=self.width, height=h, deviceScaleFactor=1, mobile=False)
        data = self.send('Page.captureScreenshot', format='png', captureBeyondViewport=True)['data']
        self.send('Emulation.clearDeviceMetricsOverride')
        out = Path(out); out.parent.mkdir(parents=True, exist_ok=True); out.write_bytes(base64.b64decode(data))
        return out


def foreign_requests(urls) -> list[str]:
    "The requested URLs that are not local (file:, data:, about:, blob:, chrome-error is not local either)."
    return [u for u in urls if not u.split(':', 1)[0] in ('file', 'data', 'about', 'blob')]
