"""The golf experiment end to end: `nbs/golf.ipynb` under papermill at the smoke preset (baseline, full stack and an ablation,
each on the same two seeds and trained for the same step budget on a pool no run exhausts, artefacts round-tripped and scored,
their size and bits per byte re-checked by independent paths, BLiMP/ARC-Easy of the quantised artefacts, results.json,
the paper), the artefacts on disk checked against the envelope, and a bad parameter stopping the first cell."""
import json, math, os, subprocess
from pathlib import Path
import pytest
from conftest import nb_env, papermill as run_papermill, assert_plan_refuses, assert_stopped_in_plan_cell

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / 'nbs' / 'golf.ipynb'

def _env(cache=None, **kw): return nb_env(cache, **kw)

def papermill(out_nb, cache, **params): return run_papermill('golf', out_nb, env=_env(cache), **params)

def _finite(v): return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('golf')
    r = papermill(tmp / 'out.ipynb', tmp / 'cache', preset='smoke', out_dir=tmp / 'out', paper=tmp / 'golf.html')
    assert r.returncode == 0, r.stderr[-4000:]
    return dict(tmp=tmp, results=json.loads((tmp / 'out' / 'results.json').read_text()), page=(tmp / 'golf.html').read_text())

def test_results_complete(smoke):
    res, sm = smoke['results'], smoke['results']['summary']
    assert res['experiment'] == 'golf' and res['preset'] == 'smoke'
    arms = {(r['arm'], r['seed']) for r in res['runs']}
    assert arms == {(a, s) for a in ('baseline', 'full', 'no-qat') for s in (0, 1)}
    for r in res['runs']:
        for k in ('bpb', 'bpb_before', 'quant_gap', 'artefact_bytes', 'steps', 'train_s', 'epochs'): assert _finite(r[k]), (r['arm'], k)
        assert 0 < r['bpb'] < 10 and r['fits'] == (r['artefact_bytes'] <= sm['byte_budget'])
        assert abs(r['quant_gap'] - (r['bpb'] - r['bpb_before'])) < 1e-12
        if r['arm'] in ('baseline', 'full'): assert 0 <= r['blimp'] <= 1 and 0 <= r['arc_easy'] <= 1
    assert sm['record']['bpb'] == 1.1243
    assert not {'headline', 'ablation'} & set(sm)                      # measurements only: the paper runs the tests

def test_same_steps_same_seeds_no_repeats(smoke):
    "A step budget: every run exactly the plan's steps and tokens; every arm on the same seeds; no training window served twice."
    res, sm = smoke['results'], smoke['results']['summary']
    b, pool = sm['budget'], sm['pool']
    assert b['kind'] == 'steps' and b['steps'] == 30 and b['budget_s'] is None and b['same_steps']
    assert {r['steps'] for r in res['runs']} == {30} and {r['budget'] for r in res['runs']} == {'steps'}
    assert {r['tokens'] for r in res['runs']} == {30 * b['tokens_per_step']} == {pool['tokens_per_run_max']}
    assert len({tuple(s) for s in sm['seeds'].values()}) == 1 and set(sm['seeds']) == {'baseline', 'full', 'no-qat'}
    assert pool['n_tokens'] >= 30 * b['tokens_per_step'] + 1 and pool['n_tokens'] == res['data']['n_tokens']
    assert all(0 < r['epochs'] <= 1 for r in res['runs']) and not pool['repeats'] and pool['epochs_max'] <= 1
    assert abs(pool['epochs_max'] - 30 * 16 / pool['windows']) < 1e-12           # steps × batch windows / windows in the pool

def test_independent_checks(smoke):
    "Every artefact's size by plain zstd-22 and its bits per byte by the independent scorer agree with Supra's, within the stated tolerances."
    res, ck = smoke['results'], smoke['results']['summary']['checks']
    assert ck['size']['all_agree'] and ck['size']['all_roundtrip'] and ck['bpb']['all_agree']
    assert ck['size']['level'] == 22 and ck['size']['n'] == ck['bpb']['n'] == len(res['runs'])
    for r in res['runs']:
        s, b = r['checks']['size'], r['checks']['bpb']
        assert s['file_bytes'] == r['artefact_bytes'] and s['parts_ok'] and s['payload_ok'] and s['roundtrip'] and s['module_diff_bytes'] == 0
        assert abs(r['artefact_bytes_check'] - r['artefact_bytes']) <= s['tol'] * r['artefact_bytes']
        assert abs(r['bpb_check'] - r['bpb_disjoint']) <= b['tol'] == 1e-4 and b['agree']
    assert len({r['checks']['bpb']['bytes'] for r in res['runs']}) == 1                # every artefact scored on the same held-out bytes

def test_paired_verdicts(smoke):
    "The paper's tests: the verdict engine, each comparison paired over the two seeds both arms ran."
    from supra.experiments.golf.paper import verdicts
    V = verdicts(smoke['results'])
    assert [(v['a'], v['b']) for v in V] == [('full', 'baseline'), ('no-qat', 'full')]
    assert all(v['n'] == 2 and v['family_size'] == 2 and v['p'] is not None for v in V)

def test_artefacts_on_disk(smoke):
    "Each artefact's recorded size is its file's size, and it reloads to the fake-quantised weights of the trained checkpoint, bit for bit."
    import torch
    import supra.golf.model    # registers the 'golf' family (a checkpoint names its family; the module defining it must be imported)
    from supra.model.checkpoint import load_checkpoint
    from supra.golf.quant import load_artefact, fake_quantised_state
    out = smoke['tmp'] / 'out'
    for r in smoke['results']['runs']:
        f = out / r['artefact']
        assert f.stat().st_size == r['artefact_bytes']
        model, _ = load_checkpoint(out / r['run_dir'] / 'final')
        art, header = load_artefact(f)
        fq = fake_quantised_state(model)
        assert all(torch.equal(art.state_dict()[n], fq[n]) for n in fq)
        assert header['family'] == ('transformer' if r['arm'] == 'baseline' else 'golf')

def test_paper(smoke):
    page, res = smoke['page'], smoke['results']
    for label in ('Baseline vs full stack', 'Ablation: each technique off in turn', 'The record beside Supra', 'Late QAT', '1.1243', '16,000,000',
                  'Every artefact, checked twice', 'every run trained exactly 30 steps', 'no token repeats', 'Not ablated at this preset'):
        assert label in page, label
    assert page.count('data:image/svg+xml;base64,') == 2 and '<script' not in page and 'smoke' in page
    full = next(s for s in res['summary']['by_arm'] if s['arm'] == 'full')
    assert f"{full['bpb']:.4f}" in page

def test_bad_parameter_fails_first(tmp_path):
    r = papermill(tmp_path / 'bad.ipynb', tmp_path / 'cache', preset='smoke', out_dir=tmp_path / 'out', paper=tmp_path / 'p.html', techniques='bigram,warp')
    assert_stopped_in_plan_cell(r, tmp_path / 'bad.ipynb', 'techniques')
    assert not (tmp_path / 'p.html').exists()
