"""The `supra` command end to end: train a smoke model, evaluate its checkpoint on named tasks, export it — each
sub-command through its own --help (whose usage line names the command typed) and its error messages — and jemalloc
loaded in every entry point: each `supra` sub-command, `python -m supra.train`, `python -m supra.bench`, every rank of
`torchrun … -m supra.train`, and the `supra` Jupyter kernel that papermill and JupyterLab start."""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.environ.get('SUPRA_DATA'), reason='needs SUPRA_DATA (the local data sets); ./test.sh sets it')
SUPRA = Path(sys.executable).with_name('supra')      # the console script pyproject.toml declares (supra.cli:main)

def supra_cmd():
    return [str(SUPRA)] if SUPRA.exists() else [sys.executable, '-m', 'supra.cli']

def supra(*args, check=True, env=None):
    r = subprocess.run([*supra_cmd(), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check: assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp('cli') / 'run'
    supra('train', '--preset', 'smoke', '--out_dir', d, '--tokens', 2048, '--quiet')
    from supra.core.config import preset
    from supra.data.pool import build_pool
    tok = d.parent / 'tokenizer.json'
    build_pool(preset('smoke', 'cpu').data).tokenizer.save(str(tok))
    return d, tok

def in_process(capsys, *args) -> tuple[int, str, str]:
    "(exit code, stdout, stderr) of `supra ARGS` run in this process by `supra.cli.main`: its parsers and error paths, no new interpreter."
    from supra.cli import main
    try: code = main(list(map(str, args)))
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err

def test_help_of_every_command(capsys):
    helps = {cmd: in_process(capsys, cmd, '--help') for cmd in ('train', 'eval', 'export', 'dashboard', 'bench', 'run', 'new')}
    for cmd, (code, out, _) in helps.items():
        assert code == 0 and out.startswith(f'usage: supra {cmd} '), (cmd, out[:200])     # the command the user typed
    assert '--model_n_layer' in helps['train'][1] and '--bpb-stride' in helps['eval'][1]
    code, _, err = in_process(capsys, 'bench', 'data', 'nokey')                          # bench's own parser, reached through supra
    assert code == 2 and err.startswith('usage: supra bench '), err
    r = supra('eval', '--help')                                                         # the console script itself, once
    assert r.stdout.startswith('usage: supra eval '), r.stdout[:200]
    alone = subprocess.run([sys.executable, '-m', 'supra.train', '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert alone.stdout.startswith('usage: python -m supra.train '), alone.stdout[:200]  # the module keeps its own

def test_eval_a_checkpoint_on_named_tasks(run, tmp_path, capsys):
    d, tok = run
    out = tmp_path / 'table.json'
    supra('eval', d / 'final', '--tokenizer', tok, '--tasks', 'blimp', '--limit', 2, '--json', out)   # the command, end to end
    rows = json.loads(out.read_text())
    blimp = next(r for r in rows if r['task'] == 'blimp' and r['metric'] == 'acc')
    assert 0 <= blimp['value'] <= 1 and blimp['n'] == 67 * 2
    code, _, err = in_process(capsys, 'eval', d / 'final', '--tokenizer', tok, '--limit', 0)
    assert code == 2 and 'limit=0' in err
    import shutil
    alone = tmp_path / 'x' / 'y' / 'z' / 'final'               # a checkpoint with no tokenizer.json beside it or above it
    shutil.copytree(d / 'final', alone)
    code, _, err = in_process(capsys, 'eval', alone, '--limit', 2)   # said, not crashed
    assert code == 2 and 'tokenizer' in err
    code, found, _ = in_process(capsys, 'eval', d / 'final', '--tasks', 'blimp', '--limit', 1)   # tokenizer.json two levels up is found
    assert code == 0 and 'blimp' in found

def test_export_a_checkpoint(run, tmp_path):
    d, tok = run
    supra('export', d / 'final', tmp_path / 'hf', '--tokenizer', tok)
    cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert cfg['architectures'] == ['LlamaForCausalLM'] and (tmp_path / 'hf' / 'model.safetensors').exists()

def test_run_names_the_known_experiments(capsys):
    code, _, err = in_process(capsys, 'run', 'nope')
    assert code == 2 and 'epochs' in err and 'topology' in err


# ---------------------------------------------------------------- jemalloc in every entry point

from supra.train.runtime import JEMALLOC_CONF, jemalloc_path, KERNEL_CODE

# Loaded into every Python process of a test below (PYTHONPATH): at exit, the process writes whether jemalloc is mapped
# into it. A process that restarts itself with jemalloc (execve) never runs the atexit of its first image, so the record
# is the allocator the command really ran on.
RECORDER = textwrap.dedent('''
    import atexit, json, os, sys
    def _record():
        try: maps = open('/proc/self/maps').read()
        except OSError: maps = ''
        rec = dict(pid=os.getpid(), argv=sys.argv, rank=os.environ.get('RANK'), jemalloc='jemalloc' in maps,
                   malloc_conf=os.environ.get('MALLOC_CONF'))
        with open(os.path.join(os.environ['SUPRA_TEST_RECORDS'], f'{os.getpid()}.json'), 'w') as f: json.dump(rec, f)
    if os.environ.get('SUPRA_TEST_RECORDS'): atexit.register(_record)
''')

needs_jemalloc = pytest.mark.skipif(jemalloc_path() is None, reason='libjemalloc.so.2 is not installed (./install.sh installs it as root)')


@pytest.fixture
def recorded(tmp_path):
    "(env, records()): an environment with the recorder and without any jemalloc setting of ours; records() reads what each process wrote."
    site, recs = tmp_path / 'site', tmp_path / 'records'
    site.mkdir(); recs.mkdir()
    (site / 'sitecustomize.py').write_text(RECORDER)
    env = {k: v for k, v in os.environ.items() if k not in ('SUPRA_NO_JEMALLOC', 'LD_PRELOAD', 'MALLOC_CONF', 'SUPRA_JEMALLOC_REEXEC')}
    env.update(PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get('PYTHONPATH')])]), SUPRA_TEST_RECORDS=str(recs),
               OMP_NUM_THREADS='1')
    def records():
        return [json.loads(f.read_text()) for f in sorted(recs.glob('*.json'))]
    return env, records


