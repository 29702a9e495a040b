"""Helpers shared by the test modules: the project root, the environment a notebook or command runs in, papermill runs of
an experiment notebook, the checks that a bad parameter is refused (in-process by the plan, and end to end in the notebook's
first cell), an experiment re-run in-process, small model and tokenizer fixtures that need no data set, a toy token pool, one torch thread for a
reference run, and SIGKILL at a given row."""
import json, math, os, signal, subprocess, sys, time
from contextlib import contextmanager
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')

# The test files the two workers of ./test.sh take first, the longest first (worker-seconds measured on the 2-core VM): with
# `--dist loadfile --no-loadscope-reorder` a worker that frees up takes the next file in this order, so no long file starts last
# while the other worker idles (xdist's own order, the most tests first, left the few-test smoke runs to the end). The rest follow.
LONGEST_FIRST = ('test_epochs', 'test_train', 'test_golf', 'test_curriculum', 'test_topology', 'test_cli', 'test_eval', 'test_flm',
                 'test_jupyterlab', 'test_contract', 'test_data', 'test_dashboard', 'test_gpu_acceptance')

def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))     # stable: each file's own order kept

def data_root() -> str | None:
    "The local data sets: $SUPRA_DATA, else ../shared/data beside the checkout (as ./test.sh finds it)."
    if os.environ.get('SUPRA_DATA'): return os.environ['SUPRA_DATA']
    d = ROOT.parent / 'shared' / 'data'
    return str(d) if d.is_dir() else None

def nb_env(cache=None, **kw) -> dict:
    "The environment of a notebook or command under test: offline, the local data sets, `cache` as SUPRA_CACHE unless one is set."
    env = dict(os.environ, **OFFLINE, **{k: str(v) for k, v in kw.items()})
    if not env.get('SUPRA_DATA') and data_root(): env['SUPRA_DATA'] = data_root()
    if cache is not None: env.setdefault('SUPRA_CACHE', str(cache))
    return env

def papermill(nb:str, out_nb, cache=None, env:dict|None=None, timeout:int=900, **params) -> subprocess.CompletedProcess:
    """Run `nbs/<nb>.ipynb` with papermill on the `supra` kernel from the project root, `params` its parameters, the kernel's
    environment `env` (default `nb_env(cache)`). Papermill runs in this test process, so a run starts one new process, the kernel,
    as the `papermill` command's run would; the result reads like the command's: `returncode` 1 and the error in `stderr` when a
    cell fails. The command itself (its terminal, SIGKILL of its process group) is run as one in test_epochs and test_cli."""
    import papermill as pm
    args = ['papermill', f'nbs/{nb}.ipynb', str(out_nb), *(f'{k}={v}' for k, v in params.items())]
    saved = dict(os.environ)
    os.environ.clear(); os.environ.update(env or nb_env(cache))        # what the kernel inherits
    try:
        pm.execute_notebook(str(ROOT / 'nbs' / f'{nb}.ipynb'), str(out_nb), kernel_name='supra', cwd=str(ROOT), progress_bar=False,
                            parameters={k: str(v) if isinstance(v, Path) else v for k, v in params.items()}, execution_timeout=timeout)
        return subprocess.CompletedProcess(args, 0, '', '')
    except pm.PapermillExecutionError as e: return subprocess.CompletedProcess(args, 1, '', str(e))
    finally: os.environ.clear(); os.environ.update(saved)

def rerun_in_process(monkeypatch, experiment:str, cache=None, **params) -> dict:
    """The experiment notebook's own calls — `plan`, `run`, `publish` — again in this process, in the environment its kernel had
    (`nb_env(cache)`): what re-running the notebook computes, without a second kernel start. Returns the results envelope."""
    import importlib
    from supra.lab.experiment import publish
    for k, v in nb_env(cache).items(): monkeypatch.setenv(k, v)
    exp, page = (importlib.import_module(f'supra.experiments.{experiment}.{m}') for m in ('run', 'paper'))
    res = exp.run(exp.plan(**{k: str(v) if isinstance(v, Path) else v for k, v in params.items()}))
    publish(page, res)
    return res

def finite(v) -> bool: return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

def assert_plan_refuses(plan, field:str, **params):
    "`plan(**params)` raises ConfigError naming `field` (the experiment's validation, in-process: no kernel, no compute)."
    from supra.core.config import ConfigError
    with pytest.raises(ConfigError) as e: plan(**params)
    assert f'{field}=' in str(e.value), str(e.value)
    return e.value

def assert_stopped_in_plan_cell(r:subprocess.CompletedProcess, out_nb, field:str):
    "A papermill run `r` that failed in the notebook's plan cell — and only there — with a ConfigError naming `field`."
    assert r.returncode != 0, r.stderr[-2000:]
    nb = json.loads(Path(out_nb).read_text())
    errs = [(i, o) for i, c in enumerate(nb['cells']) for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert len(errs) == 1, [e for _, e in errs]
    i, err = errs[0]
    assert 'exp.plan(' in ''.join(nb['cells'][i]['source'])          # the validation cell, before any compute
    assert err['ename'] == 'ConfigError' and f'{field}=' in err['evalue'], err['evalue']

def scaled(cfg, seed=0):
    """A random model with O(1) logits: at the 0.02 init logits are ~1e-2, so greedy decoding would barely depend on
    the weights and a 1e-4 tolerance would prove little."""
    import torch
    from supra.model.transformer import Transformer
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1])) if p.dim() == 2 else p.normal_(1, 0.1)
    return m

def tiny_bpe(text:str, vocab_size:int, specials=None):
    "A byte-level BPE tokenizer trained on `text` in memory, with the pool's end-of-text token."
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from supra.data.tokenizers import EOS
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials or (EOS,)),
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return t

def bigram_pool(n:int=30_000, vocab:int=64, seed:int=0):
    "A toy token pool from a random bigram process (each token has four likely successors): a model learns it in seconds."
    import numpy as np
    g = np.random.default_rng(seed)
    nxt, choice = g.integers(0, vocab, size=(vocab, 4)), g.integers(0, 4, size=n)
    out = np.zeros(n, dtype=np.uint16)
    for i in range(1, n): out[i] = nxt[out[i - 1], choice[i]]
    return out

@contextmanager
def one_thread():
    """torch on one thread within, as the training subprocesses of the resume tests run: an uninterrupted reference run in the
    test's own process then sums in the same order as they do, so a resumed run can be compared bit for bit. The caller's setting is restored."""
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try: yield
    finally: torch.set_num_threads(n)

def kill_at_rows(p:subprocess.Popen, metrics:Path, rows:int, timeout:float=120):
    "SIGKILL the training process `p` once its `metrics` file holds `rows` train rows; fails if it ended first."
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and metrics.read_text().count('"loss"') >= rows: break
        if p.poll() is not None: break
        time.sleep(0.005)
    assert p.poll() is None, f'the run ended before it could be killed: {p.stderr.read().decode()[-2000:] if p.stderr else ""}'
    p.send_signal(signal.SIGKILL); p.wait()
