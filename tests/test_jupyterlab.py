"""The epochs notebook in JupyterLab, in a real (headless) browser: the venv's `jupyter lab` serves the repository,
Chromium (over the DevTools Protocol) opens a copy of nbs/epochs.ipynb set to the smoke preset, the notebook's own
`supra` kernel starts, Run > Run All Cells executes every cell, and the page then shows no error or traceback, the live
training dashboards (in the training cell while it runs), the results table, the findings, the figures and the paper's
path; the kernel's progress lines reach the terminal that runs JupyterLab. Then the plan cell runs again in the same
kernel, as a user does after editing a parameter.

Three checks guard what a JupyterLab user met before they were fixed: a stale dashboard after training, every progress
line shown twice (once in a red stderr box), the plan cell failing when run again.

The copy differs from nbs/epochs.ipynb only in its parameters cell (smoke preset, 2 epochs, outputs under a temporary
directory); it sits inside the served root (under outputs/, which git ignores) so that JupyterLab can open it.
The notebook runs once per module (about a minute on 2 cores); the tests read what the page showed.
A screenshot of the training cell's dashboards is kept at outputs/jupyterlab.png."""
import html, json, os, re, secrets, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path
from types import SimpleNamespace

import nbformat, pytest

try: from tests.browser import Page, require_chromium
except ImportError:
    sys.path.insert(0, str(Path(__file__).parent)); from browser import Page, require_chromium

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / 'nbs' / 'epochs.ipynb'
JUPYTER = Path(sys.executable).parent / 'jupyter'
SHOT = ROOT / 'outputs' / 'jupyterlab.png'
KERNEL = 'supra'                 # the kernel install.sh registers in the venv (--sys-prefix), named in the notebook's metadata
OPEN_TIMEOUT = 180               # JupyterLab loaded and the kernel idle
RUN_TIMEOUT = 600                # Run All at the smoke preset takes about a minute on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _smoke_copy(dst: Path, out: Path) -> nbformat.NotebookNode:
    "nbs/epochs.ipynb with its parameters cell set to the smoke preset, 2 epochs and outputs under `out`; written to `dst`."
    nb = nbformat.read(NB, as_version=4)
    params = [c for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(params) == 1, 'nbs/epochs.ipynb must have exactly one cell tagged "parameters"'
    src = params[0].source
    for k, v in dict(preset='smoke', epochs=2, out_dir=str(out), paper=str(out / 'epochs.html')).items():
        src, n = re.subn(rf'^{k}\s*=\s*[^#\n]*?(\s*(#.*)?)$', lambda m: f'{k} = {v!r}{m.group(1)}', src, count=1, flags=re.M)
        assert n == 1, f'no `{k} = ...` line in the parameters cell of nbs/epochs.ipynb'
    params[0].source = src
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    nbformat.write(nb, dst)
    return nb


def _children(pid: int) -> list[int]:
    "Direct children of `pid` (Linux /proc; empty elsewhere): the kernels, which jupyter starts in sessions of their own."
    out = []
    for st in Path('/proc').glob('[0-9]*/stat'):
        try: fields = st.read_text().rsplit(')', 1)[1].split()
        except (OSError, IndexError): continue
        if int(fields[1]) == pid: out.append(int(st.parent.name))
    return out


def _tail(path: Path, n: int = 4000) -> str:
    try: return path.read_text(errors='replace')[-n:]
    except OSError: return ''


# The notebook's panel, found by its path (headless, no widget has focus, so the shell has no current widget).
FIND_JS = "[...jupyterapp.shell.widgets('main')].find(x => x.context && x.context.path === path)"

# Its kernel, and any dialog (a missing kernelspec opens "Select Kernel"; a dead kernel opens "Kernel Restarting").
STATE_JS = r'''((path) => {
  const w = window.jupyterapp && FIND, sc = w && w.sessionContext, k = sc && sc.session && sc.session.kernel;
  return {app: !!window.jupyterapp, path: w ? w.context.path : null, ready: !!(sc && sc.isReady),
          kernel: k ? k.name : null, status: k ? k.status : null, display: sc ? sc.kernelDisplayName : null,
          toolbar: w ? ((w.node.querySelector('.jp-KernelName') || {}).textContent || '') : '',
          dialogs: [...document.querySelectorAll('.jp-Dialog')].map(d => d.textContent.slice(0, 500))};
})'''.replace('FIND', FIND_JS)

# Its cells as the page shows them: the prompt, each output's MIME type and text, the dashboards, figures and tables
# (and the output types of the cell's model, where an error output is told apart from stderr).
CELLS_JS = r'''((path) => {
  const w = FIND;
  if (!w) return null;
  return w.content.widgets.map(cell => { const c = cell.node; return {
    code: cell.model.type === 'code',
    prompt: (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '',
    types: cell.model.type === 'code' ? cell.model.outputs.toJSON().map(o => o.output_type) : [],
    outputs: [...c.querySelectorAll('.jp-OutputArea-output')].map(o => ({mime: o.dataset.mimeType || '', text: o.textContent.slice(-20000)})),
    dashboards: [...c.querySelectorAll('.supra-dash')].map(d => ({
      name: ((d.querySelector('h1') || {}).firstChild || {}).textContent || '', status: (d.querySelector('#status') || {}).textContent || '',
      step: (d.querySelector('#cur-step') || {dataset: {}}).dataset.step || '', charts: d.querySelectorAll('.panel svg').length})),
    svgs: c.querySelectorAll('.jp-OutputArea-output[data-mime-type="image/svg+xml"]').length,
    tables: c.querySelectorAll('.jp-OutputArea-output table.dataframe').length};
  });
})'''.replace('FIND', FIND_JS)


def _errors(cells) -> list[str]:
    "Every error output, and every traceback shown on stderr, with its cell."
    bad = []
    for i, c in enumerate(cells):
        if 'error' in c['types']: bad.append(f'cell {i} has an error output')
        for o in c['outputs']:
            if o['mime'] == 'application/vnd.jupyter.stderr' and re.search(r'Traceback|\w+Error:|Exception\b', o['text']):
                bad.append(f'cell {i}: {o["text"][-3000:]}')
    return bad


def _drive(lab):
    "Start JupyterLab and Chromium, open the copy, Run All, record what the page shows, run the plan cell again; stop both."
    port, token = _free_port(), secrets.token_hex(16)
    home = lab.work / 'jupyter'   # settings, workspaces, runtime, config and data of this server only (not ~/.jupyter)
    # not pytest's variables: ipykernel leaves fd 1 and 2 alone under PYTEST_CURRENT_TEST, which a user's kernel never has
    env = dict({k: v for k, v in os.environ.items() if not k.startswith('PYTEST_')}, JUPYTERLAB_SETTINGS_DIR=str(home / 'settings'), JUPYTERLAB_WORKSPACES_DIR=str(home / 'workspaces'),
               JUPYTER_RUNTIME_DIR=str(home / 'runtime'), JUPYTER_CONFIG_DIR=str(home / 'config'), JUPYTER_DATA_DIR=str(home / 'data'),
               HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1', OMP_WAIT_POLICY=os.environ.get('OMP_WAIT_POLICY', 'PASSIVE'))
    if not env.get('SUPRA_DATA') and (ROOT.parent / 'shared' / 'data').is_dir(): env['SUPRA_DATA'] = str(ROOT.parent / 'shared' / 'data')
    env.setdefault('SUPRA_CACHE', str(ROOT / 'outputs' / 'test-cache'))
    cmd = [str(JUPYTER), 'lab', '--no-browser', '--ip=127.0.0.1', f'--port={port}', '--ServerApp.port_retries=0',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT}', '--LabApp.expose_app_in_browser=True',
           '--LabApp.news_url=', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')   # containers and CI run as root
    news = home / 'settings' / '@jupyterlab' / 'apputils-extension' / 'notification.jupyterlab-settings'
    news.parent.mkdir(parents=True, exist_ok=True)   # no "Would you like to get notified about Jupyter news?" toast
    news.write_text(json.dumps(dict(fetchNews='false', checkForUpdates=False)))
    server, page, kernels, rel, log = None, None, set(), json.dumps(lab.rel), lab.log
    try:
        with open(log, 'wb') as f:
            server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        base, t0 = f'http://127.0.0.1:{port}', time.monotonic()
        while True:   # the server answers its status API once it listens
            assert server.poll() is None, f'jupyter lab exited with {server.returncode}:\n{_tail(log)}'
            try:
                if urllib.request.urlopen(f'{base}/api/status?token={token}', timeout=5).status == 200: break
            except OSError: pass
            assert time.monotonic() - t0 < 120, f'jupyter lab did not answer on port {port} within 120s:\n{_tail(log)}'
            time.sleep(0.5)

        page = Page(width=1400, height=1000, timeout=60).__enter__()
        page.send('Network.disable')                                   # the kernel's websocket frames need not be recorded
        page.send('Emulation.setFocusEmulationEnabled', enabled=True)  # the page acts focused, as a user's window is
        page.goto(f'{base}/lab/tree/{lab.rel}?token={token}', timeout=120)
        state = lambda: page.eval(f'{STATE_JS}({rel})') or {}
        cells = lambda: page.eval(f'{CELLS_JS}({rel})')
        where = lambda: f'\nkernel and page: {json.dumps(state())}\njupyter log:\n{_tail(log)}'
        try:
            page.wait_for(f'window.jupyterapp && (s => s.dialogs.length || s.path && s.ready && s.kernel && s.status === "idle")({STATE_JS}({rel}))',
                          timeout=OPEN_TIMEOUT, what=f'{lab.rel} open in JupyterLab with an idle kernel')
        except TimeoutError as e: raise AssertionError(f'{e}{where()}') from None
        assert not state()['dialogs'], f'JupyterLab shows a dialog on opening the notebook{where()}'
        lab.start, lab.opened = state(), cells()
        kernels.update(_children(server.pid))

        # Run > Run All Cells, on this notebook (activated first, as a click on its tab would)
        page.eval(f'''(path => {{ const w = {FIND_JS}; jupyterapp.shell.activateById(w.id); window.__runAll = null;
            jupyterapp.commands.execute('notebook:run-all-cells').then(r => {{ window.__runAll = 'ok:' + r }}, e => {{ window.__runAll = 'error:' + e }});
            return true; }})({rel})''')
        t0 = time.monotonic()
        while True:
            page.pump(1.0)
            cs, st = cells(), state()
            kernels.update(_children(server.pid))
            errors = _errors(cs)
            assert not errors, 'a cell shows an error in JupyterLab:\n' + '\n'.join(errors)
            assert st['status'] not in ('dead', 'unknown', 'autorestarting', 'restarting'), f'the kernel is {st["status"]}{where()}'
            assert not st['dialogs'], f'JupyterLab shows a dialog: {st["dialogs"]}{where()}'
            lab.live += [(i, c['dashboards']) for i, c in enumerate(cs) if c['prompt'].strip() == '[*]:' and c['dashboards']]
            prompts = [cs[i]['prompt'].strip() for i in lab.code]
            if all(re.fullmatch(r'\[\d+\]:', p) for p in prompts) and st['status'] == 'idle': break
            assert time.monotonic() - t0 < RUN_TIMEOUT, (f'Run All did not finish within {RUN_TIMEOUT}s; prompts {prompts}, '
                                                        f'run-all: {page.eval("window.__runAll")}{where()}')
        lab.cells, lab.run_all = cs, page.eval('window.__runAll')
        lab.train = [i for i, c in enumerate(cs) if c['dashboards']]   # the cells that show training dashboards
        page.eval(f'(path => {{ const w = {FIND_JS}; w.content.widgets[{(lab.train or [0])[0]}].node.scrollIntoView(); return true; }})({rel})')
        page.pump(1.0); page.screenshot(SHOT)

        # a user's next step: run the plan cell again (after editing a parameter), in the same kernel
        last = max(int(re.search(r'\d+', cs[i]['prompt']).group()) for i in lab.code)
        page.eval(f'''(path => {{ const w = {FIND_JS}; w.content.activeCellIndex = {lab.plan}; w.content.deselectAll();
            jupyterapp.commands.execute('notebook:run-cell'); return true; }})({rel})''')
        try:
            page.wait_for(f'''((cs, s) => s.status === "idle" && (m => m && +m[1] > {last})(/\\[(\\d+)\\]/.exec(cs[{lab.plan}].prompt)))
                              ({CELLS_JS}({rel}), {STATE_JS}({rel}))''', timeout=120, what='the plan cell run again')
        except TimeoutError as e: raise AssertionError(f'{e}{where()}') from None
        lab.rerun = cells()[lab.plan]
    finally:
        if page is not None:
            if not SHOT.exists() or SHOT.stat().st_mtime < lab.t0:   # failed before the screenshot: keep the page as it was
                try: page.screenshot(SHOT)
                except Exception: pass
            page.__exit__(None, None, None)
        if server is not None:
            kernels.update(_children(server.pid))
            groups = set()
            for p in kernels:
                try: groups.add(os.getpgid(p))
                except ProcessLookupError: pass
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)   # jupyter shuts its kernels down on SIGTERM
                try: server.wait(30)
                except subprocess.TimeoutExpired: pass
            for g in {server.pid, *groups} - {os.getpgrp()}:
                try: os.killpg(g, signal.SIGKILL)
                except (ProcessLookupError, PermissionError): pass
            server.wait()
    lab.terminal = log.read_text(errors='replace')


@pytest.fixture(scope='module')
def lab(request):
    require_chromium()   # the one reason to skip: no browser on this machine
    assert JUPYTER.exists(), f'{JUPYTER} is missing: ./install.sh installs JupyterLab into the venv'
    (ROOT / 'outputs').mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='jupyterlab-', dir=ROOT / 'outputs'))   # inside the served root; git-ignored
    nb = _smoke_copy(work / 'epochs.ipynb', work / 'out')
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code']
    plan = [i for i in code if 'notebook_params(' in nb.cells[i].source]
    assert len(plan) == 1, 'nbs/epochs.ipynb must have one cell that makes the plan from notebook_params(globals())'
    lab = SimpleNamespace(nb=nb, work=work, out=work / 'out', log=work / 'jupyter.log', rel=(work / 'epochs.ipynb').relative_to(ROOT).as_posix(),
                          code=code, plan=plan[0], train=[], live=[], t0=time.time())
    try: _drive(lab)
    except BaseException:
        print(f'the notebook copy, its outputs and the jupyter log are kept in {work}'); raise
    failed = request.session.testsfailed
    yield lab
    if request.session.testsfailed == failed: shutil.rmtree(work, ignore_errors=True)
    else: print(f'the notebook copy, its outputs and the jupyter log are kept in {work}')


