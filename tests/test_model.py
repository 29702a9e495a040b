"Tests of supra.model.transformer beyond the lesson cells of nbs/02_model/00_transformer.ipynb."
import math
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, load_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

from supra.core.config import ModelConfig, ConfigError
from supra.model.transformer import Transformer, KVCache, count_params, generate_text
from supra.data.tokenizers import EOS
from conftest import scaled, tiny_bpe

TINY = ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=256, seq_len=32)
VARIANTS = {
    'base': {}, 'gqa': dict(n_kv_head=2), 'mqa': dict(n_kv_head=1), 'qk_norm': dict(qk_norm=True),
    'partial_rope': dict(rotary_frac=0.25), 'no_rope': dict(rotary_frac=0.0), 'softcap': dict(softcap=5.0),
    'relu2_layernorm': dict(mlp='relu2', norm='layernorm'), 'gelu': dict(mlp='gelu', mlp_hidden=96),
    'factorised': dict(embed_rank=16), 'factorised_untied': dict(embed_rank=16, tie_embeddings=False),
    'untied': dict(tie_embeddings=False),
}


@pytest.fixture(scope='module')
def tok(): return tiny_bpe("The cat sat on the mat. A small model predicts the next token. " * 30, 256)


@pytest.mark.parametrize('name', VARIANTS)
def test_param_count_formula(name):
    cfg = TINY.replace(**VARIANTS[name])
    assert Transformer(cfg).n_params() == count_params(cfg)


def test_count_params_every_combination():
    "count_params equals the built model's sum(p.numel()) for every combination of norm, MLP, GQA, rank, tying, QK-norm, RoPE, softcap."
    import itertools
    from supra.core.config import MLPS, NORMS
    opts = dict(norm=NORMS, mlp=MLPS, n_kv_head=(None, 2, 1), embed_rank=(None, 1, 8, 64), tie_embeddings=(True, False),
                qk_norm=(False, True), rotary_frac=(1.0, 0.5), softcap=(None, 30.0), mlp_hidden=(None, 40))
    n = 0
    for combo in itertools.product(*opts.values()):
        cfg = TINY.replace(n_layer=1, **dict(zip(opts, combo)))
        m = Transformer(cfg)
        assert count_params(cfg) == sum(p.numel() for p in m.parameters()) == m.n_params(), cfg
        n += 1
    assert n == 2 * 3 * 3 * 4 * 2 * 2 * 2 * 2 * 2


def test_tied_factorised_embedding_saves_parameters_in_and_out():
    "embed_rank=r, tied: V*r + r*d embedding parameters in all, the head reads the table back, no lm_head."
    cfg = TINY.replace(embed_rank=16)
    m = Transformer(cfg)
    body = count_params(TINY) - TINY.vocab_size * TINY.d_model
    assert count_params(cfg) == body + 256 * 16 + 16 * 64 and m.lm_head is None
    idx = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        h = m.body(idx)
        torch.testing.assert_close(m(idx)[0], F.linear(h, m.wte.weight @ m.emb_proj.weight.T), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m(idx, idx, return_logits=False)[1], m(idx, idx)[1], atol=1e-5, rtol=1e-5)   # chunked path too
    u = Transformer(cfg.replace(tie_embeddings=False))
    assert u.lm_head.weight.shape == (256, 64) and count_params(cfg.replace(tie_embeddings=False)) == count_params(cfg) + 256 * 64


@pytest.mark.parametrize('name', VARIANTS)
def test_cached_generation_equals_uncached(name):
    "Greedy tokens identical, within and far past seq_len (the window slides), for every architecture option."
    m = scaled(TINY.replace(**VARIANTS[name]))
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    cached = m.generate(prompt, 50, temperature=0)
    assert torch.equal(cached, m.generate(prompt, 50, temperature=0, use_cache=False))
    assert cached.shape == (3, 57) and torch.equal(cached[:, :7], prompt)


def test_cached_logits_match_full_forward():
    "Prefill in chunks (the masked path), then one token at a time: every position's logits equal one full forward."
    m = scaled(TINY.replace(n_kv_head=2))
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        full = m(idx)[0]
        cache = KVCache(TINY.n_layer, TINY.seq_len)
        parts = [m(idx[:, :10], cache=cache)[0], m(idx[:, 10:17], cache=cache)[0]]
        parts += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(17, 32)]
    assert cache.pos == 32
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match='seq_len=32'):
        m(idx[:, :1], cache=cache)   # the cache is full


