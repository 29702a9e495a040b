"""supra.dashboard and `supra dashboard`: robust reading of a metrics.jsonl being written, the self-refreshing
dashboard.html in headless Chromium (shows new steps within one refresh, keeps scroll, no network), and the CLI
following a run trained by another process."""
import json, math, os, subprocess, sys, time
from pathlib import Path

import pytest
from supra.dashboard import (DashboardWriter, RunLog, _LOGS, downsample, is_done, mark_done, render_dashboard,
                             write_dashboard)
try: from tests.browser import Page, foreign_requests
except ImportError:
    sys.path.insert(0, str(Path(__file__).parent)); from browser import Page, foreign_requests

ROOT = Path(__file__).resolve().parents[1]


def append(run, start, stop, evals=()):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / 'metrics.jsonl', 'a') as f:
        for s in range(start, stop + 1):
            f.write(json.dumps(dict(step=s, epoch=s / 100, tokens=s * 1024, loss=3 + 5 * math.exp(-s / 40), lr=1e-3,
                                    grad_norm=1.0, tok_s=1e4, elapsed=s * 0.1)) + '\n')
            if s in evals: f.write(json.dumps(dict(step=s, eval=dict(heldout_loss=4.0, bpb=1.8))) + '\n')


def fresh(run):
    _LOGS.pop(str(Path(run).resolve()), None)
    return run


# ---------------------------------------------------------------- robustness (no browser)

@pytest.mark.parametrize('content', [None, '', '\n', '{"step": 3, "lo', 'null\n[]\n"x"\n{bad json}\n', '\x00\xff garbage'])
def test_page_never_breaks(tmp_path, content):
    run = fresh(tmp_path / 'run'); run.mkdir()
    if content is not None: (run / 'metrics.jsonl').write_bytes(content.encode('utf-8', 'surrogateescape') if isinstance(content, str) else content)
    html = write_dashboard(run).read_text()
    assert 'id="cur-step"' in html and 'st-waiting' in html and html.rstrip().endswith('</html>')


def test_half_written_line_and_restart(tmp_path):
    run = tmp_path / 'run'; append(run, 1, 5)
    log = RunLog(run)
    with open(run / 'metrics.jsonl', 'a') as f: f.write('{"step": 6, "loss": 2.')
    assert log.poll() == 5 and log.last[0]['step'] == 5
    with open(run / 'metrics.jsonl', 'a') as f: f.write('5}\n')
    assert log.poll() == 1 and log.last[0]['loss'] == 2.5
    (run / 'metrics.jsonl').write_text(json.dumps(dict(step=1, loss=9.0)) + '\n')   # run restarted from scratch: file shrank
    log.poll()
    assert log.nrows == 1 and log.last[0]['loss'] == 9.0


def test_escapes_everything_from_the_log(tmp_path):
    run = fresh(tmp_path / 'r')
    append(run, 1, 3)
    with open(run / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'step': 4, 'loss': 1.0, 'branch': '<script>alert(1)</script>', 'phase': '<img src=x onerror=alert(2)>'}) + '\n')
        f.write(json.dumps({'step': 4, 'eval': {'<b>metric</b>': 1.0}}) + '\n')
    (run / 'run.json').write_text(json.dumps({'name': '</title><script>alert(3)</script>'}))
    html = write_dashboard(run).read_text()
    assert 'alert(' not in html.replace('&lt;script&gt;alert(1)', '').replace('onerror=alert(2)', '').replace('&lt;script&gt;alert(3)', '')
    assert '<b>metric' not in html and '<img src=x' not in html and html.count('<script>') == 1   # only the reload script


def test_long_run_is_downsampled_and_keeps_spikes(tmp_path):
    run = fresh(tmp_path / 'long'); run.mkdir()
    with open(run / 'metrics.jsonl', 'w') as f:
        for s in range(1, 30_001):
            f.write(f'{{"step": {s}, "loss": {99.0 if s == 12_345 else 3.0}, "lr": 0.001, "grad_norm": 1.0, "tok_s": 1000.0}}\n')
    html = write_dashboard(run, points=300).read_text()
    assert len(html) < 300_000                        # a few hundred buckets per chart, not 30k points
    assert 'loss 3' in html
    x, y, lo, hi = downsample(range(30_000), [99.0 if i == 12_344 else 3.0 for i in range(30_000)], 300)
    assert hi.max() == 99.0 and len(x) == 300


def test_writer_is_rate_limited_and_marks_done(tmp_path):
    run = fresh(tmp_path / 'w'); append(run, 1, 10)
    w = DashboardWriter(run, every_s=3600)
    assert [w(step=i) is not None for i in range(50)].count(True) == 1
    append(run, 11, 20)
    w.close(done=True)
    assert is_done(run)
    html = (run / 'dashboard.html').read_text()
    assert 'data-step="20"' in html and 'location.reload' not in html and 'st-done' in html


