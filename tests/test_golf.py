"""The golf experiment end to end: `nbs/golf.ipynb` under papermill at the smoke preset (baseline, full stack and an ablation,
each on the same two seeds and trained for the same step budget on a pool no run exhausts, artefacts round-tripped and scored,
their size and bits per byte re-checked by independent paths, BLiMP/ARC-Easy of the quantised artefacts, results.json,
the paper), the artefacts on disk checked against the envelope, and a bad parameter stopping the first cell."""
import inspect, json, math, os, subprocess, sys
from pathlib import Path
import pytest
from conftest import nb_env, papermill as run_papermill, assert_plan_refuses, assert_stopped_in_plan_cell, bigram_pool, kill_at_rows, one_thread

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
    arms = {(r['arm'], r['seed'], r['stage']) for r in res['runs']}      # a pilot of 2 seeds, then the 1 more of a fixed design of 3
    assert arms == {(a, s, 1 if s < 2 else 2) for a in ('baseline', 'full', 'no-qat') for s in (0, 1, 2)}
    for r in res['runs']:
        for k in ('bpb', 'bpb_before', 'quant_gap', 'artefact_bytes', 'steps', 'train_s', 'epochs'): assert _finite(r[k]), (r['arm'], k)
        assert 0 < r['bpb'] < 10 and r['fits'] == (r['artefact_bytes'] <= sm['byte_budget'])
        assert abs(r['quant_gap'] - (r['bpb'] - r['bpb_before'])) < 1e-12
        if r['arm'] in ('baseline', 'full') and r['stage'] == 1: assert 0 <= r['blimp'] <= 1 and 0 <= r['arc_easy'] <= 1
        else: assert 'blimp' not in r                                   # downstream on the pilot's seeds only
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
    """The paper's tests: the verdict engine, each comparison paired over the seeds both arms ran. A pilot of 2 cannot size a second stage
    (`staged`), so the smoke preset's 3 seeds are one fixed design and each test is the plain paired t over all three."""
    from supra.experiments.golf.paper import verdicts
    from scipy import stats
    from supra.lab.verdict import stage2_for, staged
    res = smoke['results']; d = res['summary']['design']
    V = verdicts(res); C = [v for v in V if v['kind'] == 'comparison']
    assert [(v['a'], v['b']) for v in C] == [('full', 'baseline'), ('no-qat', 'full')]
    assert all(v['n'] == 3 and v['stage_seeds'] is None and 'two stages' not in v['test'] and v['family_size'] == 3 and v['p'] is not None for v in C)
    assert not staged(d['n1'], d['n_max']) and 'one fixed design of 3 seeds' in smoke['page']
    assert (d['n1'], d['n_max'], d['family_size'], d['target']) == (2, 3, 2, 0.1)
    bl = next(v for v in V if v['kind'] == 'versus')                      # BLiMP of the artefacts, full − baseline, item by item
    assert bl['a'] == 'full − baseline' and bl['test'].startswith('bootstrap over') and bl['n'] == 2 and bl['family_size'] == 3
    assert all(0 <= r['blimp_ties'] <= 1 and r['blimp_items'] for r in res['runs'] if 'blimp' in r)
    bpb = {(r['arm'], r['seed']): r['bpb'] for r in res['runs']}
    for (a, b), v in zip((('full', 'baseline'), ('no-qat', 'full')), C):   # the rest of the budget, whatever the pilot showed
        assert d['need'][f'{a}|{b}'] == stage2_for([bpb[a, s] - bpb[b, s] for s in (0, 1)], 0.1, 3, 2) == 1
        assert abs(v['p'] - stats.ttest_rel([bpb[a, s] for s in range(3)], [bpb[b, s] for s in range(3)]).pvalue) < 1e-12   # scipy's paired t

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

def golf_run(mcfg:str, tcfg:str, gcfg:str, pool_file, out) -> dict:
    "A step-budget golf run (every technique of the hook on) on a toy pool: the run killed with SIGKILL below."
    import json, numpy as np
    from supra.core.config import TrainConfig
    from supra.golf.model import GolfConfig
    from supra.golf.train import GolfTrainConfig, train_golf
    return train_golf(np.load(pool_file, mmap_mode='r'), GolfConfig.from_dict(json.loads(mcfg)), TrainConfig.from_dict(json.loads(tcfg)),
                      GolfTrainConfig.from_dict(json.loads(gcfg)), str(out))

# the same function in a subprocess (one torch thread), which prints its result
GOLF_SCRIPT = inspect.getsource(golf_run) + 'import json, sys, torch\ntorch.set_num_threads(1)\nprint(json.dumps(golf_run(*sys.argv[1:])))\n'

def test_golf_run_resumes_after_sigkill(tmp_path):
    "train_golf on the trainer, killed with SIGKILL after SWA has started, resumes to the uninterrupted run: same rows, same averaged weights."
    import numpy as np, torch
    from supra.core.config import TrainConfig
    from supra.golf.model import GolfConfig
    from supra.golf.train import GolfTrainConfig
    from supra.model.checkpoint import read_meta, load_checkpoint
    np.save(tmp_path / 'pool.npy', bigram_pool(45_000))
    mcfg = GolfConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=1, vocab_size=64, seq_len=32, mlp='relu2', mlp_hidden=96,
                      bigram_buckets=64, bigram_dim=16, smear=True, unet=True, ortho_init=True, embed_lr=0.035, scalar_lr=0.025)
    tcfg = TrainConfig(batch_size=8, seq_len=32, optimizer='muon', lr=0.02, muon_lr=0.02, weight_decay=0.04, grad_clip=0.3, ckpt_every_s=0.02)
    gcfg = GolfTrainConfig(budget_s=None, steps=150, warmup_steps=5, warmdown_frac=0.5, momentum_warmup=50, ema=0.9,
                           swa_threshold=0.6, swa_every=3, qat_threshold=0.4)
    cmd = lambda out: [sys.executable, '-c', GOLF_SCRIPT, mcfg.to_json(), tcfg.to_json(), gcfg.to_json(), str(tmp_path / 'pool.npy'), str(out)]
    with one_thread(): a = golf_run(mcfg.to_json(), tcfg.to_json(), gcfg.to_json(), tmp_path / 'pool.npy', tmp_path / 'ref')   # uninterrupted, in this process
    run = tmp_path / 'killed'
    p = subprocess.Popen(cmd(run), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_at_rows(p, run / 'metrics.jsonl', 125)           # SWA collects from step ~106, QAT from ~120
    at = read_meta(run / 'last')
    assert 0 < at['step'] < 150 and at['step_hook_state']['n_swa'] > 0, at['step_hook_state']
    res = subprocess.run(cmd(run), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    b = json.loads(res.stdout.splitlines()[-1])
    assert (a['step'], a['n_swa'], a['qat_from'], a['averaged']) == (b['step'], b['n_swa'], b['qat_from'], 'swa') and a['qat_from'] is not None
    rows = lambda d: [json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ('tok_s', 'elapsed', 'train_s')} for r in rs]
    assert strip(rows(tmp_path / 'ref')) == strip(rows(run))              # every row once, bitwise
    m1, _ = load_checkpoint(tmp_path / 'ref' / 'final'); m2, _ = load_checkpoint(run / 'final')
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))
