"""Experiment #4 end to end: `nbs/topology.ipynb` under papermill at the smoke preset (LR search, runs, evaluation,
results.json, paper), its caching (a re-run trains and tunes nothing), and bad parameters stopping the first cell."""
import html, json, math, os, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPERMILL = ROOT / '.venv' / 'bin' / 'papermill'
NB = ROOT / 'nbs' / 'topology.ipynb'
TOPOLOGIES = ('deep-narrow', 'balanced', 'shallow-wide')
RUN_METRICS = ('params', 'lr', 'step_loss', 'train_loss', 'heldout_loss', 'heldout_bpb', 'wikitext_word_ppl', 'wikitext_byte_ppl',
               'arc_easy', 'arc_easy_stderr', 'blimp', 'blimp_stderr', 'samples_s', 'tokens_s', 'train_s')

def _env(cache):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    if not env.get('SUPRA_DATA') and (ROOT.parent / 'shared' / 'data').is_dir(): env['SUPRA_DATA'] = str(ROOT.parent / 'shared' / 'data')
    env.setdefault('SUPRA_CACHE', str(cache))
    return env

def papermill(out_nb, cache, **params):
    args = [str(PAPERMILL), str(NB), str(out_nb), '--cwd', str(ROOT), '-k', 'supra']
    for k, v in params.items(): args += ['-p', k, str(v)]
    return subprocess.run(args, env=_env(cache), capture_output=True, text=True, timeout=900)

def _finite(v): return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

def _snapshot(cache_root:Path, out:Path) -> dict:
    "mtimes of every checkpoint file the experiment made, and the Optuna trials (number, state, value)."
    import optuna
    files = {str(p): p.stat().st_mtime_ns for p in (cache_root / 'topology').rglob('*.safetensors')}
    trials = {s.study_name: [(t.number, t.state.name, t.value) for t in optuna.load_study(study_name=s.study_name, storage=f'sqlite:///{out}/optuna.db').trials]
              for s in optuna.get_all_study_summaries(storage=f'sqlite:///{out}/optuna.db')}
    return dict(files=files, trials=trials)

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('topology')
    cache = tmp / 'cache'
    r = papermill(tmp / 'out.ipynb', cache, preset='smoke', out_dir=tmp / 'out', paper=tmp / 'topology.html')
    assert r.returncode == 0, r.stderr[-4000:]
    cache_root = Path(_env(cache)['SUPRA_CACHE'])
    if not cache_root.is_absolute(): cache_root = ROOT / cache_root
    return dict(tmp=tmp, cache=cache, cache_root=cache_root, results=json.loads((tmp / 'out' / 'results.json').read_text()),
                page=(tmp / 'topology.html').read_text())

