"""supra.data.pool: corpora, tokenizer, token pool, epochs, byte accounting — beyond the notebook's lessons.

Needs SUPRA_DATA pointing at shared/data (wikipedia-en) for the real-text tests; tiny corpora are written to tmp dirs.
"""
import itertools, json, os, random, subprocess, sys, textwrap, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from supra.core.config import ConfigError, DataConfig
import supra.data.pool as D
import supra.data.tokenizers as T
from supra.data.pool import EOS, EpochLoader, build_pool, read_pool, write_pool
from supra.data.tokenizers import BOS, get_tokenizer, tokenizer_key
from supra.data.textbytes import count_bytes, decode_bytes, token_byte_lengths
from supra.data.corpus import iter_docs, val_texts, write_corpus

ROOT = Path(__file__).resolve().parents[1]
HAVE_WIKI = 'wikipedia-en' in D.available_corpora()
needs_wiki = pytest.mark.skipif(not HAVE_WIKI, reason="SUPRA_DATA does not hold wikipedia-en (set SUPRA_DATA=../shared/data)")

MID = DataConfig(n_tokens=200_000, vocab_size=2048, tokenizer_chars=2_000_000, val_docs=20)
WEIRD = ["", " leading space", "  two", "\ttab\r\nCRLF\n\n\n", "naïve café Zürich", "東京タワー 🙂👍🏽", "e\u0301 combining",
         "\x00nul and \x7f del", "<|endoftext|> and <|bos|> in text", "Ω≈ç√∫˜µ≤≥÷", "a" * 300, "مرحبا بالعالم", "\u200b zero width"]


@pytest.fixture(scope='module')
def cache(tmp_path_factory): return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def mid_pool(cache):
    if not HAVE_WIKI: pytest.skip("needs wikipedia-en under SUPRA_DATA")
    return build_pool(MID, cache=cache)


def tiny_root(tmp_path, corpus='wikipedia-en', n=40, seed=0):
    rng = random.Random(seed)
    words = "the of and a to in is was for on that by with as at from his her it an are were which alpha beta gamma delta café naïve 東京".split()
    train = [' '.join(rng.choice(words) for _ in range(rng.randint(30, 120))) + '.' for _ in range(n)]
    write_corpus(tmp_path, corpus, train, val=[f"held out document {i}" for i in range(5)], docs_per_shard=7)
    return tmp_path, train


TINY = DataConfig(n_tokens=1024, vocab_size=300, tokenizer_chars=5000, val_docs=3)

# ---------------------------------------------------------------- corpora

def test_local_layout_order_and_split(tmp_path):
    root, train = tiny_root(tmp_path)
    assert list(iter_docs('wikipedia-en', root=root)) == train               # shard order, then line order
    assert list(iter_docs('wikipedia-en', 'val', val_docs=3, root=root)) == [f"held out document {i}" for i in range(3)]
    assert val_texts(TINY, root=root) == [f"held out document {i}" for i in range(3)]
    with pytest.raises(ConfigError, match="val_docs=9 is invalid: allowed at most 5"): val_texts(TINY.replace(val_docs=9), root=root)
    with pytest.raises(ConfigError, match="split='test'"): iter_docs('wikipedia-en', 'test', root=root)


def test_missing_corpus_lists_available(tmp_path, monkeypatch):
    root, _ = tiny_root(tmp_path)
    assert D.available_corpora(root) == ['wikipedia-en']
    for v in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy'): monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')           # an unreachable Hub: the probe refuses at once
    with pytest.raises(ConfigError, match=r"corpus='fineweb-edu' is invalid: allowed one of the corpora available here: \['wikipedia-en'\]"):
        iter_docs('fineweb-edu', root=root)
    with pytest.raises(ConfigError, match=r"available here: \[\]"): iter_docs('wikipedia-en', root=tmp_path / 'nothing')


def _run(code, env, timeout=120):
    env = {**os.environ, **env}
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


HUB_CODE = """
    from supra.core.config import DataConfig, ConfigError
    from supra.data.pool import build_pool
    try: build_pool(DataConfig(corpus='fineweb-edu', n_tokens=1024, vocab_size=300, tokenizer_chars=1000))
    except ConfigError as e: print('ERR', e); raise SystemExit(3)
    print('NO ERROR')
"""


@pytest.mark.parametrize('env', [dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1'),             # offline mode: datasets refuses
                                 dict(HF_HUB_OFFLINE='0', HF_DATASETS_OFFLINE='0',              # online, Hub unreachable: the probe
                                      HF_ENDPOINT='http://127.0.0.1:9', HTTPS_PROXY='', https_proxy='', ALL_PROXY='', all_proxy='')])
