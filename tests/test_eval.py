"""Evaluation stage: parity of the `supra` lm-eval backend with lm-eval's stock `hf` backend on the exported model,
held-out bits-per-byte, baselines, and clear errors. Needs the local task data (SUPRA_DATA, default ../shared/data)."""
import json, math, os, tempfile
from pathlib import Path

import numpy as np, pytest, torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('SUPRA_DATA') or ROOT.parent / 'shared' / 'data').resolve()
if not (DATA / 'blimp').is_dir(): pytest.skip(f"evaluation data not found at {DATA} (set SUPRA_DATA to shared/data)", allow_module_level=True)
os.environ['SUPRA_DATA'] = str(DATA)
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import supra.eval.harness as E
from supra.core.config import ConfigError, EvalConfig, preset
from supra.data.tokenizers import get_tokenizer, EOS
from supra.data.corpus import val_texts
from supra.data.textbytes import count_bytes
from supra.model.transformer import Transformer

P = preset('smoke')


@pytest.fixture(scope='module')
def tok(): return get_tokenizer(P.data)


def _train(model, tok, steps=50, seed=0):
    "A few AdamW steps on the smoke corpus' held-out text, so that context helps (the test needs a model that uses it)."
    ids = np.concatenate([[tok.token_to_id(EOS)] + tok.encode(d).ids for d in val_texts(P.data.replace(val_docs=8))])
    g = torch.Generator().manual_seed(seed)
    T = model.cfg.seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(ids) - T - 1, (16,), generator=g)
        x = torch.stack([torch.from_numpy(ids[j:j + T + 1].astype(np.int64)) for j in i.tolist()])
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


@pytest.fixture(scope='module')
def model(tok):
    torch.manual_seed(0)
    return _train(Transformer(P.model.replace(vocab_size=tok.get_vocab_size())), tok)


@pytest.fixture(scope='module')
def hf_dir(model, tok, tmp_path_factory):
    from supra.eval.export import export_hf
    d = tmp_path_factory.mktemp('hf')
    export_hf(model, tok, d)
    return d


def test_registered():
    from lm_eval.api.registry import get_model
    assert get_model('supra') is E.SupraLM


def test_tokenizers_agree(tok, hf_dir, model):
    "The HF backend must tokenize exactly as Supra does, or parity means nothing."
    hf = E.hf_lm(hf_dir, tok, model.cfg.seq_len)
    for s in ["Who should Derek hug after shocking Richard?", " yes", "Question: Which gas?\nAnswer: oxygen", "naïve café — 3.5 km"]:
        assert hf.tok_encode(s) == tok.encode(s, add_special_tokens=False).ids
    assert hf.prefix_token_id == tok.token_to_id(EOS) == E.SupraLM(model, tok).prefix_token_id


def test_loglikelihood_parity_requests(tok, hf_dir, model):
    "Token-level parity on hand-made requests: empty context, shared contexts, and a request longer than the context window."
    from lm_eval.api.instance import Instance
    pairs = [("", "The cat sat on the mat."), ("Question: Is the sky blue?\nAnswer:", " no"), ("Question: Is the sky blue?\nAnswer:", " yes"),
             ("Question: Is the sky blue?\nAnswer: ", "yes, it is"), ("word " * 80, "end of it"), ("A", "B" * 3)]
    reqs = [Instance('loglikelihood', {}, p, i) for i, p in enumerate(pairs)]
    ours = E.SupraLM(model, tok, batch_size=4).loglikelihood(reqs)
    ref = E.hf_lm(hf_dir, tok, model.cfg.seq_len, batch_size=4).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(ours, ref):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3) and ga == gb