def _text(cell) -> str: return '\n'.join(o['text'] for o in cell['outputs'])


def _training(lab) -> dict:
    "The one cell that shows the training dashboards."
    assert len(lab.train) == 1, f'training dashboards (.supra-dash) in cells {lab.train}: expected them in exactly one cell'
    return lab.cells[lab.train[0]]


def _runs(lab) -> list[Path]:
    "The run directories the training cell announced, in the order it trained them."
    out = '\n'.join(o['text'] for o in _training(lab)['outputs'] if o['mime'] == 'application/vnd.jupyter.stdout')
    return [Path(d) for d in re.findall(r'^\[epochs\] training \w+ seed \d+: epochs 1\.\.\d+ → (.+?) \(dashboard:', out, re.M)]


def test_opens_with_the_supra_kernel(lab):
    assert lab.start['kernel'] == KERNEL, f'the notebook started kernel {lab.start["kernel"]!r}, not {KERNEL!r}'
    assert 'supra' in lab.start['toolbar'], f'the toolbar names kernel {lab.start["toolbar"]!r}'
    assert len(lab.opened) == len(lab.nb.cells), f'the page shows {len(lab.opened)} cells, the notebook has {len(lab.nb.cells)}'


def test_run_all_executes_every_cell_without_error(lab):
    assert lab.run_all in (None, 'ok:true', 'ok:undefined'), lab.run_all
    counts = [int(re.search(r'\d+', lab.cells[i]['prompt']).group()) for i in lab.code]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f'cells ran out of order: {counts}'
    assert not _errors(lab.cells)