def test_fineweb_from_hub_fails_clearly(tmp_path, env):
    "The Hub code path is real; unreachable, it is a ConfigError naming the available corpora (the timeout guards 'fast')."
    root, _ = tiny_root(tmp_path)
    r = _run(HUB_CODE, dict(env, SUPRA_DATA=str(root), SUPRA_CACHE=str(tmp_path / 'cache')), timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "corpus='fineweb-edu' is invalid: allowed one of the corpora available here: ['wikipedia-en']" in r.stdout
    assert "Hugging Face Hub failed" in r.stdout


def test_local_fineweb_is_its_own_corpus(tmp_path):
    "Same texts under both names: two corpora, two keys, each product labelled with its own name."
    root, train = tiny_root(tmp_path, 'fineweb-edu')
    write_corpus(root, 'wikipedia-en', train, val=['v'] * 5, docs_per_shard=7)
    fw = build_pool(TINY.replace(corpus='fineweb-edu'), root=root, cache=tmp_path / 'c')
    wk = build_pool(TINY, root=root, cache=tmp_path / 'c')
    assert fw.meta['corpus'] == 'fineweb-edu' and fw.meta['source']['kind'] == 'local' and wk.meta['corpus'] == 'wikipedia-en'
    assert fw.key != wk.key and fw.path != wk.path and 'fineweb-edu' in str(fw.path)


def test_empty_corpus(tmp_path):
    write_corpus(tmp_path / 'a', 'wikipedia-en', train=[], val=['v'])
    with pytest.raises(ConfigError, match=r"has no shard-\*\.jsonl\.zst"): build_pool(TINY, root=tmp_path / 'a', cache=tmp_path / 'c')
    write_corpus(tmp_path / 'b', 'wikipedia-en', train=['', ''], val=['v'])
    with pytest.raises(ConfigError, match="has no documents"): build_pool(TINY, root=tmp_path / 'b', cache=tmp_path / 'c')


def test_corrupt_shard_is_a_clear_error(tmp_path):
    import zstandard
    d = tmp_path / 'wikipedia-en'; d.mkdir()
    (d / 'shard-000.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\nnot json\n'))
    with pytest.raises(ValueError, match="line 2 is not JSON"): list(iter_docs('wikipedia-en', root=tmp_path))

# ---------------------------------------------------------------- tokenizer

@needs_wiki
def test_round_trip_real_and_weird_text(mid_pool):
    tok = mid_pool.tokenizer
    assert tok.get_vocab_size() == 2048 and tok.token_to_id(EOS) == 0 and tok.token_to_id(BOS) == 1
    texts = val_texts(MID) + WEIRD
    assert sum(not t.isascii() for t in texts) > 10
    for t in texts:
        ids = tok.encode(t).ids
        assert tok.decode(ids) == t, t[:80]
        assert 0 not in ids and 1 not in ids                     # specials only ever come from the pool builder


def test_unsupported_vocab(tmp_path):
    root, _ = tiny_root(tmp_path)
    with pytest.raises(ConfigError, match=r"vocab_size=8192 is invalid: allowed at most \d+: .* characters of wikipedia-en"):
        get_tokenizer(TINY.replace(vocab_size=8192), root=root, cache=tmp_path / 'c')


def test_tokenizer_key_covers_what_determines_it(tmp_path):
    root, _ = tiny_root(tmp_path)
    k = tokenizer_key(TINY, root)
    assert k == tokenizer_key(TINY.replace(n_tokens=5000), root) == tokenizer_key(TINY.replace(val_docs=1), root)
    assert k != tokenizer_key(TINY.replace(vocab_size=301), root) != tokenizer_key(TINY.replace(tokenizer_chars=6000), root)
    root2, _ = tiny_root(tmp_path / 'other', seed=1)                 # same name, different data
    assert k != tokenizer_key(TINY, root2)

# ---------------------------------------------------------------- byte accounting

@needs_wiki
def test_count_bytes_random_spans_real_text(mid_pool):
    tok, rng = mid_pool.tokenizer, random.Random(1)
    L = token_byte_lengths(tok)
    assert L.shape == (2048,) and L[0] == L[1] == 0 and (L[2:] >= 1).all()
    texts = [t for t in val_texts(MID) if not t.isascii()][:15] + WEIRD
    n_exact = n_cut = 0
    for t in texts:
        ids = tok.encode(t).ids
        assert count_bytes(tok, ids) == len(t.encode()) == len(tok.decode(ids).encode())
        assert decode_bytes(tok, ids) == t.encode()
        for _ in range(300 if ids else 0):
            a = rng.randrange(len(ids)); b = rng.randrange(a, len(ids)) + 1
            span, raw = ids[a:b], decode_bytes(tok, ids[a:b])
            assert count_bytes(tok, span) == len(raw)
            assert tok.decode(span) == raw.decode('utf-8', errors='replace')
            try: raw.decode('utf-8')
            except UnicodeDecodeError: n_cut += 1; continue
            assert count_bytes(tok, span) == len(tok.decode(span).encode()); n_exact += 1
    assert n_exact > 3000 and n_cut > 0
    ids = tok.encode(texts[0]).ids[:64]
    assert count_bytes(tok, torch.tensor(ids).view(8, 8)) == count_bytes(tok, np.array(ids)) == count_bytes(tok, ids)


@needs_wiki
def test_pool_bytes_are_exact(mid_pool):
    tok, toks = mid_pool.tokenizer, np.asarray(mid_pool.tokens)
    eos = np.flatnonzero(toks == mid_pool.eos_id)
    whole = toks[:eos[-1]]                                         # whole documents only
    assert count_bytes(tok, whole) == len(tok.decode(whole.tolist()).encode())
    assert mid_pool.meta['bytes'] == count_bytes(tok, toks)

# ---------------------------------------------------------------- token pool

