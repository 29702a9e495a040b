"""Trackers write real files that the trackers' own formats read back: TensorBoard event files (EventAccumulator),
trackio's local SQLite project database, W&B's offline run file. No network: trackio writes under a TRACKIO_DIR we
point it to, W&B runs with WANDB_MODE=offline. Each writer runs in a subprocess with its environment set, because
trackio fixes its directory when it is imported."""
import importlib.util, json, math, os, sqlite3, struct, subprocess, sys, textwrap
from pathlib import Path

import numpy as np, pytest

from supra.train.trackers import open_trackers, scalars, tracker_names
from supra.core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(model=dict(n_layer=2, d_model=32), train=dict(lr=0.003, batch_size=8), corpus='wikipedia-en')
ROWS = [dict(step=s, epoch=s / 40, tokens=s * 256, loss=5.0 * math.exp(-s / 25), lr=0.003 * (1 - s / 50),
             grad_norm=1.0 + s / 100, tok_s=1000.0 + s, elapsed=s * 0.1, phase='train') for s in (5, 10, 15, 20)]
EVAL = dict(step=20, eval=dict(heldout_loss=4.25, bpb=1.875), phase='train')   # an eval row, as the trainer's eval hook writes it


def has(mod): return importlib.util.find_spec(mod) is not None


def _write(tmp_path, names, rows=ROWS, **env):
    "Log `rows` with CONFIG to the trackers `names` for run `tmp_path/exp/run0`, in a fresh process."
    run_dir = tmp_path / 'exp' / 'run0'
    code = textwrap.dedent(f'''
        import json, sys
        from supra.train.trackers import open_trackers
        rows, config = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        tr = open_trackers({tuple(names)!r}, {str(run_dir)!r}, config)
        for r in rows: tr.log(r, r['step'])
        tr.close()
    ''')
    e = dict(os.environ, OMP_NUM_THREADS='1', WANDB_SILENT='true', **env)
    p = subprocess.run([sys.executable, '-c', code, json.dumps(rows), json.dumps(CONFIG)], env=e, cwd=tmp_path,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


def tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir / 'tensorboard'), size_guidance={'scalars': 0, 'tensors': 0}); ea.Reload()
    out = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}
    return out, ea.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()


def trackio_rows(db, run_name):
    c = sqlite3.connect(db)
    logs = [(s, json.loads(m)) for s, m in c.execute('SELECT step, metrics FROM metrics WHERE run_name=? ORDER BY step, id', (run_name,))]
    cfg = [json.loads(x) for (x,) in c.execute('SELECT config FROM configs WHERE run_name=?', (run_name,))]
    return logs, cfg


def expected(name):
    return [(r['step'], r[name]) for r in ROWS]


def test_names_and_scalars():
    assert tracker_names('tensorboard,trackio') == ('tensorboard', 'trackio')
    with pytest.raises(ConfigError, match='tracker'): tracker_names(('neptune',))
    assert scalars(dict(step=3, loss=1.5, phase='train', bad=float('inf'))) == dict(loss=1.5)
    tr = open_trackers((), '/nonexistent/never/made', CONFIG); tr.log(ROWS[0], 5); tr.close()
    assert not Path('/nonexistent/never/made').exists()


@pytest.mark.skipif(not (has('trackio') and has('tensorboard')), reason="needs trackio and tensorboard (pip install 'supra[trackers]')")
def test_tensorboard_and_trackio_at_once(tmp_path):
    run_dir = _write(tmp_path, ('tensorboard', 'trackio'), ROWS + [EVAL], TRACKIO_DIR=str(tmp_path / 'trackio'))
    tb, text = tensorboard_scalars(run_dir)
    assert set(tb) == {'epoch', 'tokens', 'loss', 'lr', 'grad_norm', 'tok_s', 'elapsed', 'eval/heldout_loss', 'eval/bpb'}
    assert tb['eval/bpb'] == [(20, 1.875)] and tb['eval/heldout_loss'] == [(20, 4.25)]   # exact in float32
    for k in ('loss', 'lr', 'grad_norm'):
        assert [s for s, _ in tb[k]] == [s for s, _ in expected(k)]
        np.testing.assert_allclose([v for _, v in tb[k]], [v for _, v in expected(k)], rtol=1e-6)   # float32 events
    assert json.loads(text.strip('`').removeprefix('json\n')) == CONFIG

    db = tmp_path / 'trackio' / 'supra.db'
    assert db.exists(), sorted(p.name for p in (tmp_path / 'trackio').iterdir())
    logs, cfgs = trackio_rows(db, 'exp/run0')
    assert logs[-1] == (20, {'eval/heldout_loss': 4.25, 'eval/bpb': 1.875})
    logs = logs[:-1]
    assert [s for s, _ in logs] == [5, 10, 15, 20]
    for k in ('loss', 'lr', 'tokens'):
        assert [m[k] for _, m in logs] == [v for _, v in expected(k)]                             # exact: JSON floats
    assert all('phase' not in m and 'step' not in m for _, m in logs)
    assert len(cfgs) == 1 and {k: v for k, v in cfgs[0].items() if not k.startswith('_')} == CONFIG


