"""flm end to end: `nbs/flm.ipynb` under papermill at the smoke preset (both arms, a pilot of two seeds and the two more of a fixed design of four: results.json, paper, dashboards),
bad parameters stopping its first cell, the train/test vocabulary split, an flm checkpoint loading in a fresh process,
and the live dashboard in headless Chromium."""
import json, math, os, subprocess, sys
from pathlib import Path
import numpy as np, pytest
from supra.train.runlog import RunLog
from conftest import nb_env, papermill as run_papermill, assert_plan_refuses, assert_stopped_in_plan_cell

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / 'nbs' / 'flm.ipynb'
PY = ROOT / '.venv' / 'bin' / 'python'

def _env(cache=None, **kw): return nb_env(cache, OMP_NUM_THREADS='1', **kw)

def papermill(out_nb, cache, **params): return run_papermill('flm', out_nb, env=_env(cache), **params)

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('flm')
    r = papermill(tmp / 'out.ipynb', tmp / 'cache', preset='smoke', out_dir=tmp / 'out', paper=tmp / 'flm.html')
    assert r.returncode == 0, r.stderr[-4000:]
    return dict(tmp=tmp, res=json.loads((tmp / 'out' / 'results.json').read_text()), page=(tmp / 'flm.html').read_text())

def _finite(v): return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

def test_results(smoke):
    res = smoke['res']
    from supra.lab.experiment import ENVELOPE_KEYS
    from supra.experiments.flm.run import PROBES, CONTROL
    from supra.experiments.flm.paper import targets, verdicts
    from scipy import stats
    from supra.lab.verdict import stage2_for, staged
    assert list(res) == list(ENVELOPE_KEYS) and res['corpus'] == 'flm-programmatic' and res['preset'] == 'smoke'
    runs, D = {(r['arm'], r['seed']) for r in res['runs']}, res['summary']['design']
    assert runs == {(a, s) for a in ('geometry', 'no_geometry') for s in D['seeds'][a]} and D['seeds']['geometry'] == D['seeds']['no_geometry']
    assert D['seeds']['geometry'] == [*res['plan']['seeds'], *range(2, 2 + D['n2']['geometry'])] and len(D['seeds']['geometry']) <= D['n_max'] == 4
    assert [r['stage'] for r in res['runs'] if r['arm'] == 'geometry'] == [1] * D['n1'] + [2] * D['n2']['geometry']
    for r in res['runs']:
        for k in PROBES + CONTROL: assert _finite(r[k]), (r['arm'], k)
        assert 1 <= r['erank90'] <= r['erank95'] and 0 <= r['test_token_acc'] <= 1
        assert (smoke['tmp'] / 'out' / r['dashboard']).is_file()
        c = res['curves'][r['arm']][str(r['seed'])]
        assert c['step'][-1] == r['steps'] and len(c['step']) >= 2 and c['analogy'][-1] == r['analogy']   # probes during training, not only at the end
    for arm, t in targets(res).items(): assert set(t) == {'analogy', 'cluster_gap', 'dir_consistency', 'word_order_sim'}
    V = [v for v in verdicts(res) if v['kind'] == 'comparison']
    assert {v['metric'] for v in V} == {'analogy', 'cluster_gap', 'dir_consistency', 'word_order_sim', 'test_token_acc',
                                        'analogy_train', 'cluster_gap_train', 'dir_consistency_train', 'word_order_sim_train', 'train_token_acc'}
    X = {(r['arm'], r['seed']): r for r in res['runs']}
    for k, n in D['need'].items():      # a pilot of 2 cannot size a second stage: the rest of the budget, whatever the pilot showed
        assert n == stage2_for([X['geometry', s][k] - X['no_geometry', s][k] for s in res['plan']['seeds']], D['target'], D['n_max'], D['family_size']) == 2
    assert not staged(D['n1'], D['n_max']) and D['family_size'] == len(V) == 10
    for v in V:                         # one fixed design of 4: each test is the plain paired t over all four seeds
        assert v['stage_seeds'] is None and v['n'] == 4
        assert abs(v['p'] - stats.ttest_rel([X['geometry', s][v['metric']] for s in range(4)], [X['no_geometry', s][v['metric']] for s in range(4)]).pvalue) < 1e-12
    assert 'comparisons' not in res['summary'] and 'targets' not in res['summary']   # the paper judges; the run stores measurements

def test_geometry_losses_only_in_the_geometry_arm(smoke):
    out = smoke['tmp'] / 'out'
    for r in smoke['res']['runs']:
        log = RunLog(out / r['run_dir']); log.poll()
        assert log.bad == 0 and log.nrows == r['steps']
        steps, wo = log.series('word_order')
        geo = steps[~np.isnan(wo)].astype(int).tolist()
        if r['arm'] == 'geometry': assert geo == [s for s in range(1, r['steps'] + 1) if (s - 1) % 5 == 0]
        else: assert geo == []
        present = lambda k: ~np.isnan(log.column(k)) if k in log.train_keys() else np.zeros(log.nrows, bool)
        assert present('recon_loss').all() and present('infonce').all() and (present('para_loss') != present('parse_loss')).all()