@needs_wiki
def test_pool_is_docs_eos_exact_n(mid_pool):
    p, tok = mid_pool, mid_pool.tokenizer
    assert p.n_tokens == len(p.tokens) == MID.n_tokens and p.tokens.dtype == np.uint16
    h = np.fromfile(p.path, dtype=np.int32, count=256)
    assert h[:3].tolist() == [20240520, 1, MID.n_tokens] and p.path.stat().st_size == 1024 + 2 * MID.n_tokens
    toks = np.asarray(p.tokens)
    docs = list(itertools.islice(iter_docs('wikipedia-en'), p.meta['docs']))
    expect = np.concatenate([np.array(tok.encode(d).ids + [p.eos_id], dtype=np.uint16) for d in docs])
    assert len(expect) >= MID.n_tokens > len(expect) - len(tok.encode(docs[-1]).ids) - 1
    assert np.array_equal(toks, expect[:MID.n_tokens])
    side = json.loads(p.path.with_suffix('.json').read_text())
    assert {'corpus', 'docs', 'bytes', 'tokens', 'key', 'sha256', 'source'} <= set(side) and side['tokens'] == MID.n_tokens
    assert side['corpus'] == 'wikipedia-en' and side['key'] == p.key
    assert not set(val_texts(MID)) & set(docs)                     # held-out documents are not in the pool


@needs_wiki
def test_pool_is_reproducible_from_scratch(mid_pool, tmp_path):
    again = build_pool(MID, cache=tmp_path)
    assert again.key == mid_pool.key and again.meta['sha256'] == mid_pool.meta['sha256']
    assert again.tokenizer.to_str() == mid_pool.tokenizer.to_str()


@needs_wiki
def test_cache_hit_reads_no_corpus_and_trains_nothing(mid_pool, cache, monkeypatch):
    def boom(*a, **k): raise AssertionError("cache hit touched the corpus or the trainer")
    for mod in (D, T): monkeypatch.setattr(mod, 'iter_docs', boom)
    monkeypatch.setattr(T, 'new_tokenizer', boom); monkeypatch.setattr(T, 'train_superbpe', boom)
    p = build_pool(MID, cache=cache)
    assert p.path == mid_pool.path and p.meta['sha256'] == mid_pool.meta['sha256']


def test_key_changes_with_n_tokens_and_data(tmp_path):
    root, _ = tiny_root(tmp_path, n=80)
    a = build_pool(TINY, root=root, cache=tmp_path / 'c')
    b = build_pool(TINY.replace(n_tokens=1500), root=root, cache=tmp_path / 'c')
    assert a.key != b.key and np.array_equal(np.asarray(b.tokens[:1024]), np.asarray(a.tokens))   # a prefix: same docs, same order
    root2, _ = tiny_root(tmp_path / 'other', n=80, seed=3)
    assert build_pool(TINY, root=root2, cache=tmp_path / 'c').key != a.key


def test_n_tokens_beyond_corpus(tmp_path):
    root, _ = tiny_root(tmp_path, n=5)
    with pytest.raises(ConfigError, match=r"n_tokens=100000 is invalid: allowed at most [\d,]+: all 5 training documents"):
        build_pool(TINY.replace(n_tokens=100_000), root=root, cache=tmp_path / 'c')
    assert not list((tmp_path / 'c').rglob('*.tmp')) and not list((tmp_path / 'c').rglob('pool-*.bin'))


def _damage_truncate(p): p.path.write_bytes(p.path.read_bytes()[:-7])
def _damage_header_n(p):
    raw = bytearray(p.path.read_bytes()); raw[8:12] = np.int32(999).tobytes(); p.path.write_bytes(bytes(raw))
def _damage_magic(p):
    raw = bytearray(p.path.read_bytes()); raw[0] ^= 1; p.path.write_bytes(bytes(raw))
def _damage_token(p):
    raw = bytearray(p.path.read_bytes()); raw[1024 + 100] ^= 0x5A; p.path.write_bytes(bytes(raw))
def _damage_sidecar(p): p.path.with_suffix('.json').write_text('{"trunc')
def _drop_sidecar(p): p.path.with_suffix('.json').unlink()
def _damage_empty(p): p.path.write_bytes(b'')
def _damage_append(p):
    with open(p.path, 'ab') as f: f.write(b'\x01\x00' * 3)          # trailing tokens the header does not count


@pytest.mark.parametrize('damage', [_damage_truncate, _damage_header_n, _damage_magic, _damage_token, _damage_sidecar, _drop_sidecar, _damage_empty, _damage_append])
def test_damaged_pool_is_rebuilt(tmp_path, damage):
    root, _ = tiny_root(tmp_path)
    p = build_pool(TINY, root=root, cache=tmp_path / 'c')
    sha, ref = p.meta['sha256'], np.array(p.tokens); del p.tokens
    damage(build_pool(TINY, root=root, cache=tmp_path / 'c'))       # a fresh handle, damaged in place
    with pytest.warns(UserWarning, match="rebuilding an invalid cached pool"):
        q = build_pool(TINY, root=root, cache=tmp_path / 'c')
    assert q.meta['sha256'] == sha and np.array_equal(np.asarray(q.tokens), ref)
    read_pool(q.path, TINY.n_tokens)


