"""supra.dashboard.live and `supra dashboard`: robust reading of a metrics.jsonl being written, the self-refreshing
dashboard.html in headless Chromium (shows new steps within one refresh, keeps scroll, no network), and the CLI
following a run trained by another process."""
import json, math, os, subprocess, sys, time
from pathlib import Path

import pytest
from supra.dashboard.live import DashboardThread, DashboardWriter, _LOGS, render_dashboard, write_dashboard
from supra.train.runlog import DONE_QUIET_S, RunLog, is_branched, is_done, mark_done
from supra.pages.svg import downsample
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


def test_hostile_log_is_inert_in_chromium(tmp_path):
    "Strings from the log and run.json (branch, phase, metric names, the run's name) show as text and run nothing."
    run = fresh(tmp_path / 'r'); append(run, 1, 3, evals=(2,))
    hostile = '<img src=x onerror="window.__pwned=1">'
    with open(run / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'step': 4, 'loss': 1.0, 'phase': hostile, hostile: 2.0}) + '\n')
        f.write(json.dumps({'step': 4, 'eval': {'<script>window.__pwned=2</script>': 1.0}}) + '\n')
    (run / 'run.json').write_text(json.dumps({'name': '<script>window.__pwned=3</script>'}))
    path = write_dashboard(run)
    from supra.pages.html import stylesheet
    assert stylesheet('dash').strip()[:60] in path.read_text()          # the one shared stylesheet, inline
    with Page(width=1200, height=800) as page:
        page.goto(path.as_uri())
        assert page.eval('typeof window.__pwned') == 'undefined'
        assert page.eval('document.querySelector(".supra-dash h1").textContent').startswith('<script>window.__pwned=3</script>')
        assert page.eval('document.querySelectorAll(".supra-dash img").length') == 0
    assert foreign_requests(page.requests) == [], page.requests


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
        saved = "JSON.parse(sessionStorage.getItem('supra-dash:' + location.pathname) || '{}').y"
        t0, y0, kept = time.monotonic(), None, None
        while time.monotonic() - t0 < 10:   # the reader scrolls; the page keeps the position at once (a reload under way can swallow a scroll: scroll again)
            try:
                y0 = page.eval('window.scrollTo(0, 250); window.scrollY'); page.pump(0.2); kept = page.eval(saved)
                if kept == y0: break
            except RuntimeError: continue                                             # mid-navigation
        assert y0 > 100 and kept == y0, (y0, kept)
        append(run, 51, 80, evals=(75,)); write_dashboard(run, refresh_s=refresh)     # the writer's side
        t0, step = time.monotonic(), None
        while time.monotonic() - t0 < refresh + 4:                                    # one refresh (+ load slack)
            page.pump(0.2)
            try: step = page.eval('document.getElementById("cur-step") && document.getElementById("cur-step").dataset.step')
            except RuntimeError: continue                                             # mid-navigation
            if step == '80': break
        assert step == '80'
        assert page.eval('document.querySelectorAll("#p-loss circle").length') == 2
        t0, y = time.monotonic(), None                                               # scroll position kept across reloads: the page restores
        while time.monotonic() - t0 < 3:                                              # it once loaded, which a busy machine may delay a little
            y = page.eval('window.scrollY')
            if abs(y - y0) < 2: break
            page.pump(0.1)
        assert abs(y - y0) < 2, (y, y0)
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
    (run / 'final').mkdir(); (run / 'final' / 'meta.json').write_text('{}')   # what supra.train.trainer writes at the end
    assert is_done(run)


# ---------------------------------------------------------------- a branched run (supra.train.trainer.train_epochs' out_dir)

def branched(out, epochs=2, spe=40, frac=0.25, upto=None, start=0, run_json=True):
    """Synthetic train_epochs layout: stable/metrics.jsonl and epochs<k>/metrics.jsonl (steps continuing from the branch
    point), epochs<k>/final/meta.json when a branch ends. Writes the steps number `start`..`upto` in training order."""
    out = Path(out); plan = [(k, k * spe - round(frac * k * spe), round(frac * k * spe)) for k in range(1, epochs + 1)]
    if run_json:
        (out).mkdir(parents=True, exist_ok=True)
        (out / 'run.json').write_text(json.dumps(dict(name='branched', epochs=epochs, steps_per_epoch=spe,
                                      total_steps=plan[-1][1] + sum(d for *_, d in plan),
                                      branches=[dict(dir=f'epochs{k}', epochs=k, branch_step=b, end_step=k * spe) for k, b, _ in plan])))
    n, s0 = 0, 0
    def rows(d, steps, phase, lr):
        nonlocal n
        d.mkdir(parents=True, exist_ok=True)
        with open(d / 'metrics.jsonl', 'a') as f:
            for st in steps:
                if upto is not None and n >= upto: return False
                if n >= start: f.write(json.dumps(dict(step=st, epoch=st / spe, tokens=st * 512, loss=3 + 5 * math.exp(-st / 30),
                                                       lr=lr(st), grad_norm=1.0, tok_s=5e3, elapsed=st * 0.2, phase=phase)) + '\n')
                n += 1
        return True
    for k, b, d in plan:
        if not rows(out / 'stable', range(s0 + 1, b + 1), 'stable', lambda st: 1e-3): return out
        s0 = b
        if not rows(out / f'epochs{k}', range(b + 1, k * spe + 1), f'cooldown{k}', lambda st: 1e-3 * (k * spe - st + 1) / d): return out
        (out / f'epochs{k}' / 'final').mkdir(exist_ok=True)
        (out / f'epochs{k}' / 'final' / 'meta.json').write_text(json.dumps(dict(step=k * spe, schedule=dict(total=k * spe, cooldown=d))))
    return out


