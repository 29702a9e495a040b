"""Trainer tests that need subprocesses or more time than a lesson cell: SIGKILL resume, DDP, the CLI.

Every training here runs on a tiny model and a tiny synthetic token pool (a random bigram process, saved as .npy),
so the file finishes in well under three minutes on two CPU cores. Subprocesses use one torch thread, so runs are
bitwise reproducible.
"""
import json, math, os, random, signal, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np, pytest, torch

from supra.core.config import ModelConfig, TrainConfig, ConfigError
from supra.train.trainer import train, train_epochs, TrainingDiverged
from supra.model.checkpoint import read_meta
from supra.model.checkpoint import load_checkpoint, save_checkpoint, CheckpointError
from supra.train.optim import make_optimizers, lr_factor
from supra.train.runtime import jemalloc_path, with_jemalloc_env
from conftest import bigram_pool, one_thread

torch.set_num_threads(1)   # tiny models gain nothing from more threads; spinning OpenMP workers crawl on a busy machine
ROOT = Path(__file__).resolve().parents[1]
MCFG = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, seq_len=32)
TCFG = TrainConfig(epochs=2, batch_size=8, seq_len=32, lr=3e-3, warmup_frac=0.1, cooldown_frac=0.3)


@pytest.fixture(scope='module')
def pool_file(tmp_path_factory):
    p = tmp_path_factory.mktemp('pool') / 'pool.npy'
    np.save(p, bigram_pool())
    return p


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()]


# A training subprocess: `python -c` with the configs as JSON; prints the result as the last stdout line.
SCRIPT = textwrap.dedent('''
    import json, sys, numpy as np, torch
    torch.set_num_threads(1)
    from supra.core.config import ModelConfig, TrainConfig
    from supra.train.trainer import train
    m, t = ModelConfig.from_dict(json.loads(sys.argv[1])), TrainConfig.from_dict(json.loads(sys.argv[2]))
    res = train(np.load(sys.argv[3], mmap_mode='r'), m, t, sys.argv[4], quiet=True)
    print(json.dumps(res))
''')

def _cmd(pool_file, out_dir, tcfg):
    return [sys.executable, '-c', SCRIPT, MCFG.to_json(), tcfg.to_json(), str(pool_file), str(out_dir)]

def _env(**kw):
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'SUPRA_NO_JEMALLOC': '1', **kw}