def test_damaged_tokenizer_is_retrained(tmp_path):
    root, _ = tiny_root(tmp_path)
    p = build_pool(TINY, root=root, cache=tmp_path / 'c')
    tj = next((tmp_path / 'c').rglob('tokenizer.json')); good = tj.read_text()
    tj.write_text(good[:len(good) // 2])
    with pytest.warns(UserWarning, match="rebuilding the unreadable cached tokenizer"):
        q = build_pool(TINY, root=root, cache=tmp_path / 'c')
    assert tj.read_text() == good and q.key == p.key


def test_read_pool_rejects_garbage(tmp_path):
    f = tmp_path / 'x.bin'
    f.write_bytes(b'\x00' * 10)
    with pytest.raises(D.PoolError, match="shorter than"): read_pool(f)
    write_pool(f, np.arange(50))
    assert read_pool(f, 50).tolist() == list(range(50))
    with pytest.raises(D.PoolError, match="expected 51"): read_pool(f, 51)


def test_concurrent_builders_agree(tmp_path):
    "Two processes (e.g. DDP ranks) building the same pool at once: one builds, both get the same valid pool."
    root, _ = tiny_root(tmp_path, n=200)
    code = f"""
        from supra.core.config import DataConfig
        from supra.data.pool import build_pool
        p = build_pool(DataConfig(n_tokens=4000, vocab_size=300, tokenizer_chars=5000, val_docs=3), root={str(root)!r}, cache={str(tmp_path / 'c')!r})
        print(p.meta['sha256'])
    """
    procs = [subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0].split()[-1] == outs[1][0].split()[-1]

# ---------------------------------------------------------------- epochs

@pytest.mark.parametrize('N,B,T', [(161, 4, 16), (1000, 7, 13), (5000, 32, 64), (4097, 8, 128)])
def test_epoch_coverage_order_resume(N, B, T):
    toks = np.arange(N, dtype=np.uint16)
    dl = EpochLoader(toks, B, T, seed=5)
    W = (N - 1) // T
    assert dl.n_windows == dl.windows_per_epoch == W and dl.steps_per_epoch == -(-W // B) and dl.tokens_per_epoch == W * T
    orders = []
    for epoch in range(3):
        batches = list(dl.batches(epoch))
        assert len(batches) == dl.steps_per_epoch
        assert [len(x) for x, _ in batches] == [B] * (W // B) + ([W % B] if W % B else [])
        xs = torch.cat([x for x, _ in batches]); ys = torch.cat([y for _, y in batches])
        assert xs.dtype == torch.int64 and xs.shape == (W, T) and torch.equal(ys, xs + 1)
        assert sorted(xs.flatten().tolist()) == list(range(W * T))          # every position [0, W*T) once per epoch
        assert (N - 1) - W * T < T                                           # the unserved tail is under one sequence
        orders.append(tuple(xs[:, 0].tolist()))
        for s in (0, 1, dl.steps_per_epoch - 1, dl.steps_per_epoch):        # resume equals uninterrupted
            rest = list(dl.batches(epoch, start_step=s))
            assert len(rest) == dl.steps_per_epoch - s
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, batches[s:]))
    assert len(set(orders)) == 3                                              # a different order every epoch
    assert orders[0] == tuple(torch.cat([x for x, _ in EpochLoader(toks, B, T, seed=5).batches(0)])[:, 0].tolist())
    assert orders[0] != tuple(torch.cat([x for x, _ in EpochLoader(toks, B, T, seed=6).batches(0)])[:, 0].tolist())


@pytest.mark.parametrize('N,B,T,ws', [(161, 4, 16, 2), (1000, 8, 13, 4), (5000, 32, 64, 8), (1000, 6, 10, 3)])
def test_ranks_partition_each_batch(N, B, T, ws):
    toks = np.arange(N, dtype=np.uint16)
    one = EpochLoader(toks, B, T, seed=2)
    ranks = [EpochLoader(toks, B, T, seed=2, rank=r, world_size=ws) for r in range(ws)]
    assert len({r.steps_per_epoch for r in ranks}) == 1
    W = one.n_windows
    assert ranks[0].windows_per_epoch == W - W % ws
    for epoch in (0, 1):
        glob = list(one.batches(epoch))
        per_rank = [list(r.batches(epoch)) for r in ranks]
        served = []
        for step in range(ranks[0].steps_per_epoch):
            parts = [pr[step][0] for pr in per_rank]
            assert len({len(p) for p in parts}) == 1 and len(parts[0]) >= 1    # equal rows on every rank
            cat = torch.cat(parts)
            assert torch.equal(cat, glob[step][0][:len(cat)])                  # contiguous blocks of the global batch, in rank order
            served.append(cat)
        served = torch.cat(served)[:, 0].tolist()
        assert len(served) == len(set(served)) == W - W % ws                  # disjoint, all but W mod ws windows


@needs_wiki
def test_loader_on_real_pool(mid_pool):
    dl = EpochLoader(mid_pool, batch_size=16, seq_len=128, seed=0)
    toks = np.asarray(mid_pool.tokens)
    order = dl.order(0)
    for step, (x, y) in enumerate(itertools.islice(dl.batches(0), 3)):
        for row, w in zip(range(len(x)), order[step * 16:(step + 1) * 16]):
            assert x[row].tolist() == toks[w * 128:w * 128 + 128].tolist() and y[row].tolist() == toks[w * 128 + 1:w * 128 + 129].tolist()


def test_loader_bad_input():
    toks = np.arange(100, dtype=np.uint16)
    for kw, msg in [(dict(batch_size=0, seq_len=8), "batch_size=0"), (dict(batch_size=4, seq_len=0), "seq_len=0"),
                    (dict(batch_size=4, seq_len=100), "seq_len=100"), (dict(batch_size=4, seq_len=8, rank=2, world_size=2), "rank=2"),
                    (dict(batch_size=5, seq_len=8, world_size=2), "batch_size=5 is invalid: allowed a multiple of world_size=2")]:
        with pytest.raises(ConfigError, match=msg): EpochLoader(toks, **kw)
    dl = EpochLoader(toks, 4, 8)
    with pytest.raises(ConfigError, match="start_step=99"): next(dl.batches(0, 99))
    with pytest.raises(ConfigError, match="epoch=-1"): next(dl.batches(-1))

# ---------------------------------------------------------------- bench

@needs_wiki
def test_bench_data_tiny(capsys):
    r = D.bench_data(n_tokens=20_000, vocab_size=512, tokenizer_chars=200_000)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    kv = dict(p.split('=') for p in last.split())
    assert kv['bench'] == 'data' and int(kv['tokens']) == 20_000 and float(kv['build_s']) > 0 and float(kv['mb_s']) > 0
    assert r['tokens'] == 20_000

# ---------------------------------------------------------------- wide pools (vocabularies beyond 65,535 ids)

def test_pool_dtype_follows_vocab():
    assert [D.pool_dtype(v) for v in (260, 65_535, 65_536)] == [np.uint16] * 3
    assert [D.pool_dtype(v) for v in (65_537, 70_000, 200_005)] == [np.uint32] * 3


def test_wide_pool_round_trips_ids_beyond_uint16(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 70_000, 20_000); ids[:4] = [65_535, 65_536, 65_537, 69_999]
    p = write_pool(tmp_path / 'w.bin', ids, dtype=D.pool_dtype(70_000))
    back = read_pool(p, len(ids))
    assert back.dtype == np.uint32 and np.array_equal(np.asarray(back, dtype=np.int64), ids)
    assert (ids > 65_535).sum() > 1000
    assert np.fromfile(p, np.int32, 4).tolist() == [D.MAGIC, D.VERSION_WIDE, len(ids), 4]
    assert p.stat().st_size == D.HEADER_BYTES + 4 * len(ids)


def test_ids_beyond_the_dtype_raise_not_wrap(tmp_path):
    big = np.array([1, 65_536, 2])
    with pytest.raises(ConfigError, match=r"ids in \[0, 65535\]"): write_pool(tmp_path / 'a.bin', big)          # uint16: 65,536 would wrap to 0
    with pytest.raises(ConfigError, match=r"ids in \[0, 4294967295\]"): write_pool(tmp_path / 'b.bin', np.array([2 ** 32]), dtype=np.uint32)
    with pytest.raises(ConfigError, match=r"ids in \[0, 4294967295\]"): write_pool(tmp_path / 'c.bin', np.array([-1]), dtype=np.uint32)
    with pytest.raises(ConfigError, match="dtype='int8'"): write_pool(tmp_path / 'd.bin', np.array([1]), dtype=np.int8)
    assert not list(tmp_path.iterdir())
    out = np.zeros(3, dtype=np.uint16)                                       # numpy itself refuses to wrap a Python int into the pool's buffer
    with pytest.raises(OverflowError): out[0:3] = [1, 65_536, 2]


def test_uint16_pool_format_unchanged(tmp_path):
    "A uint16 pool is byte for byte the version-1 file the published papers' pools are: header, then the ids."
    p = write_pool(tmp_path / 'x.bin', np.arange(7))
    raw = p.read_bytes()
    h = np.zeros(256, np.int32); h[:3] = 20240520, 1, 7
    assert raw == h.tobytes() + np.arange(7, dtype=np.uint16).tobytes()
    wide = bytearray(raw); wide[4:8] = np.int32(2).tobytes()                # version 2 without the 4-byte width is not a pool
    (tmp_path / 'y.bin').write_bytes(bytes(wide))
    with pytest.raises(D.PoolError, match="bytes per token"): read_pool(tmp_path / 'y.bin')


def test_build_pool_wide_path(tmp_path, monkeypatch):
    "The uint32 path of build_pool end to end (forced for a small vocabulary): same ids, its own key, dtype in header and sidecar."
    root, _ = tiny_root(tmp_path)
    narrow = build_pool(TINY, root=root, cache=tmp_path / 'c')
    assert narrow.meta['dtype'] == 'uint16' and narrow.tokens.dtype == np.uint16
    monkeypatch.setattr(D, 'pool_dtype', lambda v: np.dtype(np.uint32))
    wide = build_pool(TINY, root=root, cache=tmp_path / 'c')
    assert wide.tokens.dtype == np.uint32 and wide.meta['dtype'] == 'uint32' and wide.key != narrow.key
    assert np.array_equal(np.asarray(wide.tokens), np.asarray(narrow.tokens))
    assert wide.path.stat().st_size == 1024 + 4 * TINY.n_tokens and np.fromfile(wide.path, np.int32, 4).tolist()[1:] == [2, TINY.n_tokens, 4]
    assert build_pool(TINY, root=root, cache=tmp_path / 'c').path == wide.path                    # a cache hit
    assert wide.key == D.pool_key(TINY, wide.meta['tokenizer_sha256'], root, np.uint32)
    assert narrow.key == D.pool_key(TINY, narrow.meta['tokenizer_sha256'], root)                 # no dtype in a uint16 key
    x, y = next(EpochLoader(wide, 4, 16).batches(0))
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])