def test_results_complete_and_finite(smoke):
    res = smoke['results']
    assert res['plan']['preset']['name'] == 'smoke' and res['environment']['device'] == 'cpu'
    seeds = res['plan']['seeds']
    assert len(seeds) >= 1
    runs = {(r['topology'], r['seed']): r for r in res['runs']}
    assert set(runs) == {(t, s) for t in TOPOLOGIES for s in seeds}
    for key, r in runs.items():
        for m in RUN_METRICS: assert _finite(r[m]), (key, m, r.get(m))
        assert 0 <= r['arc_easy'] <= 1 and 0 <= r['blimp'] <= 1 and r['wikitext_word_ppl'] > 1 and r['heldout_bpb'] > 0
        assert r['params'] == res['topologies'][key[0]]['params'] and r['lr'] == res['topologies'][key[0]]['lr']
        assert isinstance(r['generation'], str)
        curve = res['curves'][key[0]][str(key[1])]
        assert len(curve['loss']) == r['steps'] and curve['loss'][-1] == r['step_loss']
        assert abs(sum(curve['loss']) / len(curve['loss']) - r['train_loss']) < 1e-9
    # the shapes keep the seed's ratios: layers 4:2:1, widths 2:3:4
    t = res['topologies']
    assert [t[x]['n_layer'] for x in TOPOLOGIES] == [4 * t['shallow-wide']['n_layer'], 2 * t['shallow-wide']['n_layer'], t['shallow-wide']['n_layer']]
    assert [4 * t[x]['d_model'] // t['shallow-wide']['d_model'] for x in TOPOLOGIES] == [2, 3, 4]
    for x in TOPOLOGIES:   # every topology has its own completed LR search, and the chosen LR is its best trial
        done = [tr for tr in t[x]['trials'] if tr['state'] == 'COMPLETE']
        assert len(done) == res['plan']['n_trials'] == t[x]['n_complete']
        assert res['plan']['lr_lo'] <= t[x]['lr'] <= res['plan']['lr_hi']
        assert t[x]['lr_objective'] == min(tr['value'] for tr in done)
        assert t[x]['lr'] == next(tr['lr'] for tr in done if tr['value'] == t[x]['lr_objective'])
    for m in ('wikitext_word_ppl', 'heldout_bpb', 'samples_s', 'arc_easy', 'blimp'):
        for x in TOPOLOGIES:
            s = res['summary'][m][x]
            assert s['n'] == len(seeds) and _finite(s['mean'])
            assert abs(s['mean'] - sum(runs[(x, sd)][m] for sd in seeds) / len(seeds)) < 1e-9
    assert {(c['metric'], c['a'], c['b']) for c in res['comparisons']} >= {('wikitext_word_ppl', 'deep-narrow', 'balanced')}
    assert all(c['verdict'] in ('resolved', 'within noise') for c in res['comparisons'])
    assert all(_finite(v) and v > 0 for v in res['compute'].values()), res['compute']

def test_paper(smoke):
    page, res = smoke['page'], smoke['results']
    for label in ('Active parameters', 'Pretrain step loss', 'Pretrain train loss', 'WikiText word PPL', 'ARC-Easy zero-shot',
                  'BLiMP', 'Held-out bits per byte', 'Throughput, samples/s', 'Tuned peak LR', 'Which differences are real?'):
        assert label in page, label
    assert page.count('data:image/svg+xml;base64,') == 5      # word PPL, bpb, throughput, loss curves, LR search
    assert '<script' not in page and 'smoke' in page and 'CPU' in page
    for r in res['runs']:
        if r['seed'] == res['plan']['seeds'][0] and r['generation']:
            assert html.escape(r['generation'], quote=True) in page
    shown = f"{res['summary']['wikitext_word_ppl']['balanced']['mean']:,.2f}"   # table numbers are computed from results.json
    assert shown in page
    ref = res['seed_reference']   # the seed's published numbers the paper quotes are recorded in results.json by the run
    assert ref['lr'] == 0.001178 and ref['samples_s']['balanced'] == 282.9
    assert f"{ref['lr']:.3e}" in page and f"×{ref['samples_s']['shallow-wide'] / ref['samples_s']['deep-narrow']:.2f}" in page


def test_findings_quote_only_results():
    "A results.json without the seed's reference numbers gives findings without them: nothing comes from constants."
    from supra.topology import topology_findings
    res = json.loads((ROOT / 'outputs' / 'topology' / 'results.json').read_text())
    with_ref = ' '.join(t for _, t in topology_findings(dict(res, seed_reference={'lr': 0.5, 'samples_s': {'deep-narrow': 1.0, 'balanced': 2.0, 'shallow-wide': 4.0}})))
    assert '5.000e-01' in with_ref and '×4.00' in with_ref
    without = ' '.join(t for _, t in topology_findings({k: v for k, v in res.items() if k != 'seed_reference'}))
    assert 'the seed' not in without

def test_rerun_is_cached(smoke):
    "Same parameters again: nothing is trained, tuned or evaluated anew, and the numbers are identical."
    tmp = smoke['tmp']
    before = _snapshot(smoke['cache_root'], tmp / 'out')
    assert before['files'] and all(len(v) for v in before['trials'].values())
    r = papermill(tmp / 'out2.ipynb', smoke['cache'], preset='smoke', out_dir=tmp / 'out', paper=tmp / 'topology.html')
    assert r.returncode == 0, r.stderr[-4000:]
    assert _snapshot(smoke['cache_root'], tmp / 'out') == before
    again = json.loads((tmp / 'out' / 'results.json').read_text())
    assert again['runs'] == smoke['results']['runs'] and again['topologies'] == smoke['results']['topologies']

@pytest.mark.parametrize('param,value', [('seeds', 'abc'), ('preset', 'fast'), ('storage', 'redis://localhost/0'), ('n_trials', 0)])
def test_bad_parameter_fails_first(tmp_path, param, value):
    params = {**dict(preset='smoke', out_dir=tmp_path / 'out', paper=tmp_path / 'p.html'), param: value}
    r = papermill(tmp_path / 'bad.ipynb', tmp_path / 'cache', **params)
    assert r.returncode != 0
    nb = json.loads((tmp_path / 'bad.ipynb').read_text())
    errs = [(i, o) for i, c in enumerate(nb['cells']) for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert len(errs) == 1
    i, err = errs[0]
    assert 'topology_plan(' in ''.join(nb['cells'][i]['source'])          # the validation cell, before any compute
    assert err['ename'] == 'ConfigError' and f'{param}=' in err['evalue'], err['evalue']
    assert not (tmp_path / 'out' / 'optuna.db').exists() and not (tmp_path / 'p.html').exists()
