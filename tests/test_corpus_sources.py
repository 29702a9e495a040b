"""Where text comes from, beyond the corpus notebook's lessons: the data root found without exporting anything (SUPRA_DATA,
else the directory ./install.sh recorded in the venv), wikipedia-en streamed from the Hub (the exact call, checked with a
stand-in for `datasets.load_dataset`; a failing Hub as one clear sentence), and a folder of your own .txt/.jsonl files as a
corpus — validated, held out like a stream, keyed by its content, named in results, trainable from the command line."""
import json, os, random, subprocess, sys, textwrap
from pathlib import Path

import pytest

import supra.data.corpus as C
from supra.core.config import ConfigError, DataConfig
from supra.data.corpus import corpus_fingerprint, corpus_source, data_cache, data_root, iter_docs, val_texts
from supra.data.pool import build_pool, pool_key
from supra.data.tokenizers import tokenizer_key

ROOT = Path(__file__).resolve().parents[1]
TINY = DataConfig(n_tokens=1024, vocab_size=300, tokenizer_chars=5000, val_docs=2)

# ---------------------------------------------------------------- the data root

def test_data_root_supra_data_wins_then_the_recorded_root(tmp_path, monkeypatch):
    venv, shared, mine = tmp_path / 'venv', tmp_path / 'shared-data', tmp_path / 'mine'
    for d in (venv, shared, mine): d.mkdir()
    monkeypatch.setattr(sys, 'prefix', str(venv))
    monkeypatch.delenv('SUPRA_DATA', raising=False)
    assert data_root() is None and 'recorded none' in C.data_root_origin()           # nothing recorded, nothing set: the Hub
    (venv / C.DATA_ROOT_FILE).write_text(f"{shared}\n")                            # what ./install.sh writes
    assert data_root() == shared and str(venv / 'supra-data') in C.data_root_origin()
    monkeypatch.setenv('SUPRA_DATA', str(mine))
    assert data_root() == mine                                                     # SUPRA_DATA, when set, wins
    monkeypatch.setenv('SUPRA_DATA', '')
    assert data_root() is None                                                     # set but empty: no data root


def test_evaluation_tasks_use_the_same_root(tmp_path, monkeypatch):
    from supra.eval.tasks import check_task_data, TaskDataError
    monkeypatch.setattr(sys, 'prefix', str(tmp_path))
    monkeypatch.delenv('SUPRA_DATA', raising=False)
    (tmp_path / C.DATA_ROOT_FILE).write_text(str(tmp_path / 'data'))
    with pytest.raises(TaskDataError, match=r"boolq/validation\.jsonl.*recorded by \./install\.sh"): check_task_data(['boolq'])