def test_generate_crops_prompt_longer_than_seq_len():
    m = scaled(TINY)
    prompt = torch.randint(0, 256, (1, 45))
    out = m.generate(prompt, 5, temperature=0)
    assert torch.equal(out[:, :45], prompt)
    assert torch.equal(out, m.generate(prompt, 5, temperature=0, use_cache=False))
    assert torch.equal(out[:, 45:], m.generate(prompt[:, -32:], 5, temperature=0)[:, 32:])


def test_sampling_reproducible_and_topk_restricts():
    m = scaled(TINY)
    p = torch.randint(0, 256, (4, 3))
    g = lambda s: torch.Generator().manual_seed(s)
    a = m.generate(p, 20, temperature=1.0, top_k=5, generator=g(0))
    assert torch.equal(a, m.generate(p, 20, temperature=1.0, top_k=5, generator=g(0)))
    assert not torch.equal(a, m.generate(p, 20, temperature=1.0, top_k=5, generator=g(1)))
    # every sampled token is among the 5 most likely under the uncached model
    with torch.no_grad():
        logits = m(a[:, :-1])[0][:, 2:]
    top5 = logits.topk(5, -1).indices
    assert (top5 == a[:, 3:, None]).any(-1).all()


def test_generate_restores_mode_and_stops_at_eos():
    m = scaled(TINY).train()
    p = torch.randint(0, 256, (1, 4))
    greedy = m.generate(p, 10, temperature=0)
    assert m.training
    eos = int(greedy[0, 6])                       # pretend the 3rd generated token is EOS
    out = m.generate(p, 10, temperature=0, eos_id=eos)
    assert torch.equal(out, greedy[:, :out.shape[1]]) and int(out[0, -1]) == eos and out.shape[1] <= 7


@pytest.mark.parametrize('bad,match', [(dict(temperature=-0.5), 'temperature'), (dict(top_k=0), 'top_k'),
                                       (dict(max_new_tokens=-1), 'max_new_tokens'), (dict(max_new_tokens=2.5), 'max_new_tokens')])
def test_generate_rejects_bad_arguments(bad, match):
    m = Transformer(TINY)
    kw = dict(max_new_tokens=3) | bad
    with pytest.raises(ConfigError, match=match):
        m.generate(torch.zeros(1, 2, dtype=torch.long), **kw)


def test_bad_inputs():
    with pytest.raises(ConfigError, match='cfg'):
        Transformer(dict(n_layer=2))
    with pytest.raises(ConfigError, match='n_kv_head'):
        TINY.replace(n_kv_head=3)
    m = Transformer(TINY)
    with pytest.raises(ConfigError, match='at most seq_len=32'):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ConfigError, match='idx'):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 3)


def test_loss_is_mean_cross_entropy_and_ignores_minus_100():
    m = scaled(TINY)
    idx, tgt = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    logits, loss = m(idx, tgt)
    assert logits.dtype == torch.float32 and logits.shape == (2, 16, 256)
    ref = -F.log_softmax(logits.double(), -1).gather(-1, tgt[..., None]).mean()
    assert abs(loss.item() - ref.item()) < 1e-5
    tgt2 = tgt.clone(); tgt2[:, :8] = -100
    assert abs(m(idx, tgt2)[1].item() - F.cross_entropy(logits[:, 8:].reshape(-1, 256), tgt[:, 8:].reshape(-1)).item()) < 1e-5


def test_tied_head_is_the_embedding_and_gets_both_gradients():
    m = Transformer(TINY)
    assert m.lm_head is None and 'lm_head.weight' not in m.state_dict()
    idx = torch.randint(0, 256, (2, 8))
    m(idx, idx)[1].backward()
    g = m.wte.weight.grad
    assert (g[idx.unique()] != 0).any() and (g.abs().sum(1) > 0).float().mean() > 0.9  # head touches every row
    u = Transformer(TINY.replace(tie_embeddings=False))
    assert u.lm_head.weight.shape == (256, 64) and u.lm_head.weight is not u.wte.weight