def _ran_on_jemalloc(records, argv_has=None, ranks=False):
    """The records of the processes whose argv holds `argv_has` (`ranks`: that torchrun started): at least one, each with
    jemalloc mapped and Supra's MALLOC_CONF."""
    mine = [r for r in records() if (argv_has is None or argv_has in ' '.join(r['argv'])) and (r['rank'] is not None or not ranks)]
    assert mine, (argv_has, records())
    for r in mine: assert r['jemalloc'] and r['malloc_conf'] == JEMALLOC_CONF, r
    return mine


ENTRY_POINTS = {   # name: (command after the run fixture's (run_dir, tokenizer) are known, the argv fragment that marks its process)
    # Every entry point restarts itself with jemalloc before it reads its arguments, so `--help` runs the very start-up a real
    # command runs, on the allocator the work would get; one real training run checks the trainer's own report of it too.
    'supra train': lambda d, tok, t: ([*supra_cmd(), 'train', '--preset', 'smoke', '--out_dir', t / 'tr', '--tokens', 2048, '--quiet', '--device', 'cpu'], 'train'),
    'supra eval': lambda d, tok, t: ([*supra_cmd(), 'eval', '--help'], 'eval'),
    'supra export': lambda d, tok, t: ([*supra_cmd(), 'export', '--help'], 'export'),
    'supra dashboard': lambda d, tok, t: ([*supra_cmd(), 'dashboard', d, '--once'], 'dashboard'),
    'supra bench': lambda d, tok, t: ([*supra_cmd(), 'bench', '--help'], 'bench'),
    'supra run': lambda d, tok, t: ([*supra_cmd(), 'run', 'nope'], 'run'),               # the command itself; its kernel: below
    'python -m supra.train': lambda d, tok, t: ([sys.executable, '-m', 'supra.train', '--help'], 'train'),
    'python -m supra.bench': lambda d, tok, t: ([sys.executable, '-m', 'supra.bench', '--help'], 'bench'),
}


