"""Experiment #5 (the efficiency stack) end to end: `nbs/curriculum.ipynb` under papermill at the smoke preset (two pools,
every arm and seed, speed-ups, claims, results.json, paper); a curriculum run killed with SIGKILL mid-stage resuming to the
uninterrupted result; FP8 refused here with its reason; a bad parameter stopping the first cell."""
import html, inspect, json, math, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np, pytest, torch
from supra.train.runlog import RunLog
from conftest import nb_env, papermill as run_papermill, assert_plan_refuses, assert_stopped_in_plan_cell, bigram_pool, kill_at_rows, one_thread

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / 'nbs' / 'curriculum.ipynb'

def _env(cache=None, **kw): return nb_env(cache, OMP_NUM_THREADS='1', SUPRA_NO_JEMALLOC='1', **kw)

def papermill(out_nb, cache, **params): return run_papermill('curriculum', out_nb, env=_env(cache), **params)

def _finite(v): return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('curriculum')
    r = papermill(tmp / 'out.ipynb', tmp / 'cache', preset='smoke', device='cpu', out_dir=tmp / 'out', paper=tmp / 'curriculum.html')
    assert r.returncode == 0, r.stderr[-4000:]
    return dict(tmp=tmp, results=json.loads((tmp / 'out' / 'results.json').read_text()), page=(tmp / 'curriculum.html').read_text())

def test_results_complete_and_consistent(smoke):
    from supra.lab.experiment import ENVELOPE_KEYS
    from supra.experiments.curriculum.run import seed_speedups, curriculum_stages
    res = smoke['results']; pl, sm = res['plan'], res['summary']
    assert list(res) == list(ENVELOPE_KEYS) and res['preset'] == 'smoke' and res['environment']['device'] == 'cpu'
    arms, seeds = pl['arms'], pl['seeds']
    assert 'fp8' not in arms and {'baseline', 'curriculum', 'superbpe', 'superbpe-curriculum', 'factorised', 'gqa'} == set(arms)
    runs = {(r['arm'], r['seed']): r for r in res['runs']}
    d = sm['design']; extra = list(range(max(seeds) + 1, max(seeds) + 1 + d['n2']))
    assert 2 <= d['n2'] <= d['n_max'] - len(seeds)                     # the second stage ran, within the budget
    assert set(runs) == {(a, s) for a in arms for s in seeds} | {(a, s) for a in d['staged'] for s in extra}
    assert {r['stage'] for r in res['runs'] if r['seed'] in extra} == {2} and {r['stage'] for r in res['runs'] if r['seed'] in seeds} == {1}
    lc = sm['lr_check']                                                  # the baseline's LR, checked at its batch on a seed nothing else uses
    assert [r['lr_factor'] for r in lc['runs']] == [0.5, 1.0, 2.0] and lc['seed'] not in seeds + extra
    assert lc['chosen'] == min((r for r in lc['runs'] if not r['diverged']), key=lambda r: r['final_bpb'])['lr'] == pl['preset']['train']['lr']
    assert {r['lr'] for r in res['runs']} == {lc['chosen']}
    tokens = {r['tokens'] for r in runs.values()}
    assert tokens == {pl['steps'] * pl['tokens_per_step']}            # equal tokens: every arm reads one epoch of the same size
    for r in runs.values():
        for k in ('final_bpb', 'train_s', 'tok_s', 'chars_per_token'): assert _finite(r[k]) and r[k] > 0, (r['arm'], k)
    base = runs[('baseline', seeds[0])]
    assert runs[('factorised', seeds[0])]['params'] < base['params'] and runs[('gqa', seeds[0])]['params'] < base['params']
    assert runs[('gqa', seeds[0])]['kv_per_token'] * pl['kv_ratio'] == base['kv_per_token']
    stages = curriculum_stages(pl['seq_lens'], pl['tokens_per_step'], pl['steps'], pl['last_frac'], pl['lr_floor'])
    starts = list(np.cumsum([0] + [s.steps for s in stages])[:-1])
    for a in arms:
        for s in seeds + (extra if a in d['staged'] else []):
            c = res['curves'][a][str(s)]
            assert c['step'][-1] == pl['steps'] and len(c['bpb']) == len(c['train_s']) == len(c['tokens']) >= 2
            if 'curriculum' in a:   # the stage boundaries, as the trainer wrote them
                assert [z['seq_len'] for z in c['stages']] == list(pl['seq_lens']) and [z['at_step'] for z in c['stages']] == starts
            else: assert [(z['seq_len'], z['at_step']) for z in c['stages']] == [(max(pl['seq_lens']), 0)]   # one warmed-up stage
    for a, v in sm['speedups'].items():   # the speed-ups are what the curves say
        again = seed_speedups(res['curves']['baseline'], res['curves'][a])
        for x in ('tokens', 'train_s'): assert v[x]['per_seed'] == json.loads(json.dumps(again[x])), (a, x)
    assert 'claims' not in sm and 'comparisons' not in sm                # the run measures; the paper's engine judges
    from supra.experiments.curriculum.paper import verdicts
    V = {r['label'].split(':')[0]: r for r in verdicts(res)}
    assert V['FP8']['verdict'] == 'not testable here' and 'CUDA' in V['FP8']['reason']
    from supra.lab.verdict import staged
    two = staged(len(seeds), d['n_max'])                                 # the smoke preset's pilot of 2: one fixed design of 4
    assert V['Sequence-length curriculum']['n'] == len(seeds) + d['n2'] and ('two stages' in V['Sequence-length curriculum']['test']) == two
    assert sum(r['p'] is not None for r in verdicts(res)) == d['family_size']   # the family the power rule assumed
    ng = sm['ngram']                                                      # the floor: a trigram counted from the baseline's pool, on the same text
    assert ng['order'] == 3 and ng['tokenizer'] == 'bpe' and _finite(ng['heldout_bpb']) and ng['heldout_bpb'] > 0
    fl = [r for r in verdicts(res) if r['kind'] == 'versus']              # each arm on that pool tested against it, none on SuperBPE's
    assert {r['a'] for r in fl} == {'baseline', 'curriculum', 'factorised', 'gqa'} and {r['reference'] for r in fl} == {ng['heldout_bpb']}
    for r in fl: assert math.isclose(r['effect'], np.mean([x['final_bpb'] for x in res['runs'] if x['arm'] == r['a']]) - ng['heldout_bpb'], abs_tol=1e-9)
    t = sm['tokenizers']
    assert t['bpe']['chars'] == t['superbpe']['chars'] and _finite(t['superbpe']['chars_per_token'])   # the same held-out text
    assert set(sm['multiply']['tokens']) >= {'ratio', 'product', 'together', 'per_seed'} and 'verdict' not in sm['multiply']['tokens']
    assert sm['model']['n_params'] == base['params']