def test_generate_until_matches_hf(tok, hf_dir, model):
    "Greedy generation, cut at the stop string, agrees with lm-eval's `hf` backend."
    from lm_eval.api.instance import Instance
    prompts = ["The history of", "In 1990, the", "A", "The city is known for its long and", "She said that the"]
    reqs = [Instance('generate_until', {}, (p, {'until': ['\n\n', ' the '], 'max_gen_toks': 12, 'do_sample': False}), i)
            for i, p in enumerate(prompts)]
    ours = E.SupraLM(model, tok, batch_size=3).generate_until(reqs)   # batches of 3 prompts of different lengths
    ref = E.hf_lm(hf_dir, tok, model.cfg.seq_len, batch_size=1).generate_until(reqs)
    assert ours == ref and all(isinstance(o, str) for o in ours), (ours, ref)
    assert any(o for o in ours) and not any(' the ' in o for o in ours)


def test_task_parity_with_hf(tok, hf_dir, model):
    "Same BLiMP/ARC/BoolQ accuracies and WikiText word perplexity from lm-eval's `hf` backend on the export and `supra` in memory."
    tasks = ['blimp_adjunct_island', 'blimp_anaphor_gender_agreement', 'blimp_irregular_plural_subject_verb_agreement_1', 'arc_easy', 'boolq']
    ours = E.evaluate(model, tok, tasks=tasks, limit=20)
    ref = E.evaluate(E.hf_lm(hf_dir, tok, model.cfg.seq_len, batch_size=16), tasks=tasks, limit=20)
    m = ours.merge(ref, on=['task', 'metric'], suffixes=('', '_hf'))
    assert len(m) == len(ours) == len(ref) and len(m) >= 8
    np.testing.assert_array_equal(m.value.to_numpy(), m.value_hf.to_numpy())
    assert (m.n == 20).sum() >= 5
    w = [E.evaluate(lm, tok, tasks=['wikitext'], limit=1).set_index('metric').value
         for lm in (E.SupraLM(model, tok), E.hf_lm(hf_dir, tok, model.cfg.seq_len, batch_size=16))]
    for k in ('word_perplexity', 'byte_perplexity', 'bits_per_byte'):
        assert w[0][k] == pytest.approx(w[1][k], rel=1e-3)
    assert 1 < w[0]['word_perplexity'] < 1e7


def test_baselines(tok, model):
    "Chance and majority come from the evaluated examples; BLiMP mean and field means are reported."
    df = E.evaluate(model, tok, tasks=['boolq', 'arc_easy'], limit=30)
    recs = lambda f: [json.loads(l) for l in open(DATA / f)][:30]
    labels = np.array([r['label'] for r in recs('boolq/validation.jsonl')])
    b = df.query("task == 'boolq'").iloc[0]
    assert b.majority == pytest.approx(max(labels.mean(), 1 - labels.mean())) and b.chance == 0.5 and b.n == 30
    arc = recs('arc_easy/test.jsonl')
    a = df.query("task == 'arc_easy' and metric == 'acc'").iloc[0]
    assert a.chance == pytest.approx(np.mean([1 / len(r['choices']['text']) for r in arc]))
    pos = [r['choices']['label'].index(r['answerKey']) for r in arc]
    assert a.majority == pytest.approx(np.bincount(pos).max() / 30)
    assert 0 <= a.stderr < 0.2 and 'results' in df.attrs['lm_eval']


def test_blimp_group(tok, model):
    df = E.evaluate(model, tok, EvalConfig(tasks=('blimp',), limit=2))
    para = df[df.task.str.startswith('blimp_')]
    assert len(para) == 67 and (para.n == 2).all()
    top = df.query("task == 'blimp' and metric == 'acc'").iloc[0]
    assert top.value == pytest.approx(para.value.mean()) and top.n == 134 and top.chance == 0.5 == top.majority
    fields = df[df.task.str.startswith('blimp:')].set_index('task')
    assert set(fields.index) == {'blimp:morphology', 'blimp:syntax', 'blimp:semantics', 'blimp:syntax_semantics'}
    assert fields.n.sum() == 134