@needs_jemalloc
@pytest.mark.parametrize('name', list(ENTRY_POINTS))
def test_jemalloc_in_every_entry_point(name, run, recorded, tmp_path):
    d, tok = run
    env, records = recorded
    cmd, mark = ENTRY_POINTS[name](d, tok, tmp_path)
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == (2 if name == 'supra run' else 0), (name, r.stdout[-2000:], r.stderr[-3000:])
    _ran_on_jemalloc(records, mark)
    if name == 'supra train':                                    # the trainer's closing JSON says so too
        assert json.loads(r.stdout.strip().splitlines()[-1])['jemalloc'] is True


@needs_jemalloc
def test_jemalloc_opt_out_and_own_malloc_conf(run, recorded, tmp_path):
    "SUPRA_NO_JEMALLOC=1 keeps the system allocator; a MALLOC_CONF of the user's own is left as it is."
    d, _ = run
    env, records = recorded
    r = subprocess.run([*supra_cmd(), 'dashboard', str(d), '--once'], cwd=ROOT, env={**env, 'SUPRA_NO_JEMALLOC': '1'},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and [x['jemalloc'] for x in records()] == [False], records()
    for f in Path(env['SUPRA_TEST_RECORDS']).glob('*.json'): f.unlink()
    r = subprocess.run([*supra_cmd(), 'dashboard', str(d), '--once'], cwd=ROOT, env={**env, 'MALLOC_CONF': 'narenas:2'},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and [(x['jemalloc'], x['malloc_conf']) for x in records()] == [(True, 'narenas:2')], records()


@needs_jemalloc
def test_jemalloc_in_every_torchrun_rank(recorded, tmp_path):
    env, records = recorded
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'supra.train',
                        '--preset', 'smoke', '--out_dir', str(tmp_path / 'ddp'), '--tokens', '4096', '--quiet', '--device', 'cpu'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ranks = _ran_on_jemalloc(records, ranks=True)             # not the launcher: it trains nothing
    assert sorted(x['rank'] for x in ranks) == ['0', '1'], ranks
    assert json.loads(r.stdout.strip().splitlines()[-1])['jemalloc'] is True


KERNEL_NB = '''{"cells": [{"cell_type": "code", "execution_count": null, "id": "a1", "metadata": {}, "outputs": [], "source":
 "import os\\nfrom supra.train.runtime import jemalloc_loaded\\nprint('JEMALLOC', jemalloc_loaded(), os.environ.get('MALLOC_CONF'))"}],
 "metadata": {"kernelspec": {"display_name": "Python 3 (supra)", "language": "python", "name": "supra"}}, "nbformat": 4, "nbformat_minor": 5}'''

@needs_jemalloc
def test_jemalloc_in_the_supra_kernel(recorded, tmp_path):
    "The kernel install.sh registers (what `supra run`, papermill and JupyterLab start): papermill runs a notebook on kernel `supra`."
    spec = json.loads((Path(sys.prefix) / 'share' / 'jupyter' / 'kernels' / 'supra' / 'kernel.json').read_text())
    assert KERNEL_CODE in spec['argv'] and 'LD_PRELOAD' not in spec.get('env', {}), f'{spec}: re-run ./install.sh'
    env, _ = recorded
    nb = tmp_path / 'k.ipynb'; nb.write_text(KERNEL_NB)
    def printed(**extra):
        r = subprocess.run([sys.executable, '-m', 'papermill', '-k', 'supra', str(nb), str(tmp_path / 'out.ipynb'), '--log-output'],
                           cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads((tmp_path / 'out.ipynb').read_text())['cells'][0]['outputs']
        return ''.join(''.join(o.get('text', '')) for o in out).split()
    assert printed() == ['JEMALLOC', 'True', JEMALLOC_CONF]
    assert printed(SUPRA_NO_JEMALLOC='1') == ['JEMALLOC', 'False', 'None']