def test_branched_run_is_one_page_with_every_branch(tmp_path):
    # spe=40, 2 epochs: stable 1..30, epochs1 31..40, stable 31..60, epochs2 61..80; total 60 + 10 + 20 = 90 steps
    run = fresh(branched(tmp_path / 'ep', upto=30 + 10 + 30 + 5))           # 5 steps into the 2-epoch cooldown
    log = RunLog(run); log.poll()
    assert list(log.subs) == ['stable', 'epochs1', 'epochs2'] and set(log.branches) == {'stable', 'epochs1', 'epochs2'}
    assert log.last[0]['step'] == 65 and log.active().branch == 'epochs2'
    html = write_dashboard(run).read_text()
    assert (run / 'dashboard.html').exists() and not (run / 'stable' / 'dashboard.html').exists()
    for name, st in (('stable', 'paused'), ('epochs1', 'done'), ('epochs2', 'running')):
        assert f'id="br-{name}" data-status="{st}"' in html
    assert 'data-step="65"' in html and 'cooldown2' in html and 'st-running' in html and 'location.reload' in html
    assert 'data-value="75.0"' in html and '/ 90 steps' in html            # progress 60 + 10 + 5 of 90
    assert 'id="eta"' in html and '>3.0s<' in html                         # 15 steps left x 0.2 s/step
    lr = html[html.index('id="p-lr"'):]; lr = lr[:lr.index('</svg>')]
    assert lr.count('<polyline') == 3 and all(f'>{b}</text>' in lr for b in ('stable', 'epochs1', 'epochs2'))
    # incremental: a new line in one branch is read by that branch's reader only
    offsets = {k: s.offset for k, s in log.subs.items()}
    branched(run, upto=30 + 10 + 30 + 8, start=30 + 10 + 30 + 5)
    assert log.poll() == 3 and log.subs['stable'].offset == offsets['stable'] and log.last[0]['step'] == 68
    assert log.subs['epochs2'].offset == (run / 'epochs2' / 'metrics.jsonl').stat().st_size
    # evaluation lines appended later to a finished branch show, without making it the "current" branch
    with open(run / 'epochs1' / 'metrics.jsonl', 'a') as f: f.write(json.dumps(dict(step=40, eval=dict(heldout_loss=3.5, bpb=1.4))) + '\n')
    html = write_dashboard(run).read_text()
    assert 'id="p-bpb"' in html and 'epochs1 <span>@ 40</span>' in html and 'data-step="68"' in html


def test_branched_done_detection(tmp_path):
    run = fresh(branched(tmp_path / 'ep', upto=30 + 10 + 30 + 19))          # one step short of the end
    assert not is_done(run)
    branched(run, start=30 + 10 + 30 + 19)                                   # the last step, and epochs2/final/meta.json
    assert is_done(run)
    html = write_dashboard(run).read_text()
    assert 'st-done' in html and 'location.reload' not in html and 'id="eta"' not in html
    assert html.count('data-status="done"') == 3
    # run.json expects 3 branches: 2 final are not enough
    meta = json.loads((run / 'run.json').read_text()); meta['epochs'] = 3; meta.pop('branches')
    (run / 'run.json').write_text(json.dumps(meta))
    assert not is_done(run) and 'id="br-epochs3" data-status="pending"' in write_dashboard(run).read_text()
    # without run.json: all present branches final AND quiet for DONE_QUIET_S AND the stable run not past the last branch point
    (run / 'run.json').unlink()
    assert not is_done(run)                                                  # just written
    old = time.time() - DONE_QUIET_S - 1
    for p in run.rglob('metrics.jsonl'): os.utime(p, (old, old))
    assert is_done(run)
    (run / 'epochs2' / 'final' / 'meta.json').unlink()
    assert not is_done(run)                                                  # a branch without its final checkpoint


def test_branched_parent_is_not_any_folder_of_runs(tmp_path):
    append(tmp_path / 'exp' / 'seed0', 1, 3)
    assert not is_branched(tmp_path / 'exp') and not is_branched(tmp_path / 'exp' / 'seed0')
    assert is_branched(branched(tmp_path / 'ep', upto=5, run_json=False))


