"""The README's map of the code matches the tree: every library notebook and module it names exists and exports to
that module, and every module of the package is on the map."""
import json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _map():
    text = (ROOT / 'README.md').read_text()
    return dict(re.findall(r'`(\d\d_\w+/\d\d_\w+)` → `(supra[\w.]*)`', text))

def test_map_matches_the_tree():
    m = _map()
    assert len(m) > 30, m
    for nb, mod in m.items():
        path = ROOT / 'nbs' / f'{nb}.ipynb'
        assert path.exists(), nb
        src = ''.join(''.join(c['source']) for c in json.loads(path.read_text())['cells'])
        assert f"default_exp {mod.removeprefix('supra.')}" in src, (nb, mod)
        assert (ROOT / (mod.replace('.', '/') + '.py')).exists(), mod
    modules = {'supra.' + p.relative_to(ROOT / 'supra').with_suffix('').as_posix().replace('/', '.')
               for p in (ROOT / 'supra').rglob('*.py') if not p.name.startswith('_')}
    assert modules == set(m.values()), (sorted(modules - set(m.values())), sorted(set(m.values()) - modules))

def test_library_modules_stay_small():
    "Modules of one concept each: ~400 lines at most."
    big = {p.name: n for p in (ROOT / 'supra').rglob('*.py') if not p.name.startswith('_') and (n := len(p.read_text().splitlines())) > 420}
    assert not big, big

def test_evaluation_model_and_data_never_import_training():
    "The model, the data and evaluation never import the trainer (checkpoints are read through supra.model.checkpoint)."
    for part in ('eval', 'model', 'data'):
        for f in (ROOT / 'supra' / part).glob('*.py'):
            assert not re.search(r'from \.\.train\b|from supra\.train\b|import supra\.train\b', f.read_text()), f