def test_eta_needs_total_steps(tmp_path):
    run = fresh(tmp_path / 'eta'); append(run, 1, 50)
    assert 'id="eta"' not in render_dashboard(run)
    (run / 'run.json').write_text(json.dumps({'total_steps': 150}))
    html = render_dashboard(run)
    assert 'id="eta"' in html and '>10.0s<' in html   # 100 steps left x 0.1 s/step


# ---------------------------------------------------------------- in the browser

def test_page_follows_the_run_in_chromium(tmp_path):
    run = fresh(tmp_path / 'live'); append(run, 1, 50, evals=(25,))
    (run / 'run.json').write_text(json.dumps({'name': 'browser test', 'total_steps': 200}))
    refresh = 1.0
    path = write_dashboard(run, refresh_s=refresh)
    with Page(width=1200, height=400) as page:
        page.goto(path.as_uri())
        assert page.eval('document.getElementById("cur-step").dataset.step') == '50'
        n_svg = page.eval('[...document.querySelectorAll("svg.chart")].filter(s => s.getBoundingClientRect().width > 100).length')
        assert n_svg >= 5
        assert page.eval('document.querySelectorAll("#p-loss circle").length') == 1   # the held-out point
        y0 = page.eval('window.scrollTo(0, 250); window.scrollY')
        assert y0 > 100
        append(run, 51, 80, evals=(75,)); write_dashboard(run, refresh_s=refresh)     # the writer's side
        t0, step = time.monotonic(), None
        while time.monotonic() - t0 < refresh + 4:                                    # one refresh (+ load slack)
            page.pump(0.2)
            try: step = page.eval('document.getElementById("cur-step") && document.getElementById("cur-step").dataset.step')
            except RuntimeError: continue                                             # mid-navigation
            if step == '80': break
        assert step == '80'
        assert page.eval('document.querySelectorAll("#p-loss circle").length') == 2
        assert abs(page.eval('window.scrollY') - y0) < 2                              # scroll position kept across reloads
        mark_done(run); write_dashboard(run, refresh_s=refresh)
        page.pump(refresh + 1.5)                                                       # one last reload picks up 'done' ...
        loads = sum(e['method'] == 'Page.loadEventFired' for e in page.events)
        page.pump(2 * refresh + 0.5)                                                   # ... then the page stops reloading
        assert sum(e['method'] == 'Page.loadEventFired' for e in page.events) == loads
        assert page.eval('document.getElementById("status").textContent') == 'done'
    assert foreign_requests(page.requests) == [], page.requests


# ---------------------------------------------------------------- the console script

def _supra():
    exe = Path(sys.executable).with_name('supra')
    return [str(exe)] if exe.exists() else [sys.executable, '-m', 'supra.cli']


def test_cli_rejects_what_is_not_a_run(tmp_path):
    r = subprocess.run([*_supra(), 'dashboard', str(tmp_path / 'missing')], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'does not exist' in r.stderr
    append(tmp_path / 'exp' / 'seed0', 1, 3)
    r = subprocess.run([*_supra(), 'dashboard', str(tmp_path / 'exp')], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'no metrics.jsonl' in r.stderr and 'seed0' in r.stderr


def test_cli_follows_a_run_in_another_process_until_done(tmp_path):
    run = tmp_path / 'run'; append(run, 1, 5)
    proc = subprocess.Popen([*_supra(), 'dashboard', str(run), '--every', '0.2', '--timeout', '60'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not (run / 'dashboard.html').exists() and time.monotonic() < deadline: time.sleep(0.05)
        for k in range(1, 6):                       # "the trainer" keeps logging
            append(run, 5 * k + 1, 5 * k + 5); time.sleep(0.15)
        deadline = time.monotonic() + 30
        while 'data-step="30"' not in (run / 'dashboard.html').read_text() and time.monotonic() < deadline: time.sleep(0.1)
        assert 'data-step="30"' in (run / 'dashboard.html').read_text()
        assert proc.poll() is None                  # still following
        mark_done(run)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 0, err
    assert (run / 'dashboard.html').as_uri() in out and 'done' in out
    assert 'location.reload' not in (run / 'dashboard.html').read_text()


def test_cli_once(tmp_path):
    run = tmp_path / 'r'; append(run, 1, 7)
    r = subprocess.run([*_supra(), 'dashboard', str(run), '--once'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and 'file://' in r.stdout
    assert 'data-step="7"' in (run / 'dashboard.html').read_text()


def test_trainers_final_checkpoint_means_done(tmp_path):
    run = tmp_path / 'stable'; append(run, 1, 3)
    assert not is_done(run)
    (run / 'final').mkdir(); (run / 'final' / 'meta.json').write_text('{}')   # what supra.train writes at the end
    assert is_done(run)
