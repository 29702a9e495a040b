"""Experiment #4 end to end: `nbs/topology.ipynb` under papermill at the smoke preset (LR walk, runs, evaluation,
results.json, paper), its caching (a re-run trains nothing), and bad parameters stopping the first cell."""
import html, json, math, os, re, subprocess, sys
from pathlib import Path
import pytest
from conftest import nb_env, papermill as run_papermill, assert_plan_refuses, assert_stopped_in_plan_cell, rerun_in_process

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / 'nbs' / 'topology.ipynb'
TOPOLOGIES = ('deep-narrow', 'balanced', 'shallow-wide')
W_SEED = 99                     # the LR walk's seed: never a comparison seed, never a second-stage seed
RUN_METRICS = ('params', 'lr', 'step_loss', 'train_loss', 'heldout_loss', 'heldout_bpb', 'wikitext_word_ppl', 'wikitext_byte_ppl',
               'arc_easy', 'arc_easy_stderr', 'blimp', 'blimp_stderr', 'samples_s', 'tokens_s', 'train_s', 'spike')

def _env(cache=None, **kw): return nb_env(cache, **kw)

def papermill(out_nb, cache, **params): return run_papermill('topology', out_nb, env=_env(cache), **params)

def _finite(v): return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

def _snapshot(cache_root:Path, out:Path) -> dict:
    "mtimes of every checkpoint file the experiment made: the LR walk's runs and the comparison runs."
    return {str(p): p.stat().st_mtime_ns for p in (out / 'runs').rglob('*.safetensors')}

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
    from supra.lab.verdict import staged
    res = smoke['results']
    assert res['plan']['preset']['name'] == 'smoke' and res['environment']['device'] == 'cpu'
    seeds, D = res['plan']['seeds'], res['summary']['design']
    assert len(seeds) >= 1
    runs = {(r['arm'], r['seed']): r for r in res['runs']}
    # seeds by power: the pilot's for every shape, then the second stage's — a shape takes the most any of its pairs asked for
    assert D['n1'] == len(seeds) and D['n_max'] == res['plan']['n_max'] and D['target'] == 0.05 and D['family_size'] == 3
    for t in TOPOLOGIES:
        allowed = (0, *range(2, D['n_max'] - len(seeds) + 1)) if staged(len(seeds), D['n_max']) else (D['n_max'] - len(seeds),)   # by power, or the rest of the budget
        assert D['n2'][t] == max(n for k, n in D['need'].items() if t in k.split('|')) and D['n2'][t] in allowed
        extra = [s for s in range(max(seeds) + 1, 100) if s != W_SEED][:D['n2'][t]]
        assert D['seeds'][t] == list(seeds) + extra
        assert [r['stage'] for r in res['runs'] if r['arm'] == t] == [1] * len(seeds) + [2] * len(extra)
    assert set(runs) == {(t, s) for t in TOPOLOGIES for s in D['seeds'][t]}
    for key, r in runs.items():
        for m in RUN_METRICS: assert _finite(r[m]), (key, m, r.get(m))
        assert 0 <= r['arc_easy'] <= 1 and 0 <= r['blimp'] <= 1 and r['wikitext_word_ppl'] > 1 and r['heldout_bpb'] > 0
        assert r['params'] == res['summary']['topologies'][key[0]]['params'] and r['lr'] == res['summary']['topologies'][key[0]]['lr']
        assert isinstance(r['generation_greedy'], str) and not Path(r['checkpoint']).is_absolute()
        curve = res['curves'][key[0]][str(key[1])]
        assert len(curve['loss']) == r['steps'] and curve['loss'][-1] == r['step_loss']
        assert abs(sum(curve['loss']) / len(curve['loss']) - r['train_loss']) < 1e-9
    # the shapes keep the seed's ratios: layers 4:2:1, widths 2:3:4
    t = res['summary']['topologies']
    assert [t[x]['n_layer'] for x in TOPOLOGIES] == [4 * t['shallow-wide']['n_layer'], 2 * t['shallow-wide']['n_layer'], t['shallow-wide']['n_layer']]
    assert [4 * t[x]['d_model'] // t['shallow-wide']['d_model'] for x in TOPOLOGIES] == [2, 3, 4]
    W = res['summary']['lr_walk']; base = res['plan']['base_lr']
    assert W['seed'] == W_SEED and all(W['seed'] not in D['seeds'][t] for t in TOPOLOGIES) and W['base_lr'] == base
    for x in TOPOLOGIES:   # every shape has its own LR walk, and the chosen LR is its lowest held-out loss
        walk = t[x]['runs']; ok = [r for r in walk if r['heldout_loss'] is not None]
        assert 3 <= len(walk) <= res['plan']['max_lr_runs'] and all(r['diverged'] is None or r['heldout_loss'] is None for r in walk)
        assert t[x]['heldout_loss'] == min(r['heldout_loss'] for r in ok)
        assert t[x]['lr'] == next(r['lr'] for r in ok if r['heldout_loss'] == t[x]['heldout_loss'])
        ks = sorted(round(math.log2(r['lr'] / base)) for r in walk); k = round(math.log2(t[x]['lr'] / base))
        assert ks == list(range(ks[0], ks[-1] + 1)) and {-1, 0, 1} <= set(ks)       # a contiguous ×2 walk through the start and its neighbours
        assert t[x]['edge'] == (not ks[0] < k < ks[-1])
    from supra.lab.experiment import ENVELOPE_KEYS
    assert list(res) == list(ENVELOPE_KEYS)
    S = {s['arm']: s for s in res['summary']['by_arm']}
    for m in ('wikitext_word_ppl', 'heldout_bpb', 'samples_s', 'arc_easy', 'blimp'):
        for x in TOPOLOGIES:
            ss = D['seeds'][x]
            assert S[x]['n_seeds'] == len(ss) and _finite(S[x][m])
            assert abs(S[x][m] - sum(runs[(x, sd)][m] for sd in ss) / len(ss)) < 1e-9
    assert 'comparisons' not in res['summary']     # measurements only: the tests are the paper's, by the verdict engine
    from supra.experiments.topology.paper import verdicts
    V = [v for v in verdicts(res) if v['kind'] == 'comparison']
    assert {(v['metric'], v['a'], v['b']) for v in V} >= {('wikitext_word_ppl', 'deep-narrow', 'balanced')}
    assert all(v['verdict'] in ('resolved', 'bounded', 'not testable here') for v in V) and 'tokens_s' not in {v['metric'] for v in V}
    assert all(_finite(v) and v > 0 for v in res['compute'].values()), res['compute']

def test_floor_fields_and_heldout_curves(smoke):
    "The n-gram floor counted from the same pool, BLiMP by field per run, and held-out loss written during training."
    res = smoke['results']; ng = res['summary']['ngram']
    assert ng['order'] == 3 and _finite(ng['heldout_bpb']) and ng['heldout_bpb'] > 0 and 0 <= ng['blimp'] <= 1 and ng['blimp_stderr'] > 0
    assert 0 <= ng['arc_easy'] <= 1 and 'wikitext_word_ppl' not in ng
    fields = ('blimp_morphology', 'blimp_syntax', 'blimp_semantics', 'blimp_syntax_semantics')
    for r in res['runs']:
        assert all(0 <= r[f] <= 1 for f in fields), r
        c = res['curves'][r['arm']][str(r['seed'])]['heldout']
        assert len(c['step']) >= 2 and c['step'][-1] == r['steps'] and c['step'] == sorted(c['step'])   # every 1/8 epoch and at the end
        assert all(_finite(x) and x > 0 for x in c['loss'] + c['bpb'])
    S = {s['arm']: s for s in res['summary']['by_arm']}
    assert all(_finite(S[t][f]) for t in TOPOLOGIES for f in fields)
    from supra.experiments.topology.paper import vs_floor
    v = vs_floor(res, 'heldout_bpb')
    assert set(v) == set(TOPOLOGIES) and all(abs(x['diff'] - (S[t]['heldout_bpb'] - ng['heldout_bpb'])) < 1e-9 for t, x in v.items())
    page = html.unescape(smoke['page'])
    for text in ('BLiMP by field', 'The n-gram floor', f"{ng['heldout_bpb']:.4f}", 'Training and held-out loss curves'): assert text in page, text

def test_paper(smoke):
    page, res = smoke['page'], smoke['results']
    for label in ('Active parameters', 'Pretrain step loss', 'Pretrain train loss', 'WikiText word PPL', 'ARC-Easy zero-shot',
                  'BLiMP', 'Held-out bits per byte', 'Throughput, samples/s', 'Chosen peak LR', 'Which differences are real?', 'The LR walk'):
        assert label in page, label
    assert page.count('data:image/svg+xml;base64,') == 5      # word PPL, bpb, throughput, loss curves, LR walk
    assert '<script' not in page and 'smoke' in page and 'CPU' in page
    for r in res['runs']:
        if r['seed'] == res['plan']['seeds'][0] and r['generation_greedy']:
            assert html.escape(r['generation_greedy'], quote=True) in page
    shown = f"{next(s for s in res['summary']['by_arm'] if s['arm'] == 'balanced')['wikitext_word_ppl']:,.2f}"   # table numbers are computed from results.json
    assert shown in page
    assert "The seed's claims" in html.unescape(page) and 'Throughput, Throughput' not in page
    from supra.experiments.topology.paper import seeds_text
    from supra.lab.verdict import staged
    D = res['summary']['design']                                                    # the seeds each shape ran, and how they were allocated
    assert seeds_text(res) in html.unescape(page) and ('Seeds by power' if staged(D['n1'], D['n_max']) else 'one fixed design of') in page
    ref = res['summary']['seed_reference']   # the seed's published numbers the paper quotes are recorded in results.json by the run
    assert ref['lr'] == 0.001178 and ref['samples_s']['balanced'] == 282.9
    assert f"{ref['lr']:.3e}" in page and f"×{ref['samples_s']['shallow-wide'] / ref['samples_s']['deep-narrow']:.2f}" in page


def test_findings_quote_only_results(smoke):
    "A results.json without the seed's reference numbers gives findings without them: nothing comes from constants."
    from supra.experiments.topology.paper import findings
    res = smoke['results']
    ref = {'lr': 0.5, 'samples_s': {'deep-narrow': 1.0, 'balanced': 2.0, 'shallow-wide': 4.0}}
    with_ref = ' '.join(t for l, t in findings(dict(res, summary=dict(res['summary'], seed_reference=ref))) if not l.startswith('Seed claim'))
    assert '5.000e-01' in with_ref and '×4.00' in with_ref
    sm = {k: v for k, v in res['summary'].items() if k != 'seed_reference'}
    without = ' '.join(t for l, t in findings(dict(res, summary=sm)) if not l.startswith('Seed claim'))
    assert 'the seed' not in without

def test_rerun_is_cached(smoke, monkeypatch):
    "Same parameters again (the notebook's calls, in this process): nothing is trained or evaluated anew, and the numbers are identical."
    tmp = smoke['tmp']
    before = _snapshot(smoke['cache_root'], tmp / 'out')
    n_walk = sum(len(smoke['results']['summary']['topologies'][t]['runs']) for t in TOPOLOGIES)
    assert len({Path(f).parents[1] for f in before}) == n_walk + len(smoke['results']['runs'])     # the run dirs: one per LR-walk run and per comparison run
    rerun_in_process(monkeypatch, 'topology', smoke['cache'], preset='smoke', out_dir=tmp / 'out', paper=tmp / 'topology.html')
    assert _snapshot(smoke['cache_root'], tmp / 'out') == before
    again = json.loads((tmp / 'out' / 'results.json').read_text())
    assert again['runs'] == smoke['results']['runs'] and again['summary']['topologies'] == smoke['results']['summary']['topologies']

@pytest.mark.parametrize('param,value,field', [('seeds', 'abc', 'seeds'), ('preset', 'fast', 'preset'), ('base_lr', 0, 'base_lr'), ('seeds', '0,99', 'seeds'),
                                               ('n_trials', 5, 'parameter'), ('seed', 1, 'parameter'), ('paper', '/proc/x.html', 'paper'), ('n_max', 1, 'n_max')])
def test_plan_refuses_a_bad_parameter(tmp_path, param, value, field):
    "In-process: the plan names the parameter, the value and what is allowed."
    from supra.experiments.topology.run import plan
    assert_plan_refuses(plan, field, **{'preset': 'smoke', 'out_dir': str(tmp_path / 'out'), 'paper': str(tmp_path / 'p.html'), param: value})
    assert not (tmp_path / 'out' / 'runs').exists()

def test_bad_parameter_fails_first(tmp_path):
    "End to end, once: papermill stops in the plan cell, before any compute."
    r = papermill(tmp_path / 'bad.ipynb', tmp_path / 'cache', preset='smoke', out_dir=tmp_path / 'out', paper=tmp_path / 'p.html', base_lr=-0.001)
    assert_stopped_in_plan_cell(r, tmp_path / 'bad.ipynb', 'base_lr')
    assert not (tmp_path / 'out' / 'runs').exists() and not (tmp_path / 'p.html').exists()