def test_paper(smoke):
    page = smoke['page']
    for s in ('Concept Bottleneck', "The seed&#39;s targets", 'geometry on vs off', 'Probe trajectories', 'p (Holm)', 'The positive control', 'Positive control — '):
        assert s in page or s.replace('&#39;', "'") in page, s

def test_bad_parameter_stops_first_cell(tmp_path):
    "End to end, once: papermill stops in the plan cell, before any compute."
    r = papermill(tmp_path / 'o.ipynb', tmp_path / 'cache', out_dir=tmp_path / 'out', paper=tmp_path / 'p.html', epoch=3)
    assert_stopped_in_plan_cell(r, tmp_path / 'o.ipynb', 'parameter')
    assert not (tmp_path / 'out' / 'runs').exists()

@pytest.mark.parametrize('bad,field', [(dict(seeds='abc'), 'seeds'), (dict(corpus='wikipedia-en'), 'corpus'), (dict(geometry='maybe'), 'geometry'),
                                       (dict(preset='cpu', seeds='0'), 'seeds'), (dict(paper='x.pdf'), 'paper'), (dict(preset='fast'), 'preset'),
                                       (dict(epoch=3), 'parameter'), (dict(seeds=[0, 1, 2], n_max=2), 'n_max')])
def test_plan_refuses(tmp_path, bad, field):
    from supra.experiments.flm.run import plan
    assert_plan_refuses(plan, field, **{'preset': 'smoke', 'out_dir': str(tmp_path / 'out'), 'paper': None, **bad})

def test_vocabulary_separation():
    import random
    from supra.flm.data import FLMData, FLMDataConfig, split_vocab, leaked, geometry_items, _sentences, words_of
    tr, te = split_vocab()
    assert not tr & te
    data = FLMData(FLMDataConfig(n_pairs=3000, n_test=64, seed=3))
    texts = [s for t in data.train_text for s in t] + [s for k in range(20) for s in _sentences(geometry_items(random.Random(k), 'train'))]
    assert leaked(texts) == set()
    assert all(words_of([t[0]]) & te for t in data.test_text)
    vocab = data.tokenizer.get_vocab()                         # no tokenizer entry is a whole test word (a word-initial piece)
    assert not {t[1:] for t in vocab if t.startswith('Ġ')} & te

def test_checkpoint_loads_in_a_fresh_process(smoke):
    r0 = smoke['res']['runs'][0]
    ck = smoke['tmp'] / 'out' / r0['run_dir'] / 'final'
    code = ("import sys, supra.flm.model; from supra.model.checkpoint import load_checkpoint; m, meta = load_checkpoint(sys.argv[1]); "
            "print(type(m).__name__, meta['family'], m.n_params())")
    out = subprocess.run([str(PY), '-c', code, str(ck)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ['FLM', 'flm', str(r0['params'])]

def test_dashboard_in_chromium(smoke):
    sys.path.insert(0, str(ROOT))
    from tests.browser import Page, foreign_requests
    from supra.flm.dashboard import PANELS, write_flm_dashboard
    r0 = next(r for r in smoke['res']['runs'] if r['arm'] == 'geometry')
    run = smoke['tmp'] / 'out' / r0['run_dir']
    page_path = write_flm_dashboard(run)
    with Page() as page:
        page.goto(page_path.as_uri())
        titles = page.eval("[...document.querySelectorAll('.panel h2')].map(e => e.textContent)")
        assert titles == [t for t, _, _ in PANELS]
        drawn = page.eval("[...document.querySelectorAll('.panel')].map(p => [p.dataset.panel, p.querySelectorAll('svg polyline, svg circle').length])")
        empty = [t for t, n in drawn if n == 0 and t != 'WordNet Losses']     # WordNet is off at the smoke preset
        assert not empty, empty
        assert page.eval("document.querySelectorAll('#setup tr').length") == 6
        assert page.eval("document.querySelector('#diagnostics').textContent").count('[') >= 5
        guide = page.eval("document.querySelector('#ref').textContent")
        for t in ('Push top-8 most similar unrelated pairs below sim 0.1. Weight 1.0.', 'a−b+c≅d cosine score (test vocab). Want >0.8.',
                  'Exponential moving average of exact match (decay=0.99).'): assert t in guide
        assert 'target' in page.eval("document.querySelector('[data-panel=\"Analogy & Word Order\"]').textContent")
        assert page.eval("document.querySelector('#status').textContent") == 'done'
        assert foreign_requests(page.requests) == []

def test_a_collapsed_representation_meets_no_target():
    "The published flm run's bottleneck has effective rank 1-2 of 512 in every seed: its probe values count for no target."
    from supra.core.cache import read_json
    from supra.experiments.flm.paper import targets, collapsed, findings
    res = read_json(ROOT / 'outputs' / 'flm' / 'results.json')
    assert all(collapsed(res, a) is not None for a in targets(res))
    assert {v['status'] for t in targets(res).values() for v in t.values()} == {'not testable here'}
    assert 'collapsed' in findings(res)[0][1] and 'met**' not in findings(res)[0][1]