def test_init_scales():
    cfg = ModelConfig.named('balanced')
    m = Transformer(cfg)
    assert abs(m.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(m.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    want = 0.02 / math.sqrt(2 * cfg.n_layer)
    for b in m.blocks:
        assert abs(b.attn.c_proj.weight.std().item() - want) < 2e-4
        assert abs(b.mlp.c_proj.weight.std().item() - want) < 2e-4
        assert torch.equal(b.norm1.weight, torch.ones(cfg.d_model))


def test_safetensors_round_trip(tmp_path):
    "Checkpoints are safetensors: the state dict has no shared tensors and no RoPE tables, and reloads exactly."
    for kw in [{}, dict(embed_rank=16, qk_norm=True)]:
        a = scaled(TINY.replace(**kw), seed=3)
        sd = a.state_dict()
        assert not any(k.endswith(('cos', 'sin')) for k in sd)
        save_file(sd, tmp_path / 'm.safetensors')
        b = Transformer(TINY.replace(**kw)).eval()
        b.load_state_dict(load_file(tmp_path / 'm.safetensors'), strict=True)
        idx = torch.randint(0, 256, (2, 16))
        with torch.no_grad():
            assert torch.equal(a(idx)[0], b(idx)[0])


def test_dropout_train_vs_eval():
    m = Transformer(TINY.replace(dropout=0.2))
    idx = torch.randint(0, 256, (2, 16))
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])


def test_bf16_autocast_forward_and_generate():
    "The GPU path's dtypes (bf16 activations, fp32 logits, bf16 KV cache), exercised with CPU autocast."
    m = scaled(TINY.replace(n_kv_head=2, qk_norm=True))
    idx = torch.randint(0, 256, (2, 8))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, loss = m(idx, idx)
        out = m.generate(idx, 30, temperature=0)
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    assert out.shape == (2, 38)
    with torch.no_grad():
        ref = m(idx)[0]
    assert (logits - ref).abs().max() < 0.25 * ref.abs().max()


def test_generate_text(tok):
    m = scaled(TINY.replace(vocab_size=tok.get_vocab_size()))
    out = generate_text(m, tok, "The cat", 10, temperature=0)
    assert isinstance(out, str) and out == generate_text(m, tok, "The cat", 10)
    # the continuation is the decoded new tokens of a greedy run started from <|endoftext|>
    eos = tok.token_to_id(EOS)
    ids = [eos] + tok.encode("The cat").ids
    new = m.generate(torch.tensor([ids]), 10, temperature=0)[0, len(ids):].tolist()
    new = new[:new.index(eos)] if eos in new else new
    assert out == tok.decode(new)
    s1 = generate_text(m, tok, "The cat", 10, temperature=1.0, top_k=20, seed=7)
    assert s1 == generate_text(m, tok, "The cat", 10, temperature=1.0, top_k=20, seed=7)
    with pytest.raises(ConfigError, match='prompt'):
        generate_text(m, tok, 123, 5)


def test_generate_text_without_eos_token():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(["abc abd"], trainers.BpeTrainer(vocab_size=260, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    m = scaled(TINY.replace(vocab_size=t.get_vocab_size()))
    assert isinstance(generate_text(m, t, "ab", 4), str)
    with pytest.raises(ConfigError, match='non-empty prompt'):
        generate_text(m, t, "", 4)


@pytest.mark.parametrize('chunk', [7, 1024])
def test_chunked_cross_entropy_matches_plain(chunk):
    from supra.model.transformer import chunked_cross_entropy
    torch.manual_seed(0)
    x = torch.randn(50, 32, dtype=torch.double, requires_grad=True)
    w = torch.randn(40, 32, dtype=torch.double, requires_grad=True)
    t = torch.randint(0, 40, (50,)); t[::5] = -100
    for cap in (None, 2.0):
        z = x @ w.t()
        ref = F.cross_entropy(cap * torch.tanh(z / cap) if cap else z, t)
        gx, gw = torch.autograd.grad(ref, (x, w))
        got = chunked_cross_entropy(x, w, t, cap, chunk)
        hx, hw = torch.autograd.grad(2 * got, (x, w))      # the incoming gradient scales both
        assert abs(got.item() - ref.item()) < 1e-10
        torch.testing.assert_close(hx, 2 * gx); torch.testing.assert_close(hw, 2 * gw)


def test_chunked_loss_under_bf16_autocast():
    m = scaled(TINY)
    idx = torch.randint(0, 256, (2, 16)); tgt = torch.roll(idx, -1, 1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        plain = m(idx, tgt)[1]
        chunked = m(idx, tgt, return_logits=False)[1]
    assert chunked.dtype == torch.float32 and abs(plain.item() - chunked.item()) < 2e-2 * plain.item()
    chunked.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