def test_live_dashboards_while_training(lab):
    "Each run's dashboard is shown in the training cell while the cell runs, updated in place (one per run), with its charts."
    cell = _training(lab)
    assert [i for i, _ in lab.live] and {i for i, _ in lab.live} == set(lab.train), \
        f'no training dashboard (.supra-dash) appeared while its cell ran (seen: {lab.live[:3]})'
    runs = _runs(lab)
    assert [d.name.split('-')[0] for d in runs] == ['repeated', 'fresh'], runs
    assert len(cell['dashboards']) == len(runs) and max(len(d) for _, d in lab.live) == len(runs), (cell['dashboards'], runs)
    assert all(d['charts'] >= 1 for d in cell['dashboards']), cell['dashboards']


def test_results_findings_figures_and_paper(lab):
    texts = [_text(c) for c in lab.cells]
    assert any(c['tables'] and 'heldout_loss' in t and 'blimp' in t for c, t in zip(lab.cells, texts)), 'no results table with held-out loss and BLiMP'
    assert any(re.search(r'^- \S.*: \S', t, re.M) for t in texts), 'no findings ("- label: text") printed'
    assert any(f'paper: {lab.out / "epochs.html"}' in t for t in texts), 'the paper\'s path is not printed'
    figs = sorted((lab.out / 'figures').glob('*.svg'))
    assert figs and sum(c['svgs'] for c in lab.cells) == len(figs), ([c['svgs'] for c in lab.cells], [f.name for f in figs])
    assert (lab.out / 'epochs.html').stat().st_size > 0 and json.loads((lab.out / 'results.json').read_text())['preset'] == 'smoke'