def test_paper(smoke):
    page, res = html.unescape(smoke['page']), smoke['results']
    for s in ("The seed's claims", 'Do the factors multiply?', 'not testable here', 'Each arm against the baseline', 'Every arm at equal tokens', 'The curriculum', 'CUDA',
              "checked at its batch", 'Seeds, one fixed design', 'one fixed design of 4 seeds', "Each arm against the trigram counted from the baseline's pool", 'The n-gram floor'):
        assert s in page, s
    assert smoke['page'].count('data:image/svg+xml;base64,') == len(res['summary']['speedups']) + 1
    assert '<script' not in smoke['page'] and 'smoke' in page
    b = next(a for a in res['summary']['by_arm'] if a['arm'] == 'baseline')
    assert f"{b['final_bpb']:.4f}" in page and f"{res['summary']['ngram']['heldout_bpb']:.4f}" in page   # numbers come from results.json

def curriculum_run(mcfg:str, tcfg:str, pool_file, out):
    "The experiment's own train_run with the curriculum (SliceStages) and the held-out hook on a toy pool: the run killed with SIGKILL below."
    import json, numpy as np
    from supra.core.config import ModelConfig, TrainConfig
    from supra.train.hooks import heldout_hook
    from supra.experiments.curriculum.run import train_run, curriculum_stages
    pool = np.load(pool_file, mmap_mode='r')
    hook = heldout_hook(pool[40_000:], 32, token_bytes=np.ones(64, dtype=np.int64))
    return train_run(pool[:40_000], ModelConfig.from_dict(json.loads(mcfg)), TrainConfig.from_dict(json.loads(tcfg)), str(out), curriculum_stages((8, 16, 32), 256, 150), hook)

