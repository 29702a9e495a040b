"""The epochs experiment end to end, through papermill at the `smoke` preset: results.json, the paper,
caching on a re-run, resume after a kill, and bad parameters stopped in the first cell."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, nbformat
from conftest import assert_plan_refuses, assert_stopped_in_plan_cell, rerun_in_process, papermill as run_papermill

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / 'nbs' / 'epochs.ipynb'
PAPERMILL = [sys.executable, '-m', 'papermill', '--no-progress-bar']
pytestmark = pytest.mark.skipif(not os.environ.get('SUPRA_DATA'), reason='needs SUPRA_DATA (the local data sets); ./test.sh sets it')


def REP(res): return [s for s in res['summary']['by_arm'] if s['arm'] == 'repeated']   # the repeated arm at each epoch count

def papermill(out_dir, *params):
    "The `papermill` command itself, as a user types it (its terminal output and a SIGKILL of its process group are tested below)."
    args = [*PAPERMILL, str(NB), str(out_dir / 'out.ipynb'), '-p', 'preset', 'smoke', '-p', 'out_dir', str(out_dir),
            '-p', 'paper', str(out_dir / 'epochs.html'), *map(str, params)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('epochs')
    r = papermill(out, '-p', 'epochs', 2)
    (out / 'stderr.txt').write_text(r.stderr)
    return out

def finite(x): return isinstance(x, (int, float)) and math.isfinite(x)

def test_results_json_has_every_metric(smoke):
    res = json.loads((smoke / 'results.json').read_text())
    from supra.lab.experiment import ENVELOPE_KEYS
    assert list(res) == list(ENVELOPE_KEYS)
    assert res['corpus'] == 'wikipedia-en' and res['preset'] == 'smoke' and res['plan']['seeds'] == [0]
    rep = [r for r in res['runs'] if r['arm'] == 'repeated']
    assert [r['epochs'] for r in rep] == [1, 2]
    for r in rep:
        for m in ('train_loss', 'heldout_loss', 'heldout_bpb', 'blimp', 'arc_easy', 'boolq', 'wikitext_byte_ppl', 'wikitext_word_ppl'):
            assert finite(r[m]), (m, r[m])
        assert 0 <= r['blimp'] <= 1 and r['blimp_stderr'] > 0
        assert isinstance(r['generation_greedy'], str)
        assert not Path(r['checkpoint']).is_absolute() and Path(smoke, r['checkpoint'], 'meta.json').exists()
    # the 2-epoch model has seen twice the tokens of the 1-epoch model, and trained them further
    assert rep[1]['tokens'] == 2 * rep[0]['tokens']
    assert rep[1]['train_loss'] < rep[0]['train_loss']
    # the fresh-data control: the same steps on never-repeated tokens; its first epoch is the repeated run's first epoch
    fresh = [r for r in res['runs'] if r['arm'] == 'fresh']
    assert [r['epochs'] for r in fresh] == [1, 2] and [r['unique_tokens'] for r in fresh] == [res['data']['n_tokens'], 2 * res['data']['n_tokens']]
    assert res['data']['fresh_prefix_equal'] is True
    assert fresh[0]['heldout_bpb'] == rep[0]['heldout_bpb'] and fresh[0]['train_loss'] == rep[0]['train_loss']
    v = {x['epochs']: x for x in res['summary']['value_of_repeats']}
    assert v[1]['value'] == pytest.approx(1.0) and v[2]['predicted'] == pytest.approx(0.984, abs=1e-3) and finite(v[2]['value'])
    # the run measures, the paper judges: no test in the summary
    assert set(res['summary']) == {'by_arm', 'value_of_repeats', 'baselines', 'ngram', 'model'}
    assert [(s['arm'], s['epochs']) for s in res['summary']['by_arm']] == [(r['arm'], r['epochs']) for r in res['runs'] if r['seed'] == 0]   # each arm at each epoch count
    # every row: its generalisation gap, and BLiMP per pair — the same pairs in the same order for every checkpoint, their mean the accuracy
    from supra.eval.harness import unpack_items
    items = [unpack_items(r['blimp_items']) for r in res['runs']]
    assert len({len(i) for i in items}) == 1 and len(items[0]) == rep[0]['blimp_n']
    for r, i in zip(res['runs'], items):
        assert sum(i) / len(i) == pytest.approx(r['blimp'], abs=1e-12) and r['gap'] == pytest.approx(r['heldout_loss'] - r['train_loss'])
    assert items[0] == items[len(rep)]                                   # the fresh control's shared first epoch: the repeated run's items
    # held-out loss during training, from the trainer's eval hook, is inside the envelope's curves
    assert set(res['curves']) == {'repeated', 'fresh'} and set(res['curves']['repeated']) == {str(s) for s in res['plan']['seeds']}   # {arm: {seed: branches}}
    assert res['curves']['repeated']['0']['stable']['heldout'] and all(finite(e['bpb']) for e in res['curves']['repeated']['0']['stable']['heldout'])
    assert set(res['summary']['baselines']) >= {'blimp', 'arc_easy', 'boolq'}
    assert res['summary']['baselines']['boolq']['majority'] >= 0.5
    assert res['status'] == {'state': 'complete'}
    assert res['curves']['repeated']['0']['stable']['loss'] and res['curves']['repeated']['0']['epochs2']['tokens']
    assert res['environment']['hardware'] and res['environment']['torch']

def test_paper_is_self_contained_and_states_its_scale(smoke):
    html = (smoke / 'epochs.html').read_text()
    res = json.loads((smoke / 'results.json').read_text())
    assert 'wikipedia-en' in html and 'FineWeb-Edu tokens' not in html
    assert html.count('<table') >= 1 and 'data:image/' in html
    assert 'src="http' not in html and "src='http" not in html and '<script src' not in html
    assert f"{res['summary']['model']['n_params']:,}" in html and res['environment']['hardware'] in html
    # a number of the table comes from results.json
    assert f"{REP(res)[0]['heldout_loss']:.3f}" in html
    import html as h
    g = res['runs'][0]['generation_greedy']
    assert h.escape(g, quote=False).strip()[:20] in html

def test_paper_judges_every_test_through_the_engine(smoke):
    "The paper's family by the verdict engine: the headline answers the question with its verdict, repetition's share of the gap is tested against the control's own gap, BLiMP is compared pair by pair."
    from supra.experiments.epochs import paper as P
    from supra.lab.verdict import judge, Versus, item_pairs
    res = json.loads((smoke / 'results.json').read_text())
    V = P.verdicts(res)
    lab, text = P.findings(res)[0]
    assert lab == 'Is one epoch all you need?' and any(w in text for w in ('resolved', 'bounded', 'not testable here', 'lowest after one epoch')), text
    gap = [r for r in V if r['label'].startswith("repetition's share of the gap")]
    assert [r['a'] for r in gap] == ['2 epochs'] and gap[0]['b'] == 'fresh, 2 pools' and gap[0]['metric'] == 'gap'
    drop = P.claim_of_drop(V)
    assert drop['verdict'] == 'not testable here' and 'needs 8' in drop['reason']          # a 2-epoch run cannot test the 8-vs-6 claim
    rows = item_pairs(P._cells(res), '2 epochs', '1 epoch', by='cell')                              # ... but the same test, 2 vs 1 epochs, pairs items
    r = judge(rows, [Versus(P.BLIMP_CHANGE, '2 epochs − 1 epoch', 0.0, 'no change', by='cell')])[0]
    assert r['test'].startswith(f"bootstrap over {res['runs'][0]['blimp_n']} shared items") and r['mde'] is not None
    bc = next(r for r in V if r['label'].endswith('vs chance'))
    assert bc['test'].startswith('bootstrap over')                                            # BLiMP against chance: over the shared pairs too
    html = (smoke / 'epochs.html').read_text()
    assert 'pairs tied exactly' in html.lower() and "share" in html

def test_terminal_shows_progress(smoke):
    "The command's terminal (papermill's stderr, which the kernel's own stderr reaches) shows each stage, not only 'Executing'."
    err = (smoke / 'stderr.txt').read_text()
    lines = [l for l in err.splitlines() if l.startswith('[supra ')]
    assert any('[epochs] plan:' in l for l in lines) and any('training repeated seed 0' in l for l in lines) and any('training fresh seed 0' in l for l in lines), err[-2000:]
    assert any('evaluating 4/4' in l for l in lines) and any('paper:' in l for l in lines)
    first = [l.split('] ', 1)[1] for l in lines[:next(i for i, l in enumerate(lines) if 'training repeated' in l)]]
    assert first[0].startswith('[epochs] plan:') and 'training steps' in first[0] and 'checkpoints to evaluate' in first[0], first
    assert any(l.startswith('[epochs] estimate: ~') and 'on this machine' in l for l in first), first   # before training starts
    assert len(lines) < 100, 'progress must not flood the terminal'

def test_rerun_reuses_everything(smoke, monkeypatch):
    "Same parameters again (the notebook's calls, in this process): nothing is trained anew, every number is the same."
    metrics = sorted(smoke.glob('runs/*/*/metrics.jsonl'))
    assert len(metrics) >= 6   # repeated and fresh: stable + 2 branches each
    before = {p: p.stat().st_mtime_ns for p in metrics}
    res0 = json.loads((smoke / 'results.json').read_text())
    rerun_in_process(monkeypatch, 'epochs', preset='smoke', epochs=2, out_dir=smoke, paper=smoke / 'epochs.html')
    assert {p: p.stat().st_mtime_ns for p in metrics} == before, 'a re-run with the same parameters must not train'
    res1 = json.loads((smoke / 'results.json').read_text())
    assert [r['eval_key'] for r in res1['runs']] == [r['eval_key'] for r in res0['runs']]
    assert [r['heldout_loss'] for r in res1['runs']] == [r['heldout_loss'] for r in res0['runs']]

def test_killed_run_resumes_to_the_same_result(smoke, tmp_path):
    args = [*PAPERMILL, str(NB), str(tmp_path / 'out.ipynb'), '-p', 'preset', 'smoke', '-p', 'epochs', 2,
            '-p', 'out_dir', str(tmp_path), '-p', 'paper', str(tmp_path / 'epochs.html')]
    p = subprocess.Popen([str(a) for a in args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    try:   # kill the whole process group (papermill and its kernel) once training has checkpointed
        while not list(tmp_path.glob('runs/*/stable/*/meta.json')) and time.time() - t0 < 300 and p.poll() is None: time.sleep(0.2)
        assert p.poll() is None, 'papermill finished before it could be killed'
    finally: os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (tmp_path / 'results.json').exists()
    papermill(tmp_path, '-p', 'epochs', 2)   # the command again (papermill in this process took 2-3x as long here, in the suite)
    a = json.loads((smoke / 'results.json').read_text())['runs']
    b = json.loads((tmp_path / 'results.json').read_text())['runs']
    assert [r['train_loss'] for r in b] == pytest.approx([r['train_loss'] for r in a], abs=1e-6)
    assert [r['heldout_loss'] for r in b] == pytest.approx([r['heldout_loss'] for r in a], abs=1e-6)

@pytest.mark.parametrize('name,value,field', [('epochs', 0, 'epochs'), ('epochs', 'abc', 'epochs'), ('preset', 'fast', 'preset'), ('corpus', 'c4', 'corpus'),
                                              ('seeds', 'x', 'seeds'), ('epoch', 8, 'parameter'), ('seed', 1, 'parameter'), ('paper', '/proc/x.html', 'paper')])
def test_plan_refuses_a_bad_parameter(tmp_path, name, value, field):
    "In-process: the plan names the parameter, the value and what is allowed."
    from supra.experiments.epochs.run import plan
    assert_plan_refuses(plan, field, **{'preset': 'smoke', 'out_dir': str(tmp_path), 'paper': str(tmp_path / 'e.html'), 'epochs': 2, name: value})
    assert not (tmp_path / 'runs').exists()

def test_bad_parameter_stops_the_first_cell(tmp_path):
    "End to end, once: papermill stops in the plan cell, before any compute."
    r = run_papermill('epochs', tmp_path / 'out.ipynb', preset='smoke', epochs=0, out_dir=tmp_path, paper=tmp_path / 'epochs.html')
    assert_stopped_in_plan_cell(r, tmp_path / 'out.ipynb', 'epochs')
    assert not (tmp_path / 'runs').exists()

def test_smoke_paper_renders_in_chromium_offline(smoke):
    "The experiment's own paper, in a real browser: tables and every chart render, and nothing is fetched."
    try: from tests.browser import Page, foreign_requests
    except ImportError:
        sys.path.insert(0, str(Path(__file__).parent)); from browser import Page, foreign_requests
    res = json.loads((smoke / 'results.json').read_text())
    with Page(width=1200) as page:
        page.goto((smoke / 'epochs.html').as_uri())
        rows = page.eval('[...document.querySelectorAll("table")].map(t => t.rows.length)')
        assert rows and max(rows) >= 1 + 9 + 1, rows            # header, the metric rows, the status row
        cols = page.eval('document.querySelector("table").rows[0].cells.length')
        assert cols == 1 + len(REP(res)) + 3, cols        # metric, one per epoch count, chance, majority, trigram
        imgs = page.eval('[...document.images].map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])')
        assert len(imgs) >= 3 and all(c and w > 100 and bw > 100 for c, w, bw in imgs), imgs
        text = page.eval('document.body.innerText')
        assert 'wikipedia-en' in text and f"{REP(res)[-1]['heldout_loss']:.3f}" in text
    assert foreign_requests(page.requests) == [], page.requests

def test_fresh_control_sharing_its_first_epoch_changes_no_weight(smoke, tmp_path):
    "The fresh control adopts the repeated run's first epoch (train_epochs(shared=…)); trained alone it ends with the same weights."
    from supra.experiments.epochs import run as E
    from supra.data.pool import build_pool
    from supra.model.checkpoint import read_meta
    p = E.plan(preset='smoke', epochs=2, out_dir=str(tmp_path), paper=str(tmp_path / 'epochs.html'))
    pool, fresh, U = build_pool(p.data), build_pool(p.fresh_data), p.data.n_tokens
    assert E.same_first_epoch(pool, fresh, U)
    chunks = lambda tokens, cfg, rank, world: E.ChunkSteps(tokens, U, cfg.batch_size, cfg.seq_len, cfg.grad_accum, cfg.seed, rank, world)
    alone = E._train_arm(p, fresh, 'fresh', 0, p.fresh_pools, loader=chunks, hook=E._hook(pool, p), dashboard=False)
    shared = [r for r in json.loads((smoke / 'results.json').read_text())['runs'] if r['arm'] == 'fresh']
    assert read_meta(smoke / shared[0]['checkpoint']).get('shared_from') and not read_meta(alone[0]['checkpoint']).get('shared_from')
    assert [read_meta(a['checkpoint'])['model_sha256'] for a in alone] == [read_meta(smoke / s['checkpoint'])['model_sha256'] for s in shared]