def wandb_records(path, block=32768):
    "The protobuf records of a W&B run file (a LevelDB-style log: 7-byte file header, 32 KiB blocks, 7-byte record headers)."
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf = Path(path).read_bytes(), 7, b''
    assert data[:4] == b':W&B'
    while pos + 7 <= len(data):
        if block - pos % block < 7: pos += block - pos % block; continue
        _crc, n, kind = struct.unpack('<IHB', data[pos:pos + 7]); pos += 7
        if n == 0 and kind == 0: break
        buf += data[pos:pos + n]; pos += n
        if kind in (1, 4):     # FULL or LAST
            r = pb.Record(); r.ParseFromString(buf); yield r; buf = b''


@pytest.mark.skipif(not has('wandb'), reason="wandb is not installed (pip install 'supra[wandb]')")
def test_wandb_offline(tmp_path):
    run_dir = _write(tmp_path, ('wandb',), WANDB_MODE='offline', WANDB_DIR=str(tmp_path / 'wandb-home'))
    files = list((run_dir / 'wandb').glob('offline-run-*/run-*.wandb'))
    assert len(files) == 1, list(run_dir.rglob('*'))
    hist, config, name = [], {}, None
    for r in wandb_records(files[0]):
        k = r.WhichOneof('record_type')
        if k == 'history':
            hist.append({i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif k == 'run':
            name = r.run.display_name
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif k == 'config':
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert name == 'exp/run0'
    assert {k: v for k, v in config.items() if not k.startswith('_')} == CONFIG
    assert [h['_step'] for h in hist] == [5, 10, 15, 20]
    assert [h['loss'] for h in hist] == [v for _, v in expected('loss')]


@pytest.mark.skipif(not has('tensorboard'), reason="needs tensorboard (pip install 'supra[tensorboard]')")
def test_trainer_mirrors_metrics_to_tensorboard(tmp_path):
    "A real (tiny) training run with tracker=('tensorboard',): every metrics.jsonl row's loss is in the event file."
    import torch
    from supra.core.config import ModelConfig, TrainConfig
    from supra.train.trainer import train
    torch.set_num_threads(1)
    g = np.random.default_rng(0)
    pool = g.integers(0, 64, size=8_000).astype(np.uint16)
    m = ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, seq_len=32)
    t = TrainConfig(epochs=1, batch_size=8, seq_len=32, lr=3e-3, warmup_frac=0.1, cooldown_frac=0.3, tracker=('tensorboard',))
    train(pool, m, t, tmp_path / 'run', quiet=True)
    run_dir = tmp_path / 'run'
    rows = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    train_rows = [r for r in rows if 'loss' in r]
    tb_dirs = [p.parent for p in run_dir.rglob('events.out.tfevents.*')]
    assert tb_dirs, sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob('*'))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    losses = []
    for d in sorted(set(tb_dirs)):
        ea = EventAccumulator(str(d), size_guidance={'scalars': 0}); ea.Reload()
        if 'loss' in ea.Tags()['scalars']: losses += [(e.step, e.value) for e in ea.Scalars('loss')]
    assert sorted(s for s, _ in losses) == sorted(r['step'] for r in train_rows) and losses
    np.testing.assert_allclose([v for _, v in sorted(losses)], [r['loss'] for r in sorted(train_rows, key=lambda r: r['step'])], rtol=1e-6)