def test_heldout_bpb(tok, model):
    docs = val_texts(P.data)[:3]
    wide = E.heldout_bpb(model, tok, docs, context=64, stride=64)
    slid = E.heldout_bpb(model, tok, docs, context=64, stride=16)
    assert wide['bytes'] == slid['bytes'] == sum(len(d.encode()) for d in docs)
    assert wide['bytes'] == sum(count_bytes(tok, tok.encode(d).ids) for d in docs)
    assert wide['tokens'] == slid['tokens'] == sum(len(tok.encode(d).ids) for d in docs)
    assert slid['loss'] <= wide['loss'] + 1e-6, (slid, wide)
    assert slid['loss'] < math.log(tok.get_vocab_size())          # the trained model beats uniform
    assert wide['bpb'] == pytest.approx(wide['loss'] * wide['tokens'] / math.log(2) / wide['bytes'])
    assert wide['ppl'] == pytest.approx(math.exp(wide['loss']))
    # brute force: every token once, each with all of its (<= 64) previous tokens of the document as context
    eos = tok.token_to_id(EOS)
    short = docs[0][:500]
    ids = [eos] + tok.encode(short).ids
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            x = torch.tensor([ids[max(0, t - 64):t]])
            nll -= torch.log_softmax(model(x)[0][0, -1], -1)[ids[t]].item()
    assert E.heldout_bpb(model, tok, [short], context=64, stride=1)['loss'] == pytest.approx(nll / (len(ids) - 1), rel=1e-4)


def test_bad_input(tok, model, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"tasks='hellaswag' is invalid.*blimp.*arc_easy"): E.evaluate(model, tok, tasks=['hellaswag'])
    (tmp_path / 'arc_easy').mkdir()
    monkeypatch.setenv('SUPRA_DATA', str(tmp_path))
    with pytest.raises(E.TaskDataError, match=r"boolq.*boolq/validation\.jsonl.*SUPRA_DATA"): E.evaluate(model, tok, tasks=['boolq'])
    with pytest.raises(E.TaskDataError, match=r"arc_easy/test\.jsonl"): E.evaluate(model, tok, tasks=['arc_easy'])
    with pytest.raises(ConfigError, match='context=500'): E.heldout_bpb(model, tok, ['some text'], context=500)
    with pytest.raises(ConfigError, match='tokenizer'):
        E.SupraLM(Transformer(P.model.replace(vocab_size=300)), tok)   # tokenizer has more tokens than the model


def test_checkpoint(tok, model, tmp_path):
    from supra.model.checkpoint import save_checkpoint
    ck = tmp_path / 'ck'
    save_checkpoint(ck, model)
    lm = E.SupraLM(checkpoint=str(ck), tokenizer=tok)
    from lm_eval.api.instance import Instance
    r = [Instance('loglikelihood', {}, ("The", " cat"), 0)]
    assert lm.loglikelihood(r)[0][0] == pytest.approx(E.SupraLM(model, tok).loglikelihood(r)[0][0], rel=1e-5)
    with pytest.raises(FileNotFoundError, match='tokenizer'): E.SupraLM(checkpoint=str(ck))        # no tokenizer.json beside it
    with pytest.raises(FileNotFoundError, match='nowhere'): E.SupraLM(checkpoint=str(tmp_path / 'nowhere'), tokenizer=tok)
    mf = next(ck.glob('model-*.safetensors'))
    mf.write_bytes(mf.read_bytes()[:100])                                                         # corrupted
    with pytest.raises(ValueError, match=str(ck)): E.SupraLM(checkpoint=str(ck), tokenizer=tok)