# the same function in a subprocess (one torch thread), which prints its result
SCRIPT = inspect.getsource(curriculum_run) + 'import json, sys, torch\ntorch.set_num_threads(1)\nprint(json.dumps(curriculum_run(*sys.argv[1:])))\n'

def test_curriculum_run_resumes_after_sigkill(tmp_path):
    "train_run with the curriculum, killed with SIGKILL inside its second stage, resumes to the uninterrupted run: same rows, same weights."
    from supra.core.config import ModelConfig, TrainConfig
    from supra.model.checkpoint import read_meta, load_checkpoint
    np.save(tmp_path / 'pool.npy', bigram_pool(45_000))
    mcfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, seq_len=32)
    tcfg = TrainConfig(batch_size=8, seq_len=32, lr=3e-3, warmup_frac=0.1, cooldown_frac=0.3, ckpt_every_s=0.02, eval_every=10)
    cmd = lambda out: [sys.executable, '-c', SCRIPT, mcfg.to_json(), tcfg.to_json(), str(tmp_path / 'pool.npy'), str(out)]
    with one_thread(): curriculum_run(mcfg.to_json(), tcfg.to_json(), tmp_path / 'pool.npy', tmp_path / 'ref')   # uninterrupted, in this process
    run = tmp_path / 'killed'
    p = subprocess.Popen(cmd(run), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_at_rows(p, run / 'metrics.jsonl', 55)     # stages of 45, 45, 60 steps: kill inside the second
    at = read_meta(run / 'last')
    assert at['loader']['kind'] == 'stages' and at['loader'].get('slices') and 0 < at['step'] < 150, at['loader']
    res = subprocess.run(cmd(run), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    def logged(d):                                 # (train rows, eval rows, events) as the one reader sees them, timings left out
        log = RunLog(d); log.poll(); assert log.bad == 0
        strip = lambda r: {k: v for k, v in r.items() if k not in ('tok_s', 'elapsed', 'train_s', 'eval_s')}
        return [strip(r) for b in log.branches.values() for r in b['rows']], [(s, strip(ev), br) for s, ev, br in log.evals], [strip(e) for e in log.events]
    a, b = logged(tmp_path / 'ref'), logged(run)
    assert a == b and len(a[0]) == 150 and a[1]    # every train, eval and stage row, once, bitwise
    assert [e['at_step'] for e in b[2] if e.get('event') == 'stage'] == [0, 45, 90]
    m1, _ = load_checkpoint(tmp_path / 'ref' / 'final'); m2, _ = load_checkpoint(run / 'final')
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))

def test_fp8_refused_here_with_reason(tmp_path):
    "No GPU on this machine: the capability check refuses and names CUDA; the plan leaves FP8 out and keeps the reason."
    from supra.model.fp8 import fp8_support, require_fp8, Fp8Unavailable
    from supra.experiments.curriculum.run import plan
    if torch.cuda.is_available(): pytest.skip('a CUDA device is present')
    s = fp8_support('cpu')
    assert not s.available and 'CUDA GPU' in s.reason
    with pytest.raises(Fp8Unavailable, match='CUDA'): require_fp8('auto')
    p = plan(preset='smoke', device='cpu', out_dir=tmp_path / 'o', paper=None)
    assert 'fp8' not in p.arms and p.fp8_reason == s.reason

def test_bad_parameter_fails_first(tmp_path):
    r = papermill(tmp_path / 'bad.ipynb', tmp_path / 'cache', preset='smoke', device='cpu', out_dir=tmp_path / 'out', paper=tmp_path / 'p.html', stages=3)
    assert_stopped_in_plan_cell(r, tmp_path / 'bad.ipynb', 'parameter')
    assert not (tmp_path / 'p.html').exists() and not (tmp_path / 'out' / 'runs').exists()