def run_to_end(pool_file, out_dir, tcfg):
    r = subprocess.run(_cmd(pool_file, out_dir, tcfg), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sigkill_resume_matches_uninterrupted(pool_file, tmp_path):
    "kill -9 a training process twice at random moments (checkpoints every ~20 ms, so often mid-write); the resumed run ends bitwise equal."
    tcfg = TCFG.replace(ckpt_every_s=0.02)
    with one_thread(): ref = train(np.load(pool_file, mmap_mode='r'), MCFG, tcfg, tmp_path / 'ref', quiet=True)   # uninterrupted, in this process
    total = ref['step']
    rng = random.Random(0)
    run = tmp_path / 'killed'
    kills = []
    for target in (total // 4, total // 2):
        p = subprocess.Popen(_cmd(pool_file, run, tcfg), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.time()
        while time.time() - t0 < 120:   # wait until the run is past `target` steps, then a random extra moment
            ml = run / 'metrics.jsonl'
            if ml.exists() and ml.read_text().count('\n') >= target: break
            if p.poll() is not None: break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        assert p.poll() is None, f'the run ended before it could be killed: {p.stderr.read().decode()[-2000:]}'
        p.send_signal(signal.SIGKILL); p.wait()
        kills.append(read_meta(run / 'last')['step'])
    assert 0 < kills[0] < total and kills[1] < total, kills
    res = run_to_end(pool_file, run, tcfg)
    assert res['step'] == total
    assert abs(res['loss'] - ref['loss']) <= 1e-6, (res['loss'], ref['loss'])
    assert res['loss'] == ref['loss']   # bitwise, in fact
    a, b = metrics(tmp_path / 'ref'), metrics(run)
    assert [r['step'] for r in b] == list(range(1, total + 1)), 'metrics.jsonl must hold each step once after resume'
    assert [r['loss'] for r in a] == [r['loss'] for r in b]
    m_ref, _ = load_checkpoint(tmp_path / 'ref' / 'final'); m_res, _ = load_checkpoint(run / 'final')
    assert all(torch.equal(x, y) for x, y in zip(m_ref.state_dict().values(), m_res.state_dict().values()))


def test_grad_accum_matches_full_batch(pool_file, tmp_path):
    pool = np.load(pool_file)
    a = train(pool, MCFG, TCFG.replace(epochs=1), tmp_path / 'a', quiet=True)
    b = train(pool, MCFG, TCFG.replace(epochs=1, grad_accum=4), tmp_path / 'b', quiet=True)
    la, lb = [r['loss'] for r in metrics(tmp_path / 'a')], [r['loss'] for r in metrics(tmp_path / 'b')]
    assert np.abs(np.array(la) - np.array(lb))[:10].max() < 1e-4
    assert abs(a['loss'] - b['loss']) < 1e-2


def test_muon_split_and_learning(pool_file, tmp_path):
    model = __import__('supra.model.transformer', fromlist=['Transformer']).Transformer(MCFG)
    adamw, muon = make_optimizers(model, TCFG.replace(optimizer='muon'))
    in_muon = {id(p) for g in muon.param_groups for p in g['params']}
    block_linears = [m.weight for blk in model.modules() if isinstance(blk, torch.nn.ModuleList)
                     for m in blk.modules() if isinstance(m, torch.nn.Linear)]
    assert in_muon == {id(p) for p in block_linears} and len(in_muon) > 0
    assert all(p.ndim == 2 for p in block_linears)
    assert muon.splits == {id(b.attn.c_attn.weight): [b.attn.nh * b.attn.hd, b.attn.nkv * b.attn.hd, b.attn.nkv * b.attn.hd]
                           for b in model.blocks}   # q, k and v orthogonalised apart
    n_adamw = sum(p.numel() for g in adamw.param_groups for p in g['params'])
    assert n_adamw + sum(p.numel() for p in block_linears) == sum(p.numel() for p in model.parameters())
    res = train(np.load(pool_file), MCFG, TCFG.replace(epochs=1, optimizer='muon'), tmp_path / 'muon', quiet=True)
    ls = metrics(tmp_path / 'muon')
    assert ls[-1]['loss'] < ls[0]['loss'] - 1.5


def test_divergence_names_step_and_checkpoint(pool_file, tmp_path, monkeypatch):
    pool = np.load(pool_file)
    train(pool, MCFG, TCFG.replace(epochs=1), tmp_path / 'run', quiet=True)        # leaves a good checkpoint
    with pytest.raises(CheckpointError, match='different run'):                     # a changed config is refused
        train(pool, MCFG, TCFG.replace(epochs=1, lr=1e6), tmp_path / 'run', quiet=True)
    with pytest.raises(TrainingDiverged) as e:                                      # diverges at once: no checkpoint yet
        train(pool, MCFG, TCFG.replace(lr=1e6, grad_clip=None), tmp_path / 'fresh', quiet=True)
    msg = str(e.value)
    assert 'at step ' in msg and 'none (no checkpoint' in msg and 'lower the learning rate' in msg and 'grad_clip=None' in msg
    # a schedule that explodes after step 40, with checkpoints every step: the error names the last good one
    import supra.train.trainer as st
    real = st.lr_factor
    monkeypatch.setattr(st, 'lr_factor', lambda step, *a, **k: 1e9 if step >= 40 else real(step, *a, **k))
    with pytest.raises(TrainingDiverged) as e:
        train(pool, MCFG, TCFG.replace(grad_clip=None, ckpt_every_s=1e-9), tmp_path / 'late', quiet=True)
    msg = str(e.value)
    assert 'at step 4' in msg and str(tmp_path / 'late' / 'last') in msg, msg
    good = read_meta(tmp_path / 'late' / 'last')
    assert 40 <= good['step'] < 50 and math.isfinite(good['loss'])
    assert all(math.isfinite(r['loss']) for r in metrics(tmp_path / 'late'))     # nothing non-finite was logged


def test_checkpoint_refuses_corruption(tmp_path):
    m = __import__('supra.model.transformer', fromlist=['Transformer']).Transformer(MCFG)
    save_checkpoint(tmp_path / 'ck', m, dict(step=1))
    meta = read_meta(tmp_path / 'ck')
    f = tmp_path / 'ck' / meta['model_file']
    f.write_bytes(f.read_bytes()[:-100])                      # truncated weights
    with pytest.raises(CheckpointError, match=meta['model_file']): load_checkpoint(tmp_path / 'ck')
    save_checkpoint(tmp_path / 'ck', m, dict(step=2))
    (tmp_path / 'ck' / 'meta.json').write_text('{"format": ')  # a torn marker
    with pytest.raises(CheckpointError, match='meta.json'): load_checkpoint(tmp_path / 'ck')


def test_token_budget_and_ema(pool_file, tmp_path):
    pool = np.load(pool_file)
    res = train(pool, MCFG, TCFG.replace(tokens=20_000, ema=0.9), tmp_path / 'run', quiet=True)
    assert res['step'] == math.ceil(20_000 / (8 * 32)) and res['tokens'] == res['step'] * 256
    final, meta = load_checkpoint(res['checkpoint'])
    assert meta['ema'] is True
    last, _ = load_checkpoint(tmp_path / 'run' / 'last')
    assert not torch.equal(final.wte.weight if hasattr(final, 'wte') else next(final.parameters()),
                           last.wte.weight if hasattr(last, 'wte') else next(last.parameters()))


def test_train_epochs_branch_equals_standalone_run(pool_file, tmp_path):
    pool = np.load(pool_file)
    cfg = TCFG.replace(epochs=2, warmup_frac=0.2, cooldown_frac=0.25)
    rows = train_epochs(pool, MCFG, cfg, tmp_path / 'ep', quiet=True)
    spe = rows[0]['steps']
    assert [r['epochs'] for r in rows] == [1, 2] and [r['steps'] for r in rows] == [spe, 2 * spe]
    assert rows[1]['stable_steps'] + rows[1]['cooldown_steps'] == 2 * spe
    alone = train(pool, MCFG, cfg.replace(warmup_frac=0.1), tmp_path / 'alone', quiet=True)   # same shared warmup
    assert round(0.1 * 2 * spe) == round(0.2 * spe)
    assert alone['loss'] == rows[1]['loss']
    with pytest.raises(ConfigError, match='schedule'): train_epochs(pool, MCFG, cfg.replace(schedule='cosine'), tmp_path / 'x')
    from supra.train.loader import EpochSteps     # a loader factory reading today's epochs gives the same branches, bit for bit
    same = train_epochs(pool, MCFG, cfg, tmp_path / 'ep2', quiet=True,
                        loader=lambda t, c, rank, world: EpochSteps(t, c.batch_size, c.seq_len, c.grad_accum, c.seed, rank, world))
    assert [r['loss'] for r in same] == [r['loss'] for r in rows]
    assert json.loads((tmp_path / 'ep2' / 'run.json').read_text())['steps_per_epoch'] == spe


def test_jemalloc_env():
    env = with_jemalloc_env({'LD_PRELOAD': '/x.so'})
    if jemalloc_path(): assert env['LD_PRELOAD'].split(':') == [jemalloc_path(), '/x.so']
    else: assert env['LD_PRELOAD'] == '/x.so'
    assert 'LD_PRELOAD' not in with_jemalloc_env({'SUPRA_NO_JEMALLOC': '1'})


def _data_ready():
    try:
        from supra.data.corpus import available_corpora
        return 'wikipedia-en' in available_corpora()
    except Exception: return False

@pytest.mark.skipif(not _data_ready(), reason='needs SUPRA_DATA with the wikipedia-en corpus (shared/data)')
def test_cli_smoke_preset(tmp_path):
    "`python -m supra.train --preset smoke` on the real smoke pool; re-executes itself with jemalloc when installed."
    env = {k: v for k, v in os.environ.items() if k not in ('SUPRA_NO_JEMALLOC', 'LD_PRELOAD', 'SUPRA_JEMALLOC_REEXEC')}
    env['OMP_NUM_THREADS'] = '1'
    r = subprocess.run([sys.executable, '-m', 'supra.train', '--preset', 'smoke', '--out_dir', str(tmp_path / 'cli'),
                        '--epochs', '1', '--device', 'cpu', '--quiet'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['jemalloc'] == bool(jemalloc_path())
    ls = metrics(tmp_path / 'cli')
    assert len(ls) == out['result']['step'] and ls[-1]['loss'] < ls[0]['loss']
    load_checkpoint(out['result']['checkpoint'])


def test_train_config_eval_every_and_tracker():
    "eval_every and tracker are validated, naming field, value and what is allowed, and stay out of the cache key."
    assert TrainConfig(eval_every=5, tracker=('wandb', 'tensorboard')).key() == TrainConfig().key()
    for kw, msg in [(dict(eval_every=0), 'eval_every=0'), (dict(eval_every=2.5), 'eval_every=2.5'), (dict(tracker=('mlflow',)), "tracker='mlflow'"),
                    (dict(tracker='wandb'), "tracker='wandb'"), (dict(tracker=('wandb', 'wandb')), 'named once')]:
        with pytest.raises(ConfigError, match=msg): TrainConfig(**kw)
    assert TrainConfig.from_dict(json.loads(TrainConfig(tracker=('trackio',)).to_json())).tracker == ('trackio',)


def test_cli_exposes_every_config_field_and_refuses_bad_values(tmp_path, capsys):
    "train_arg_parser has a flag per TrainConfig field and --model_<field> per ModelConfig field; a bad value exits 2 naming it."
    import dataclasses
    from supra.train.trainer import train_arg_parser, train_main
    ap = train_arg_parser()
    flags = {o for a in ap._actions for o in a.option_strings}
    assert {f'--{f.name}' for f in dataclasses.fields(TrainConfig)} <= flags
    assert {f'--model_{f.name}' for f in dataclasses.fields(ModelConfig)} <= flags
    help_ = ap.format_help()
    assert 'eval_every' in help_ and 'model_embed_rank' in help_
    with pytest.raises(SystemExit) as e:
        train_main(['--out_dir', str(tmp_path / 'x'), '--device', 'cpu', '--model_n_head', '5'])
    assert e.value.code == 2 and 'd_model' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(['--out_dir', str(tmp_path / 'x'), '--tracker', 'mlflow'])
    assert not (tmp_path / 'x').exists()        # refused before any compute


def test_tensorboard_tracker_gets_the_rows(pool_file, tmp_path):
    "tracker=('tensorboard',): supra.train.trackers is opened for the run and its event file holds the logged losses."
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    pool = np.load(pool_file)
    train(pool, MCFG, TCFG.replace(epochs=1, tracker=('tensorboard',)), tmp_path / 'tb', quiet=True)
    ea = EventAccumulator(str(tmp_path / 'tb' / 'tensorboard')); ea.Reload()
    tags = ea.Tags()['scalars']
    key = next(t for t in tags if t.split('/')[-1] == 'loss')
    logged = [e.value for e in ea.Scalars(key)]
    rows = metrics(tmp_path / 'tb')
    assert len(logged) == len(rows) and np.allclose(logged, [r['loss'] for r in rows], rtol=1e-6)


# Both DDP runs in one process per launch (the 1-process reference, then torchrun's 2 ranks): a plain run with Muon, and a
# curriculum (a StageLoader factory) on a model family that reports auxiliary metrics.
DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys, numpy as np, torch
    from dataclasses import dataclass
    torch.set_num_threads(1)
    from supra.core.config import ModelConfig, TrainConfig
    from supra.model.transformer import Transformer
    from supra.model.checkpoint import register_family
    from supra.train.loader import StageLoader
    from supra.train.trainer import train
    @dataclass(frozen=True)
    class AuxConfig(ModelConfig): pass
    class AuxLM(Transformer):   # reports its cross-entropy and its logit scale as auxiliary metrics
        def forward(self, idx, targets=None, cache=None, return_logits=True):
            logits, loss = super().forward(idx, targets, cache, return_logits)
            return (logits, loss) if targets is None else (logits, loss, dict(ce=loss, wte_rms=self.wte.weight.pow(2).mean().sqrt()))
    register_family('auxlm', AuxLM, AuxConfig)
    mcfg, plain, even, seams, pool, out = sys.argv[1:]
    cfg = lambda s: TrainConfig.from_dict(json.loads(s))
    res = dict(plain=train(np.load(even, mmap_mode='r'), ModelConfig.from_dict(json.loads(mcfg)), cfg(plain), f'{out}/plain', quiet=True))
    factory = lambda tokens, cfg, rank, world: StageLoader.constant_tokens(tokens, [8, 16, 32], 256, steps=20, seed=cfg.seed, rank=rank, world_size=world)
    res['seams'] = train(np.load(pool, mmap_mode='r'), AuxConfig.from_dict(json.loads(mcfg)), cfg(seams), f'{out}/seams', quiet=True, loader=factory)
    if os.environ.get('RANK', '0') == '0': print(json.dumps(res))
''')

def test_ddp_two_ranks_match_one_process(pool_file, tmp_path):
    """torchrun, 2 CPU processes over gloo, each its own slice of every epoch, gives the 1-process losses at the same global batch;
    so does a StageLoader factory's curriculum, whose auxiliary metrics are averaged over the ranks like the loss."""
    script = tmp_path / 'ddp_train.py'; script.write_text(DDP_SCRIPT)
    even = tmp_path / 'even.npy'   # 58 full batches of 16 windows: no ragged last batch, which 2 ranks would split unevenly
    np.save(even, np.load(pool_file)[:58 * 16 * 32 + 1])
    args = [MCFG.to_json(), TCFG.replace(epochs=1, batch_size=16, optimizer='muon').to_json(), str(even), TCFG.to_json(), str(pool_file)]
    one = subprocess.run([sys.executable, str(script), *args, str(tmp_path / 'one')], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script), *args,
                          str(tmp_path / 'two')], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # the plain run (Muon)
    a, b = metrics(tmp_path / 'one' / 'plain'), metrics(tmp_path / 'two' / 'plain')
    assert len(a) == len(b) > 50
    la, lb = np.array([r['loss'] for r in a]), np.array([r['loss'] for r in b])
    assert np.abs(la - lb)[:10].max() < 1e-4, (la[:10], lb[:10])   # same data, same steps: only summation order differs
    assert np.abs(la - lb).max() < 2e-2 and abs(la[-1] - lb[-1]) < 1e-2, np.abs(la - lb).max()
    assert la[-1] < la[0] - 1
    assert read_meta(tmp_path / 'two' / 'plain' / 'final')['world_size'] == 2
    # the curriculum with auxiliary metrics
    a, b = [[r for r in metrics(tmp_path / d / 'seams') if 'loss' in r] for d in ('one', 'two')]
    assert len(a) == len(b) == 60 and [r['tokens'] for r in a] == [r['tokens'] for r in b] == [256 * (i + 1) for i in range(60)]
    la, lb = np.array([r['loss'] for r in a]), np.array([r['loss'] for r in b])
    assert np.abs(la - lb)[:10].max() < 1e-4 and np.abs(la - lb).max() < 2e-2, np.abs(la - lb).max()
    for rows in (a, b):
        assert all(abs(r['ce'] - r['loss']) < 1e-5 and r['wte_rms'] > 0 for r in rows)
    stages = [r for r in metrics(tmp_path / 'two' / 'seams') if r.get('event') == 'stage']
    assert [(r['at_step'], r['seq_len'], r['batch_size']) for r in stages] == [(0, 8, 32), (20, 16, 16), (40, 32, 8)]
    assert read_meta(tmp_path / 'two' / 'seams' / 'final')['family'] == 'auxlm'