# ---------------------------------------------------------------- SuperBPE

SB_T = 1843                                                   # ~90% of MID's 2048


@pytest.fixture(scope='module')
def superbpe(cache):
    if not HAVE_WIKI: pytest.skip("needs wikipedia-en under SUPRA_DATA")
    return get_tokenizer(MID, cache=cache, kind='superbpe', transition=SB_T)


@needs_wiki
def test_superbpe_round_trip(superbpe):
    tok = superbpe
    assert tok.get_vocab_size() == 2048 and tok.token_to_id(EOS) == 0 and tok.token_to_id(BOS) == 1
    rng = random.Random(0)
    junk = [''.join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x800), rng.randrange(0x3000, 0x9fff),
                                     rng.randrange(0x1F300, 0x1FAFF), rng.choice([9, 10, 13, 32])])) for _ in range(200)) for _ in range(30)]
    digits = ["0", "007", "3.14159265358979", "1,234,567.89", "2024-05-20 12:34:56", "+44 (0)20 7946 0958"]
    spaces = [" " * k + "x" + " " * k for k in range(1, 9)] + ["\n" * k + "y" for k in range(1, 6)] + [" \n \n\t\t end. Next!  ?"]
    for t in val_texts(MID) + WEIRD + junk + digits + spaces:
        ids = tok.encode(t).ids
        assert tok.decode(ids) == t, repr(t[:80])
        assert 0 not in ids and 1 not in ids
        assert count_bytes(tok, ids) == len(t.encode()) == D.doc_bytes(tok, ids)


