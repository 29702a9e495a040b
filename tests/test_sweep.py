"""A sweep shared through a real PostgreSQL server: two worker processes run one Optuna study (supra.lab.sweep.tune with
storage='postgresql+psycopg2://...') and together leave exactly n_trials COMPLETE trials, numbered 0..n-1, none lost,
none run twice, both workers contributing.

The test starts a throwaway cluster (initdb + pg_ctl, Debian's `postgresql` package, which `./install.sh --dev`
installs as root) in a temporary folder, listening on 127.0.0.1 on a free port, and stops it afterwards. PostgreSQL
refuses to run as root, so as root the cluster runs as the `postgres` user (or `nobody`) through runuser."""
import glob, json, os, pwd, shutil, socket, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

import pytest

optuna = pytest.importorskip('optuna')


def pg_bin():
    "The folder holding initdb and pg_ctl, or None."
    for d in sorted(glob.glob('/usr/lib/postgresql/*/bin'), key=lambda p: int(p.split('/')[-2]) if p.split('/')[-2].isdigit() else 0, reverse=True):
        if os.path.exists(f'{d}/initdb') and os.path.exists(f'{d}/pg_ctl'): return d
    w = shutil.which('initdb')
    return os.path.dirname(w) if w and shutil.which('pg_ctl') else None


def _psycopg2():
    try: import psycopg2; return True
    except ImportError: return False


BIN = pg_bin()
pytestmark = [pytest.mark.skipif(BIN is None, reason="PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql "
                                                     "(./install.sh --dev does it as root)"),
              pytest.mark.skipif(not _psycopg2(), reason="psycopg2 not installed: pip install 'supra[postgres]'")]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def postgres():
    "A fresh PostgreSQL cluster on 127.0.0.1:<free port>; yields its SQLAlchemy URL."
    base = Path(tempfile.mkdtemp(prefix='supra-pg-'))
    data, port = base / 'data', _free_port()
    as_user = []
    if os.geteuid() == 0:
        user = 'postgres'
        try: pwd.getpwnam(user)
        except KeyError: user = 'nobody'
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ['runuser', '-u', user, '--']
    def run(*cmd, **kw):
        return subprocess.run(as_user + list(cmd), capture_output=True, text=True, timeout=120, **kw)
    r = run(f'{BIN}/initdb', '-D', str(data), '-U', 'supra', '--auth=trust', '-E', 'UTF8', '--no-sync')
    assert r.returncode == 0, r.stdout + r.stderr
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} -c fsync=off -c max_connections=50"
    r = run(f'{BIN}/pg_ctl', '-D', str(data), '-o', opts, '-l', str(base / 'server.log'), '-w', '-t', '60', 'start')
    assert r.returncode == 0, r.stdout + r.stderr + (base / 'server.log').read_text()
    try:
        yield f'postgresql+psycopg2://supra@127.0.0.1:{port}/postgres'
    finally:
        run(f'{BIN}/pg_ctl', '-D', str(data), '-m', 'immediate', '-w', 'stop')
        shutil.rmtree(base, ignore_errors=True)


WORKER = textwrap.dedent('''
    import math, os, sys, time
    from pathlib import Path
    from supra.lab.sweep import tune, log_uniform
    Path(f'ready-{os.getpid()}').touch()                 # imports done: wait for the other worker, then start together
    while not Path('go').exists(): time.sleep(0.01)
    def bowl(p):
        time.sleep(0.1)    # long enough that the two workers' trials overlap
        return dict(value=(math.log10(p['lr']) - math.log10(3e-3)) ** 2 + 1.0, worker=os.getpid())
    st = tune(bowl, {'lr': log_uniform(1e-4, 1e-1)}, n_trials=int(sys.argv[2]), study_name='shared', storage=sys.argv[1],
              seed=int(sys.argv[3]), heartbeat_interval=5, grace_period=30)
    print('done', os.getpid(), len(st.trials))
''')


def test_two_workers_share_one_study_on_postgres(postgres, tmp_path):
    n = 12   # the same call on both workers, seed included: trial k's proposal is seeded by seed + k, so seeds never collide
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    procs = [subprocess.Popen([sys.executable, '-c', WORKER, postgres, str(n), str(seed)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 0)]
    t0 = time.monotonic()
    while len(list(tmp_path.glob('ready-*'))) < 2 and time.monotonic() - t0 < 120 and all(p.poll() is None for p in procs): time.sleep(0.05)
    (tmp_path / 'go').touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outs]

    st = optuna.load_study(study_name='shared', storage=postgres)
    trials = st.get_trials(deepcopy=False)
    assert len(trials) == n, [(t.number, t.state.name) for t in trials]                   # none extra
    assert sorted(t.number for t in trials) == list(range(n))                                # unique numbers, no gap
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [(t.number, t.state.name) for t in trials]
    assert len({t.params['lr'] for t in trials}) == n                                        # no point run twice
    workers = {t.user_attrs['worker'] for t in trials}
    assert workers == {p.pid for p in procs}, (workers, [p.pid for p in procs])             # both workers took trials
    assert all(f'done {p.pid} {n}' in o for p, (o, _) in zip(procs, outs))                  # each returned the full study
    # the study really lives in PostgreSQL: its tables are in the server's catalogue
    import sqlalchemy as sa
    with sa.create_engine(postgres).connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM trials t JOIN studies s USING (study_id) WHERE s.study_name='shared'")).scalar() == n