def test_progress_reaches_the_jupyterlab_terminal(lab):
    "The kernel's progress lines reach the terminal that runs `jupyter lab` (the kernel's stderr), not only the notebook."
    lines = [l for l in lab.terminal.splitlines() if l.startswith('[supra ')]
    assert any('[epochs] plan:' in l for l in lines) and any('training repeated seed 0' in l for l in lines), lab.terminal[-3000:]
    assert any('paper:' in l for l in lines), lab.terminal[-3000:]


def test_progress_lines_show_once_in_the_notebook(lab):
    "The notebook shows each progress line once, as plain output; the timestamped terminal copy stays in the terminal."
    red = [o['text'][:300] for c in lab.cells for o in c['outputs'] if o['mime'] == 'application/vnd.jupyter.stderr' and '[supra ' in o['text']]
    assert not red, red


def test_dashboards_show_the_finished_runs(lab):
    "After training, each dashboard in the notebook shows what its run's own dashboard.html shows: done, at the last step."
    def state(page: str):
        return (html.unescape(re.search(r'id="status">([^<]*)<', page).group(1)), re.search(r'id="cur-step" data-step="([^"]*)"', page).group(1))
    files = [state((d / 'dashboard.html').read_text()) for d in _runs(lab)]
    assert files and all(s == 'done' for s, _ in files), files
    assert [(d['status'], d['step']) for d in _training(lab)['dashboards']] == files


def test_plan_cell_runs_again_in_the_same_kernel(lab):
    assert not _errors([lab.rerun]) and 'error' not in lab.rerun['types'], _text(lab.rerun)[-3000:]
    assert "'preset': 'smoke'" in _text(lab.rerun), _text(lab.rerun)[-3000:]
