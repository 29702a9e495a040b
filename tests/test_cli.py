"""The `supra` command end to end: train a smoke model, evaluate its checkpoint on named tasks, export it — each
sub-command through its own --help and its error messages."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.environ.get('SUPRA_DATA'), reason='needs SUPRA_DATA (the local data sets); ./test.sh sets it')

def supra(*args, check=True):
    r = subprocess.run([sys.executable, '-m', 'supra.cli', *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
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

def test_help_of_every_command():
    for cmd in ('train', 'eval', 'export', 'dashboard', 'bench', 'run'):
        r = supra(cmd, '--help')
        assert 'usage:' in r.stdout, cmd
    assert '--model_n_layer' in supra('train', '--help').stdout and '--bpb-stride' in supra('eval', '--help').stdout

def test_eval_a_checkpoint_on_named_tasks(run, tmp_path):
    d, tok = run
    out = tmp_path / 'table.json'
    supra('eval', d / 'final', '--tokenizer', tok, '--tasks', 'blimp', '--limit', 2, '--json', out)
    rows = json.loads(out.read_text())
    blimp = next(r for r in rows if r['task'] == 'blimp' and r['metric'] == 'acc')
    assert 0 <= blimp['value'] <= 1 and blimp['n'] == 67 * 2
    bad = supra('eval', d / 'final', '--tokenizer', tok, '--limit', 0, check=False)
    assert bad.returncode == 2 and 'limit=0' in bad.stderr
    import shutil
    alone = tmp_path / 'x' / 'y' / 'z' / 'final'               # a checkpoint with no tokenizer.json beside it or above it
    shutil.copytree(d / 'final', alone)
    missing = supra('eval', alone, '--limit', 2, check=False)   # said, not crashed
    assert missing.returncode == 2 and 'tokenizer' in missing.stderr
    found = supra('eval', d / 'final', '--tasks', 'blimp', '--limit', 1)   # tokenizer.json two levels up is found
    assert 'blimp' in found.stdout

def test_export_a_checkpoint(run, tmp_path):
    d, tok = run
    supra('export', d / 'final', tmp_path / 'hf', '--tokenizer', tok)
    cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert cfg['architectures'] == ['LlamaForCausalLM'] and (tmp_path / 'hf' / 'model.safetensors').exists()

def test_run_names_the_known_experiments():
    r = supra('run', 'nope', check=False)
    assert r.returncode == 2 and 'epochs' in r.stderr and 'topology' in r.stderr