def test_prefix_tree_scoring_matches_unpacked(model):
    "Rows with shared prefixes, duplicates and rows that are prefixes of others score as if each were fed alone."
    g = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    stem = torch.randint(0, V, (20,), generator=g).tolist()
    rows = [stem[:k] + torch.randint(0, V, (n,), generator=g).tolist() for k, n in [(0, 9), (5, 7), (12, 3), (20, 1), (8, 8)]]
    rows += [rows[1], stem[:6], stem]                                  # an exact duplicate, prefixes of other rows
    jobs = [(r, p0, rows[r][p0 + 1:]) for r in range(len(rows)) for p0 in {0, len(rows[r]) // 2} if p0 + 1 < len(rows[r])]
    with torch.no_grad():
        def alone(r, p0, t):
            lps = torch.log_softmax(model(torch.tensor([rows[r]]))[0][0], -1)
            return sum(lps[p0 + k, x].item() for k, x in enumerate(t)), all(lps[p0 + k].argmax().item() == x for k, x in enumerate(t))
        ref = [alone(*j) for j in jobs]
    packs, nodes = E.pack_rows(rows, cap=64)
    assert sum(len(p[0]) for p in packs) < sum(map(len, rows))         # the shared prefixes were stored once
    for cap, bt in [(None, 4096), (1, 16), (30, 64)]:                 # one tree, one row per pack, several packs/batches
        lp, ok = E.score_rows(model, rows, jobs, batch_tokens=bt, cap=cap, head_chunk=3)
        np.testing.assert_allclose(lp, [a for a, _ in ref], rtol=0, atol=1e-4)
        assert list(ok) == [b for _, b in ref]


MANY = ['blimp_adjunct_island', 'blimp_anaphor_gender_agreement', 'arc_easy', 'boolq', 'wikitext']

def test_evaluate_many_equals_each_alone(tok, model, tmp_path, monkeypatch):
    "Checkpoints scored together on requests built once get exactly lm-eval's results of evaluating each alone."
    import pandas as pd
    from supra.model.checkpoint import save_checkpoint
    monkeypatch.setenv('SUPRA_CACHE', str(tmp_path / 'cache'))
    torch.manual_seed(3); other = Transformer(model.cfg).eval()
    save_checkpoint(tmp_path / 'ck', other); tok.save(str(tmp_path / 'ck' / 'tokenizer.json'))
    models = {'trained': (model, tok), 'random': str(tmp_path / 'ck')}
    got = E.evaluate_many(models, tasks=MANY, limit=8)
    assert list(got) == ['trained', 'random']
    for name, m in [('trained', model), ('random', other)]:
        alone = E.evaluate(m, tok, tasks=MANY, limit=8)
        pd.testing.assert_frame_equal(got[name], alone, check_exact=True)   # values, stderr, n, baselines: bit for bit
        assert got[name].attrs['lm_eval']['results'] == alone.attrs['lm_eval']['results']
    assert not got['trained'].value.equals(got['random'].value)
    assert set(got['trained'].attrs['requests'].values()) == {'built'}
    assert set(E.evaluate_many({'t': (model, tok)}, tasks=MANY, limit=8)['t'].attrs['requests'].values()) == {'cached'}


def test_request_cache_rebuilds_on_changed_data_or_limit(tok, model, tmp_path, monkeypatch):
    "A changed data file (same path) or another limit builds new requests; unchanged ones are read back."
    root = tmp_path / 'data'; (root / 'boolq').mkdir(parents=True)
    lines = (DATA / 'boolq' / 'validation.jsonl').read_text().splitlines(keepends=True)[:40]
    f = root / 'boolq' / 'validation.jsonl'; f.write_text(''.join(lines))
    monkeypatch.setenv('SUPRA_DATA', str(root)); monkeypatch.setenv('SUPRA_CACHE', str(tmp_path / 'cache'))
    how = lambda **kw: E.evaluate_many({'m': (model, tok)}, tasks=['boolq'], **kw)['m'].attrs['requests']['boolq']
    assert how(limit=5) == 'built'
    assert how(limit=5) == 'cached'
    assert how(limit=6) == 'built'
    doc = json.loads(lines[0]); q = doc['question']
    doc['question'] = q[::-1]                                      # same path, different content
    f.write_text(json.dumps(doc) + '\n' + ''.join(lines[1:]))
    got = E.evaluate_many({'m': (model, tok)}, tasks=['boolq'], limit=5)['m']
    assert got.attrs['requests']['boolq'] == 'built'
    assert got.equals(E.evaluate(model, tok, tasks=['boolq'], limit=5))
    from supra.eval.requests import build_requests
    task = E.task_manager().load(['boolq'])['tasks']['boolq']; task.set_config(key='num_fewshot', value=0)
    reqs, hit = build_requests(task, limit=5)
    assert hit and q[::-1] in reqs[0]['args'][0] and q not in reqs[0]['args'][0]   # the new requests are the new data's
    assert how(limit=5) == 'cached'


def test_eval_never_imports_train():
    "Evaluation, export and the eval benchmark load checkpoints through supra.model.checkpoint, never through the trainer."
    import subprocess, sys
    code = ("import sys, supra.eval.harness, supra.eval.export, supra.eval.bench, supra.eval.requests; "
            "bad = sorted(m for m in sys.modules if m.startswith('supra.train')); assert not bad, bad")
    subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})


