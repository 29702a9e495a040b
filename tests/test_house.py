"""The house rules, on the import graph of the package built from the code (imports inside functions count too):
no cycles, no upward imports between the parts, no private names across modules, no re-export facades."""
import ast, collections, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The parts in the order data flows; a module may import its own part or an earlier one. The front (cli, docs, bench) is last.
LAYERS = ('core', 'data', 'model', 'train', 'eval', 'pages', 'dashboard', 'lab', 'golf', 'flm', 'experiments', 'front')

def modules() -> dict:
    out = {}
    for p in (ROOT / 'supra').rglob('*.py'):
        if p.name == '_modidx.py': continue
        parts = list(p.relative_to(ROOT).with_suffix('').parts)
        if parts[-1] == '__init__': parts = parts[:-1]
        out['.'.join(parts)] = p
    return out

def imports(mods:dict):
    "(importer, target module, imported name or None, line) for every import of a supra module."
    for m, p in mods.items():
        pkg = m.split('.') if p.name == '__init__.py' else m.split('.')[:-1]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom):
                tgt = '.'.join(pkg[:len(pkg) - n.level + 1] + ([n.module] if n.module else [])) if n.level else (n.module or '')
                for a in n.names:
                    if f'{tgt}.{a.name}' in mods: yield m, f'{tgt}.{a.name}', None, n.lineno
                    elif tgt in mods: yield m, tgt, a.name, n.lineno
            elif isinstance(n, ast.Import):
                for a in n.names:
                    t = a.name
                    while t and t not in mods and '.' in t: t = t.rsplit('.', 1)[0]
                    if t in mods: yield m, t, None, n.lineno

def layer(m:str) -> int:
    if m == 'supra': return 0                                   # the (empty) package itself
    part = m.split('.')[1] if m.count('.') >= 1 else ''
    return LAYERS.index(part) if part in LAYERS[:-1] else len(LAYERS) - 1

def defined(p:Path) -> set:
    "Top-level names a module defines (functions, classes, assignments), not the ones it imports."
    out = set()
    for n in ast.parse(p.read_text()).body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                out |= {x.id for x in ast.walk(t) if isinstance(x, ast.Name)}
        elif isinstance(n, (ast.If, ast.Try, ast.With)):
            out |= {x.name for x in ast.walk(n) if isinstance(x, (ast.FunctionDef, ast.ClassDef))}
    return out

def test_the_package_is_in_parts():
    mods = modules()
    flat = sorted(m for m, p in mods.items() if p.parent == ROOT / 'supra' and p.name != '__init__.py')
    assert flat == ['supra.bench', 'supra.cli', 'supra.docs', 'supra.new'], flat          # only the front lies flat
    parts = {m.split('.')[1] for m in mods if m.count('.') >= 2}
    assert parts == set(LAYERS[:-1]), parts

def test_no_import_cycles():
    mods = modules(); edges = collections.defaultdict(set)
    for a, b, _, _ in imports(mods):
        if a != b: edges[a].add(b)
    state, cycles = {}, []
    def visit(v, stack):
        state[v] = 1; stack.append(v)
        for w in edges[v]:
            if state.get(w) == 1: cycles.append(stack[stack.index(w):] + [w])
            elif w not in state: visit(w, stack)
        state[v] = 2; stack.pop()
    for v in sorted(mods):
        if v not in state: visit(v, [])
    assert not cycles, cycles

def test_no_upward_imports():
    up = [f'{a}:{ln} -> {b}' for a, b, _, ln in imports(modules()) if layer(b) > layer(a)]
    assert not up, up

def test_no_private_names_across_modules():
    bad = [f'{a}:{ln} -> {b}.{n}' for a, b, n, ln in imports(modules()) if n and a != b and n.startswith('_') and not n.startswith('__')]
    assert not bad, bad

def test_names_are_imported_from_where_they_are_defined():
    mods = modules(); defs = {m: defined(p) for m, p in mods.items()}
    bad = [f'{a}:{ln} imports {n} from {b}, which does not define it' for a, b, n, ln in imports(mods) if n and n not in defs[b]]
    assert not bad, bad

def test_the_house_rules_catch_a_violation(tmp_path, monkeypatch):
    "The checks above can fail: a planted upward import, private import and cycle are each found."
    import shutil
    pkg = tmp_path / 'supra'
    shutil.copytree(ROOT / 'supra', pkg, ignore=shutil.ignore_patterns('__pycache__'))
    (pkg / 'core' / 'config.py').write_text((pkg / 'core' / 'config.py').read_text() + '\nfrom supra.lab.experiment import envelope\n')
    (pkg / 'data' / 'pool.py').write_text((pkg / 'data' / 'pool.py').read_text() + '\nfrom supra.data.corpus import _hidden\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mods = modules()
    assert any(a == 'supra.core.config' and b == 'supra.lab.experiment' for a, b, _, _ in imports(mods) if layer(b) > layer(a))
    assert any(n == '_hidden' for _, _, n, _ in imports(mods))
    for t in (test_no_upward_imports, test_no_private_names_across_modules, test_no_import_cycles):
        try: t()
        except AssertionError: continue
        raise AssertionError(f'{t.__name__} did not fail on a planted violation')