def test_dashboard_thread_follows_training_and_marks_done(tmp_path):
    run = fresh(tmp_path / 'ep'); run.mkdir(); mark_done(run)                # a stale marker from an earlier session
    with DashboardThread(run, every_s=0.1) as dt:
        assert not is_done(run)                                              # ... is removed: training runs again
        seen = set()
        for a, b in ((0, 20), (20, 45), (45, 75), (75, 90)):
            branched(run, start=a, upto=b)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                html = (run / 'dashboard.html').read_text()
                step = html.split('data-step="')[1].split('"')[0]
                if step == str({20: 20, 45: 35, 75: 65, 90: 80}[b]): seen.add(b); break
                time.sleep(0.05)
        assert dt.running
    assert seen == {20, 45, 75, 90} and dt.errors == 0 and not dt.running
    assert is_done(run) and 'st-done' in (run / 'dashboard.html').read_text()


def test_dashboard_thread_exception_and_errors(tmp_path, monkeypatch, capsys):
    run = fresh(branched(tmp_path / 'ep', upto=20))
    with pytest.raises(ValueError, match='diverged'):
        with DashboardThread(run, every_s=0.1):
            raise ValueError('diverged')
    assert not is_done(run) and 'st-running' in (run / 'dashboard.html').read_text()
    import supra.dashboard.live as D
    def boom(*a, **k): raise RuntimeError('render bug')
    monkeypatch.setattr(D, 'render_dashboard', boom)
    with DashboardThread(run, every_s=0.05) as dt:                            # training is not disturbed ...
        time.sleep(0.4); total = sum(range(1000))
    assert total == 499500 and dt.errors >= 3 and dt.writes == 0
    err = capsys.readouterr().err
    assert err.count('supra.dashboard.live: could not write') == 1 and 'render bug' in err   # ... and it is said once


def test_cli_branched_run_once(tmp_path):
    run = branched(tmp_path / 'ep', upto=50)
    r = subprocess.run([*_supra(), 'dashboard', str(run), '--once'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and (run / 'dashboard.html').as_uri() in r.stdout
    assert 'id="br-epochs1" data-status="done"' in (run / 'dashboard.html').read_text()


def test_branched_page_follows_in_chromium(tmp_path):
    run = fresh(branched(tmp_path / 'ep', upto=30 + 10 + 30 + 5))
    with DashboardThread(run, every_s=0.2, refresh_s=1.0):
        with Page(width=1200, height=500) as page:
            page.goto((run / 'dashboard.html').as_uri())
            assert page.eval('document.getElementById("cur-step").dataset.step') == '65'
            assert page.eval('document.querySelector("#br-epochs2").dataset.status') == 'running'
            branched(run, start=30 + 10 + 30 + 5, upto=30 + 10 + 30 + 12)      # the trainer logs 7 more steps
            t0, step = time.monotonic(), None
            while time.monotonic() - t0 < 1.0 + 4:                          # one refresh (+ write and load slack)
                page.pump(0.2)
                try: step = page.eval('document.getElementById("cur-step") && document.getElementById("cur-step").dataset.step')
                except RuntimeError: continue
                if step == '72': break
            assert step == '72'
            assert page.eval('document.querySelectorAll("#p-lr polyline").length') == 3
    assert foreign_requests(page.requests) == [], page.requests


def test_eight_branch_evaluation_table_stays_in_its_panel(tmp_path):
    """The latest evaluation of a branched run with eight epoch counts (nine columns of values: the stable run and every
    cooldown) fits its panel on a desktop window and scrolls inside it on a narrow one; the page never scrolls sideways."""
    from supra.train.runlog import fake_branched_run
    run = fresh(fake_branched_run(tmp_path / 'ep8', epochs=8, spe=60))
    for k in range(1, 9):
        with open(run / f'epochs{k}' / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps(dict(step=60 * k, eval=dict(heldout_loss=3.5 + k / 100, bpb=1.4123, blimp=dict(acc=0.51234)))) + '\n')
    with open(run / 'stable' / 'metrics.jsonl', 'a') as f: f.write(json.dumps(dict(step=400, eval=dict(heldout_loss=3.6, bpb=1.5))) + '\n')
    path = write_dashboard(run)
    js = '''(() => { const p = document.getElementById("p-latest-eval"), t = p.querySelector("table"), w = t.parentElement;
        const r = e => { const b = e.getBoundingClientRect(); return [b.left, b.right]; };
        return {panel: r(p), box: r(w), table: r(t), cols: t.rows[0].cells.length, overflow: getComputedStyle(w).overflowX,
                scrolls: w.scrollWidth > w.clientWidth, doc: document.documentElement.scrollWidth}; })()'''
    for width in (1200, 700):
        with Page(width=width, height=900) as page:
            page.goto(path.as_uri())
            r = page.eval(js)
            assert r['cols'] == 10, r                                      # metric + stable + epochs1..8
            assert r['panel'][0] <= r['box'][0] and r['box'][1] <= r['panel'][1] + 0.5, r   # the table's box ends inside the panel
            if width == 1200: assert r['table'][1] <= r['panel'][1] + 0.5 and not r['scrolls'], r   # a desktop window: it fits
            else: assert r['scrolls'] and r['overflow'] in ('auto', 'scroll'), r                  # narrow: it scrolls in its panel
            assert r['doc'] <= width, r                                    # and the page itself never scrolls sideways