def test_request_cache_hits_in_a_new_process(tmp_path):
    "Keys are the same in every process (WikiText's config holds a Python function: keyed by its source, not its address)."
    import subprocess, sys
    code = ("from supra.eval.harness import task_manager, quiet_lm_eval; from supra.eval.requests import prepare_requests\n"
            "with quiet_lm_eval():\n    l = task_manager().load(['blimp_adjunct_island', 'arc_easy', 'boolq', 'wikitext'])\n"
            "    [t.set_config(key='num_fewshot', value=0) for t in l['tasks'].values()]\n    print(sorted(set(prepare_requests(l, 2).values())))")
    env = {**os.environ, 'SUPRA_CACHE': str(tmp_path), 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
    run = lambda: subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True).stdout.split('\n')[-2]
    assert run() == "['built']"
    assert run() == "['cached']"

@pytest.mark.skipif(not os.environ.get('SUPRA_DATA'), reason='needs the local task data')
def test_many_checkpoint_benchmark_prints_its_ratios():
    "`python -m supra.bench eval checkpoints=K` (a miniature): scores equal to the stock loop's, and the last line carries both ratios and the ceiling."
    import re, subprocess, sys
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    r = subprocess.run([sys.executable, '-m', 'supra.bench', 'eval', 'checkpoints=2', 'limit=3', 'paradigms=2', 'repeats=1'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    kv = dict(re.findall(r'(\w+)=([^ ]+)', last))
    assert last.startswith('bench=eval checkpoints=2') and kv['acc_differ'] == '0', last
    assert list(kv)[-3:] == ['ceiling_e2e', 'ratio_e2e', 'ratio_floor'], last
    ratio, ceiling, floor = (float(kv[k]) for k in ('ratio_e2e', 'ceiling_e2e', 'ratio_floor'))
    assert 0 < ratio and 0 < floor and ceiling > 0 and math.isfinite(ceiling), last

def test_blimp_ties_are_counted():
    "An exact tie of a BLiMP pair's two log-likelihoods is scored correct by lm-eval (argmax picks the good sentence): the table says how often."
    from supra.eval.harness import tidy_results, eval_metrics
    def sample(a, b): return dict(doc=dict(field='syntax'), target=0, arguments=[('', 'x'), ('', 'y')], filtered_resps=[(a, False), (b, False)], acc=float(a >= b))
    res = dict(results={'blimp_x': {'acc,none': 0.75, 'acc_stderr,none': 0.2}}, **{'n-samples': {'blimp_x': {'effective': 4}}},
               samples={'blimp_x': [sample(-1.0, -1.0), sample(-2.0, -3.0), sample(-5.0, -5.0), sample(-4.0, -1.0)]})
    df = tidy_results(res)
    ties = df.query("task == 'blimp' and metric == 'ties'")
    assert ties.value.item() == 0.5 and ties.n.item() == 4
    ev = dict(table=df.to_dict('records'), heldout=dict(loss=1.0, bpb=1.0, ppl=1.0), generations=dict(greedy='', sampled=''), key='k')
    assert eval_metrics(ev)['blimp_ties'] == 0.5