@needs_wiki
def test_superbpe_is_bpe_then_superwords(superbpe, mid_pool):
    "Stage 1 is the ordinary BPE at the transition size; stage 2 adds tokens that cross spaces, never sentence ends or newlines."
    from supra.data.tokenizers import train_bpe, _head_chars
    texts = [t for b in _head_chars(iter_docs('wikipedia-en'), MID.tokenizer_chars) for t in b]
    s1 = train_bpe([texts], SB_T)
    assert [superbpe.id_to_token(i) for i in range(SB_T)] == [s1.id_to_token(i) for i in range(SB_T)]
    assert [mid_pool.tokenizer.id_to_token(i) for i in range(SB_T)] == [s1.id_to_token(i) for i in range(SB_T)]   # BPE is greedy: a prefix of the 2048 one
    new = [superbpe.id_to_token(i) for i in range(SB_T, 2048)]
    supers = [t for t in new if 'Ġ' in t[1:]]
    assert len(supers) > len(new) // 3, supers[:20]
    assert not any('Ċ' in t and t.strip('Ċ') for t in new)                                  # newlines stay their own pieces
    assert not any(re_sentence_cut(t) for t in new)


def re_sentence_cut(t):
    "A token that continues after sentence punctuation (., !, ?) — stage 2 never builds one."
    import re
    return re.search(r'[.!?]+[^.!?]', t) is not None


@needs_wiki
def test_superbpe_more_chars_per_token_at_equal_vocab(superbpe, mid_pool):
    from supra.data.tokenizers import encoding_stats
    val = val_texts(MID)
    chars = sum(map(len, val))
    cpt = {k: chars / sum(len(e.ids) for e in t.encode_batch(val)) for k, t in (('bpe', mid_pool.tokenizer), ('superbpe', superbpe))}
    st = {k: encoding_stats(t, val) for k, t in (('bpe', mid_pool.tokenizer), ('superbpe', superbpe))}
    assert {k: s['chars_per_token'] for k, s in st.items()} == cpt
    assert st['bpe']['bytes'] == st['superbpe']['bytes'] == sum(len(t.encode()) for t in val) and st['bpe']['chars'] == chars
    assert superbpe.get_vocab_size() == mid_pool.tokenizer.get_vocab_size() == MID.vocab_size
    assert cpt['superbpe'] > 1.02 * cpt['bpe'], cpt


def test_tokenizer_kind_is_part_of_the_key(tmp_path):
    root, _ = tiny_root(tmp_path)
    k = tokenizer_key(TINY, root)
    assert k == tokenizer_key(TINY, root, kind='bpe') == tokenizer_key(TINY, root, kind='bpe', transition=280)   # transition means nothing to BPE
    sb = {t: tokenizer_key(TINY, root, kind='superbpe', transition=t) for t in (270, 280, 300)}
    assert len(set(sb.values()) | {k}) == 4
    assert tokenizer_key(TINY, root, kind='superbpe') == tokenizer_key(TINY, root, kind='superbpe', transition=270)   # default: 90% of 300
    with pytest.raises(ConfigError, match="tokenizer='unigram'"): tokenizer_key(TINY, root, kind='unigram')
    with pytest.raises(ConfigError, match="superbpe_transition=301"): tokenizer_key(TINY, root, kind='superbpe', transition=301)
    with pytest.raises(ConfigError, match="superbpe_transition=100"): tokenizer_key(TINY, root, kind='superbpe', transition=100)


