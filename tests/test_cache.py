"""Honest cache keys: every cached product's key moves when the code of the stage that made it changes — and only then.
The package is copied, one module's code is edited, and the keys are recomputed against the copy."""
import os, shutil
from pathlib import Path
import pytest
import supra, supra.core.cache as C

pytestmark = pytest.mark.skipif(not os.environ.get('SUPRA_DATA'), reason='the data keys fingerprint the local corpus (SUPRA_DATA)')

def _keys():
    from supra.core.config import preset
    from supra.data.tokenizers import tokenizer_key
    from supra.data.pool import pool_key
    from supra.lab.experiment import run_dir, EVAL_CODE
    p = preset('smoke', 'cpu')
    return dict(tokenizer=tokenizer_key(p.data), pool=pool_key(p.data, 'tokenizer-sha'), run=run_dir('out', 'seed0', 'pool-key', p.model, p.train).name,
                eval=C.code_fingerprint(*EVAL_CODE))

@pytest.fixture
def pkg(tmp_path, monkeypatch):
    root = tmp_path / 'supra'
    shutil.copytree(Path(supra.__file__).parent, root, ignore=shutil.ignore_patterns('__pycache__'))
    monkeypatch.setattr(C, 'package_dir', lambda: root)
    return root

def _edit(f:Path, line:str): f.write_text(f.read_text() + f'\n{line}\n')

def test_keys_move_with_the_code_of_their_stage(pkg):
    k0 = _keys()
    m = pkg / 'model' / 'transformer.py'
    m.write_text('# a comment\n' + m.read_text().replace('"""', '"""Edited prose. ', 1))   # a comment and the docstring: no key moves
    assert _keys() == k0
    _edit(pkg / 'model' / 'transformer.py', 'MODEL_CHANGED = 1')             # the model: checkpoints (the LR walk's included) and evaluations move; data does not
    k1 = _keys()
    assert k1['run'] != k0['run'] and k1['eval'] != k0['eval']
    assert (k1['tokenizer'], k1['pool']) == (k0['tokenizer'], k0['pool'])
    _edit(pkg / 'data' / 'tokenizers.py', 'TOKENIZER_CHANGED = 1')    # the tokenizer: the tokenizer and the pool move
    k2 = _keys()
    assert k2['tokenizer'] != k1['tokenizer'] and k2['pool'] != k1['pool']
    _edit(pkg / 'pages' / 'paper.py', 'REPORT_CHANGED = 1')           # reporting: no cached product depends on it
    assert _keys() == k2

def test_a_stale_pool_is_never_reused(pkg, tmp_path, monkeypatch):
    "After a change to the data code the pool is looked up under a new key: the cached one is not returned."
    from supra.core.config import preset
    from supra.data.pool import build_pool
    monkeypatch.setenv('SUPRA_CACHE', str(tmp_path / 'cache'))
    cfg = preset('smoke', 'cpu').data
    a = build_pool(cfg)
    _edit(pkg / 'data' / 'pool.py', 'POOL_CODE_CHANGED = 1')
    b = build_pool(cfg)
    assert a.key != b.key and (a.tokens == b.tokens).all()    # a new product, rebuilt (same bytes: the change did nothing)