def test_install_sh_records_the_data_root():
    "install.sh writes the root it finds (../shared/data) or is given (--data DIR) into .venv/supra-data; bad options stop it."
    s = (ROOT / 'install.sh').read_text()
    assert '.venv/supra-data' in s and '--data' in s and '../shared/data' in s and C.DATA_ROOT_FILE == 'supra-data'
    r = subprocess.run(['bash', str(ROOT / 'install.sh'), '--data', str(ROOT / 'no-such-dir')], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and 'is not a directory' in r.stderr, r.stderr
    r = subprocess.run(['bash', str(ROOT / 'install.sh'), '--bogus'], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown option '--bogus'" in r.stderr, r.stderr

# ---------------------------------------------------------------- wikipedia-en from the Hub

def _row(i, title, n=1200):
    return dict(id=str(i), url=f'https://en.wikipedia.org/wiki/{title}', title=title, text=(f'{title} is a subject. ' * n)[:n])


def test_wikipedia_hub_exact_call_schema_and_holdout(tmp_path, monkeypatch):
    "No local copy: wikipedia-en streams wikimedia/wikipedia 20231101.en; rows become the local schema; the first val_docs are held out."
    rows = [_row(1, 'Alpha'), _row(2, 'Stub', 200), _row(3, 'Beta'), _row(4, 'Gamma (disambiguation)'), _row(5, 'Delta'), _row(6, 'Epsilon')]
    calls = []

    def fake_load_dataset(*args, **kw):
        calls.append((args, kw))
        return iter(rows)
    import datasets
    monkeypatch.setattr(datasets, 'load_dataset', fake_load_dataset)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')                   # no probe of the endpoint: only the stand-in is asked
    empty = tmp_path / 'empty-root'; empty.mkdir()
    src = corpus_source('wikipedia-en', empty)
    assert src == dict(corpus='wikipedia-en', kind='hub', path='wikimedia/wikipedia', name='20231101.en', split='train')
    val = list(iter_docs('wikipedia-en', 'val', val_docs=2, root=empty))
    train = list(iter_docs('wikipedia-en', 'train', val_docs=2, root=empty))
    args, kw = calls[0]
    assert (args + (kw.pop('name'),) if 'name' in kw else args) == ('wikimedia/wikipedia', '20231101.en')
    assert kw == dict(split='train', streaming=True)
    assert [d.split('\n\n')[0] for d in val] == ['Alpha', 'Beta'] and [d.split('\n\n')[0] for d in train] == ['Delta', 'Epsilon']
    assert val[0] == 'Alpha\n\n' + rows[0]['text']              # the local copy's text: title line, blank line, body
    recs = list(C._hub_stream('wikipedia-en'))
    assert recs[0] == dict(text=val[0], id='enwiki-1', url=rows[0]['url'], title='Alpha')
    assert val_texts(TINY.replace(corpus='wikipedia-en'), root=empty) == val
    assert corpus_fingerprint(src, 2) == dict(hub=['wikimedia/wikipedia', '20231101.en', 'train'], holdout=2)


def test_failing_hub_is_one_sentence_naming_both_ways(tmp_path, monkeypatch):
    import datasets

    def refuse(*a, **kw): raise ConnectionError("Couldn't reach the Hub")
    monkeypatch.setattr(datasets, 'load_dataset', refuse)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('SUPRA_DATA', '')                        # no data root at all
    with pytest.raises(ConfigError) as e: iter_docs('wikipedia-en')
    msg = str(e.value)
    assert e.value.field == 'corpus' and msg.startswith("corpus='wikipedia-en' is invalid: allowed ")
    for part in ('there is no data root', './install.sh --data DIR', 'SUPRA_DATA=DIR', 'network access to the Hugging Face Hub',
                 "streaming wikimedia/wikipedia (20231101.en) from the Hugging Face Hub failed: ConnectionError: Couldn't reach the Hub"):
        assert part in msg, (part, msg)
    assert 'is SUPRA_DATA' not in msg and msg.count('. ') == 0 and '\n' not in msg, msg       # one sentence


def test_real_hub_call_offline_fails_clearly(tmp_path):
    "The real datasets call in offline mode (no stand-in): the same one-sentence ConfigError, fast."
    code = textwrap.dedent("""
        from supra.core.config import ConfigError
        from supra.data.corpus import iter_docs
        try: iter_docs('wikipedia-en')
        except ConfigError as e: print(e); raise SystemExit(3)
        print('NO ERROR')""")
    env = dict(os.environ, SUPRA_DATA='', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', SUPRA_CACHE=str(tmp_path / 'cache'))
    r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert r.returncode == 3, r.stdout + r.stderr
    out = r.stdout.strip()
    assert out.startswith("corpus='wikipedia-en' is invalid") and 'wikimedia/wikipedia (20231101.en) from the Hugging Face Hub failed' in out
    assert './install.sh --data DIR' in out and 'network access to the Hugging Face Hub' in out and len(out.splitlines()) == 1

# ---------------------------------------------------------------- your own folder

_SYL = "ka lo mi ren tu sa vel or an dri po ne shi ta gu mar el fo bi zen ul ra co dem is ha lu nor pe tri".split()
_rng = random.Random(1)
WORDS = "the of and a to in is was for on that by with as at from it an are were which".split() + \
        sorted({''.join(_rng.choice(_SYL) for _ in range(_rng.randint(1, 3))) for _ in range(3000)})   # a lexicon with merges to learn


def make_folder(d:Path, n_txt=12, n_lines=40, words=(60, 160), seed=0) -> Path:
    "A folder of .txt files (one document each) and a .jsonl file (one per line), of random sentences."
    rng = random.Random(seed)
    def doc(): return ' '.join(WORDS[min(int(rng.paretovariate(0.8)) - 1, len(WORDS) - 1)] for _ in range(rng.randint(*words))) + '.'
    (d / 'sub').mkdir(parents=True, exist_ok=True)
    for i in range(n_txt): (d / f'{i:02d}.txt').write_text(doc())
    (d / 'sub' / 'more.jsonl').write_text(''.join(json.dumps({'text': doc(), 'n': k}) + '\n' for k in range(n_lines)))
    return d


def test_folder_corpus_validation_names_field_value_and_allowed(tmp_path):
    (tmp_path / 'empty').mkdir(); (tmp_path / 'empty' / 'notes.md').write_text('not a corpus file')
    (tmp_path / 'file.txt').write_text('a file, not a folder')
    for value, why in [(str(tmp_path / 'missing'), 'does not exist'), (str(tmp_path / 'empty'), 'holds no .txt or .jsonl files'),
                       (str(tmp_path / 'file.txt'), 'is a file, not a folder'), ('', 'a path to a folder')]:
        with pytest.raises(ConfigError) as e: DataConfig(corpus=value)
        assert e.value.field == 'corpus' and str(e.value).startswith(f"corpus={value!r} is invalid: allowed one of ['wikipedia-en', 'fineweb-edu'], or a path to a folder of .txt/.jsonl files")
        assert why in str(e.value), str(e.value)
        with pytest.raises(ConfigError, match='corpus='): iter_docs(value)


def test_folder_corpus_documents_holdout_and_cache_place(tmp_path, monkeypatch):
    d = make_folder(tmp_path / 'texts', n_txt=3, n_lines=4)
    monkeypatch.chdir(tmp_path)
    cfg = TINY.replace(corpus='texts')                                   # relative to the working directory, recorded absolute
    assert cfg.corpus == str(d.resolve()) and corpus_source('texts')['kind'] == 'folder'
    docs = [(d / f'{i:02d}.txt').read_text() for i in range(3)] + [json.loads(l)['text'] for l in (d / 'sub' / 'more.jsonl').read_text().splitlines()]
    assert list(iter_docs(cfg.corpus, 'val', val_docs=2)) == docs[:2] == val_texts(cfg)
    assert list(iter_docs(cfg.corpus, 'train', val_docs=2)) == docs[2:]
    with pytest.raises(ConfigError, match='val_docs=99 is invalid: allowed at most 7'): val_texts(cfg.replace(val_docs=99))
    c = data_cache(tmp_path / 'cache', cfg.corpus)
    assert c.parent == tmp_path / 'cache' and c.name.startswith('folder-texts-') and not any(p.name == 'cache' for p in d.iterdir())
    (d / 'bad.jsonl').write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 has no string field 'text'"): list(iter_docs(cfg.corpus, 'train', val_docs=2))


def test_folder_corpus_keys_follow_content(tmp_path):
    "Same content, same keys; an edited file (same size), a new file or another held-out prefix: new tokenizer and pool keys."
    d = make_folder(tmp_path / 'texts')
    cfg = DataConfig(corpus=str(d), n_tokens=1024, vocab_size=300, tokenizer_chars=20_000, val_docs=3)
    pool = build_pool(cfg, cache=tmp_path / 'cache')
    assert pool.meta['corpus'] == str(d.resolve()) and pool.meta['source']['kind'] == 'folder'
    tk, pk = tokenizer_key(cfg), pool.key
    assert build_pool(cfg, cache=tmp_path / 'cache').key == pk
    f = d / '05.txt'; t = f.read_text(); f.write_text(t[:-2] + ('x' if t[-2] != 'x' else 'y') + t[-1])
    assert tokenizer_key(cfg) != tk
    pool2 = build_pool(cfg, cache=tmp_path / 'cache')
    assert pool2.key != pk and pool2.path != pool.path
    tk2 = tokenizer_key(cfg)
    (d / 'sub' / 'extra.txt').write_text('one more document')
    assert tokenizer_key(cfg) != tk2
    assert tokenizer_key(cfg.replace(val_docs=4)) != tokenizer_key(cfg)


def test_folder_corpus_is_named_in_the_plan(tmp_path):
    "An experiment's -p corpus PATH: validated in the plan, recorded by its absolute path (the results' corpus field and the paper)."
    from supra.experiments.epochs.run import plan
    d = make_folder(tmp_path / 'texts', n_txt=2, n_lines=2)
    pl = plan(preset='smoke', corpus=str(d), out_dir=str(tmp_path / 'out'), paper=None)
    assert pl.corpus == pl.data.corpus == str(d.resolve())
    with pytest.raises(ConfigError, match=r"corpus='.*missing' is invalid: allowed one of \['wikipedia-en', 'fineweb-edu'\], or a path to a folder"):
        plan(preset='smoke', corpus=str(tmp_path / 'missing'), out_dir=str(tmp_path / 'out'), paper=None)


def test_cli_trains_on_a_folder(tmp_path):
    "`python -m supra.train --preset smoke --corpus FOLDER`: tokenizer and pool from your own text, a few steps, the folder named in its output."
    d = make_folder(tmp_path / 'my texts', n_txt=30, n_lines=400, words=(80, 140))
    env = {k: v for k, v in os.environ.items() if k not in ('SUPRA_NO_JEMALLOC', 'LD_PRELOAD', 'SUPRA_JEMALLOC_REEXEC')}
    env.update(OMP_NUM_THREADS='1', SUPRA_CACHE=str(tmp_path / 'cache'), SUPRA_DATA='', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    r = subprocess.run([sys.executable, '-m', 'supra.train', '--preset', 'smoke', '--corpus', str(d), '--out_dir', str(tmp_path / 'run'),
                        '--tokens', '4096', '--device', 'cpu', '--no-compile', '--quiet'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['corpus'] == str(d.resolve()) and out['result']['step'] >= 1
    [pool_meta] = (tmp_path / 'cache' / 'data').glob(f"folder-my_texts-*/pool-{out['pool']}.json")      # the cache, not your folder
    [tok_meta] = pool_meta.parent.glob('tok-*/meta.json')
    assert json.loads(pool_meta.read_text())['corpus'] == json.loads(tok_meta.read_text())['corpus'] == str(d.resolve())
    bad = subprocess.run([sys.executable, '-m', 'supra.train', '--corpus', str(tmp_path / 'nope'), '--out_dir', str(tmp_path / 'r2')],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "corpus=" in bad.stderr and 'does not exist' in bad.stderr, bad.stderr[-2000:]