def test_tokenizer_kind_from_config_fields(tmp_path):
    "Once DataConfig has `tokenizer` / `superbpe_transition`, they are read from it (simulated with a stand-in config)."
    from dataclasses import dataclass
    from supra.data.tokenizers import tokenizer_spec
    @dataclass(frozen=True)
    class Cfg:
        corpus: str = 'wikipedia-en'; vocab_size: int = 300; tokenizer_chars: int = 5000; val_docs: int = 3
        tokenizer: str = 'superbpe'; superbpe_transition: int | None = 290
    assert tokenizer_spec(Cfg()) == dict(kind='superbpe', vocab_size=300, transition=290)
    assert tokenizer_spec(Cfg(), kind='bpe') == dict(kind='bpe', vocab_size=300, transition=None)
    assert tokenizer_spec(TINY) == dict(kind='bpe', vocab_size=300, transition=None)
    root, _ = tiny_root(tmp_path)
    assert tokenizer_key(Cfg(), root) == tokenizer_key(TINY, root, kind='superbpe', transition=290)


def test_superbpe_pool_and_cache(tmp_path, monkeypatch):
    root, _ = tiny_root(tmp_path, n=120)
    cfg = TINY.replace(n_tokens=2000)
    bpe = build_pool(cfg, root=root, cache=tmp_path / 'c')
    sb = build_pool(cfg, root=root, cache=tmp_path / 'c', kind='superbpe', transition=280)
    assert sb.key != bpe.key and sb.meta['tokenizer'] == 'superbpe' and sb.meta['superbpe_transition'] == 280
    assert bpe.meta['tokenizer'] == 'bpe' and 'superbpe_transition' not in bpe.meta
    some = list(itertools.islice(iter_docs('wikipedia-en', root=root), 20))
    assert sum(len(sb.tokenizer.encode(d).ids) for d in some) <= sum(len(bpe.tokenizer.encode(d).ids) for d in some)   # same vocabulary, no more tokens (random words: few phrases to learn)
    toks = np.asarray(sb.tokens)
    eos = np.flatnonzero(toks == sb.eos_id)
    docs = list(itertools.islice(iter_docs('wikipedia-en', root=root), len(eos)))
    for seg, doc in zip(np.split(toks, eos + 1), docs): assert sb.tokenizer.decode(seg[seg != sb.eos_id].tolist()) == doc
    assert sb.meta['bytes'] == count_bytes(sb.tokenizer, toks)
    def boom(*a, **k): raise AssertionError("cache hit retrained")
    monkeypatch.setattr(T, 'train_superbpe', boom)
    again = build_pool(cfg, root=root, cache=tmp_path / 'c', kind='superbpe', transition=280)
    assert again.path == sb.path and again.tokenizer.to_str() == sb.tokenizer.to_str()

# ---------------------------------------------------------------- bytes of held-out text, any tokenizer

def _llama_style(texts, vocab_size):
    "A SentencePiece-style tokenizer (Llama's layout): character BPE, byte-fallback tokens <0x00>..<0xFF>, Metaspace prefix space, a decoder that strips it."
    from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first')
    sp.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<unk>', '<s>'], show_progress=False))
    m = json.loads(sp.to_str())['model']
    vocab = dict(m['vocab']); vocab.update({f'<0x{b:02X}>': len(vocab) + b for b in range(256)})
    sp.model = models.BPE(vocab=vocab, merges=[tuple(x) for x in m['merges']], byte_fallback=True)
    sp.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(' ', 1, 0)])
    return sp


def test_doc_bytes_byte_level_first_token(tmp_path):
    from conftest import tiny_bpe
    tok = tiny_bpe("the cat sat on the mat; naïve café 東京 " * 50, 300, specials=(EOS, BOS))
    tok.encode_special_tokens = True                                                         # as the pool's tokenizers: specials in text are text
    for t in [" leading space", "x", "東", "東京 and more", "\n\nnewlines first", "🙂", "the cat"] + WEIRD:
        ids = tok.encode(t).ids
        assert D.doc_bytes(tok, ids) == len(t.encode()) == count_bytes(tok, ids)
        if ids:
            first = D.decode_bytes(tok, ids[:1])
            assert D.doc_bytes(tok, ids[:1]) == len(first)                                  # the first token alone: its own bytes, no prefix
    assert D.doc_bytes(tok, [0, 1] + tok.encode("ab").ids) == 2


def test_doc_bytes_sentencepiece_style_byte_fallback():
    rng = random.Random(3)
    words = "the of and to in is was for on that by with as at from".split()
    sp = _llama_style([' '.join(rng.choice(words) for _ in range(50)) for _ in range(50)], 120)
    checked_fallback_first = 0
    for t in ["東京 is not in the vocabulary", "é", "🙂🙂 and", "the end", "naïve café", "a  b\n\nc", "x"] + WEIRD[4:7]:
        enc = sp.encode(t)
        assert sp.decode(enc.ids) == t
        assert D.doc_bytes(sp, enc.ids) == len(t.encode())
        assert count_bytes(sp, enc.ids) == len(t.encode()) + enc.tokens[0].startswith('▁')      # the raw table counts the stripped prefix space
        if enc.tokens[0] == '▁' and enc.tokens[1].startswith('<0x'): checked_fallback_first += 1
    assert checked_fallback_first >= 3
    assert D.doc_bytes(sp, sp.encode("東").ids[:1]) == 0                                      # a lone prefix-space token decodes to nothing
    from transformers import PreTrainedTokenizerFast                                          # a transformers tokenizer works too
    hf = PreTrainedTokenizerFast(tokenizer_object=sp)
    assert D.doc_bytes(hf, sp.encode("東京 x").ids) == len("東京 x".encode())

