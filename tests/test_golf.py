"""The golf experiment end to end: `nbs/golf.ipynb` under papermill at the smoke preset (baseline, full stack and an ablation
trained for a wall-clock budget, artefacts round-tripped and scored, BLiMP/ARC-Easy of the quantised artefacts, results.json,
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
    res = smoke['results']
    assert res['experiment'] == 'golf' and res['preset'] == 'smoke'
    arms = {(r['arm'], r['seed']) for r in res['runs']}
    assert arms == {('baseline', 0), ('full', 0), ('no-qat', 0)}
    for r in res['runs']:
        for k in ('bpb', 'bpb_before', 'quant_gap', 'artefact_bytes', 'steps', 'train_s'): assert _finite(r[k]), (r['arm'], k)
        assert 0 < r['bpb'] < 10 and r['steps'] >= 1 and r['fits'] == (r['artefact_bytes'] <= res['summary']['byte_budget'])
        assert abs(r['quant_gap'] - (r['bpb'] - r['bpb_before'])) < 1e-12
        assert r['train_s'] >= res['summary']['budget_s'] or r['steps'] == 0   # trained to the budget
        if r['arm'] in ('baseline', 'full'): assert 0 <= r['blimp'] <= 1 and 0 <= r['arc_easy'] <= 1
    h = res['summary']['headline']
    assert (h['a'], h['b']) == ('full', 'baseline') and res['summary']['record']['bpb'] == 1.1243

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
    for label in ('Baseline vs full stack', 'Ablation: each technique off in turn', 'The record beside Supra', 'Late QAT', '1.1243', '16,000,000'):
        assert label in page, label
    assert page.count('data:image/svg+xml;base64,') == 2 and '<script' not in page and 'smoke' in page
    full = next(s for s in res['summary']['by_arm'] if s['arm'] == 'full')
    assert f"{full['bpb']:.4f}" in page

def test_bad_parameter_fails_first(tmp_path):
    r = papermill(tmp_path / 'bad.ipynb', tmp_path / 'cache', preset='smoke', out_dir=tmp_path / 'out', paper=tmp_path / 'p.html', techniques='bigram,warp')
    assert_stopped_in_plan_cell(r, tmp_path / 'bad.ipynb', 'techniques')
    assert not (tmp_path / 'p.html').exists()