# ---------------------------------------------------------------- n-gram floor

from supra.data.ngram import NGramLM, ngram_bpb, ngram_floor, score_pairs


def _ref_kn(toks, V, n):
    "Interpolated Kneser-Ney written out with dictionaries, one probability at a time: the reference for the vectorised model."
    from collections import Counter
    toks = [int(t) for t in toks]
    cnt = {n: Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))}
    for k in range(n - 1, 0, -1): cnt[k] = Counter(g[1:] for g in cnt[k + 1])          # continuation counts: distinct left extensions
    def disc(vals):
        n1, n2 = sum(v == 1 for v in vals), sum(v == 2 for v in vals)
        return 0.5 if n1 + 2 * n2 == 0 else min(0.9, max(0.1, n1 / (n1 + 2 * n2)))
    D = {k: disc(list(c.values())) for k, c in cnt.items()}
    tot = {k: Counter() for k in cnt}; typ = {k: Counter() for k in cnt}
    for k, c in cnt.items():
        for g, v in c.items(): tot[k][g[:-1]] += v; typ[k][g[:-1]] += 1
    def P(k, h, w):
        if k == 1: return (max(cnt[1].get((w,), 0) - D[1], 0) + D[1] * len(cnt[1]) / V) / sum(cnt[1].values())
        lower = P(k - 1, h[1:], w)
        if any(t < 0 for t in h) or tot[k][h] == 0: return lower
        return (max(cnt[k].get(h + (w,), 0) - D[k], 0) + D[k] * typ[k][h] * lower) / tot[k][h]
    return lambda h, w: P(n, tuple(int(t) for t in h), int(w))


@pytest.mark.parametrize('n', [1, 2, 3])
def test_ngram_matches_reference_and_normalises(n):
    rng = np.random.default_rng(n)
    V = 30
    toks = np.minimum(rng.zipf(1.5, 3000) - 1, V - 3)                                  # skewed, ids V-2 and V-1 never seen
    toks[::17] = rng.integers(0, V - 2, len(toks[::17]))
    lm, ref = NGramLM.fit(toks, V, n), _ref_kn(toks, V, n)
    ctx = rng.integers(-1, V, (300, n - 1)); ctx[:100] = np.lib.stride_tricks.sliding_window_view(toks, n)[:100, :-1]   # seen ones too
    w = rng.integers(0, V, 300)
    got = lm.prob(ctx, w)
    want = np.array([ref(h, t) for h, t in zip(ctx, w)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    for h in ctx[::15]:                                                                  # a distribution over the whole vocabulary
        p = lm.prob(np.repeat(h[None], V, 0), np.arange(V))
        assert abs(p.sum() - 1) < 1e-12 and (p > 0).all()


def test_ngram_deterministic_sequence_near_zero_bits():
    cyc = np.tile(np.array([5, 3, 8, 1, 9, 0, 2]), 1000)
    for n in (2, 3):
        lm = NGramLM.fit(cyc, 10, n)
        ctx = np.lib.stride_tricks.sliding_window_view(cyc, n)[:, :-1]
        assert -np.log2(lm.prob(ctx, cyc[n - 1:])).mean() < 0.01
    lp = score_pairs(NGramLM.fit(cyc, 10, 3), [([5, 3], [8, 1, 9, 0]), ([5, 3], [1, 1, 1, 1])])
    assert lp[0] > -0.02 and lp[1] < -10


def test_ngram_wide_vocabulary():
    "Ids beyond 65,535 (a uint32 pool) count and score like any others."
    base = np.tile(np.array([69_999, 65_536, 3, 65_535]), 500)
    lm = NGramLM.fit(base.astype(np.uint32), 70_000, 3)
    assert lm.prob([[69_999, 65_536]], [3])[0] > 0.99
    assert abs(lm.prob(np.full((70_000, 2), 3), np.arange(70_000)).sum() - 1) < 1e-9
    with pytest.raises(ConfigError, match="order=4 is invalid"): NGramLM.fit(base, 2_000_000, 4)


@needs_wiki
def test_ngram_floor_on_real_pool(mid_pool):
    tok, texts = mid_pool.tokenizer, val_texts(MID)
    res = ngram_floor(mid_pool, texts)
    assert res[3] == ngram_bpb(NGramLM.fit(mid_pool, MID.vocab_size, 3), tok, texts)
    assert res[3]['bpb'] < res[2]['bpb'] < res[1]['bpb'] < 6
    assert res[1]['bytes'] == sum(len(t.encode()) for t in texts) and res[1]['tokens'] == sum(len(tok.encode(t).ids) for t in texts)
    lm = NGramLM.fit(mid_pool, MID.vocab_size, 3)
    ids = tok.encode(texts[0]).ids[:40]
    a, b = ids[:15], ids[15:]
    whole, first, rest = score_pairs(lm, [([0], ids), ([0], a), ([0] + a, b)])
    assert abs(whole - (first + rest)) < 1e-9                                            # log-probabilities add along a text
    nll = -score_pairs(lm, [([0], tok.encode(t).ids) for t in texts]).sum()
    assert abs(nll / np.log(2) / res[3]['bytes'] - res[3]['bpb']) < 1e-12
