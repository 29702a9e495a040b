"supra.eval.export: the exported LlamaForCausalLM folder loads with stock transformers and reproduces Supra's logits."
import json, math
import pytest
import torch

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, AutoConfig, GenerationConfig
from supra.core.config import ModelConfig, ConfigError
from supra.model.transformer import Transformer
from supra.data.tokenizers import EOS
from conftest import scaled, tiny_bpe
from supra.eval.export import export_hf, llama_config, llama_state_dict, NotLlamaError, LLAMA_NEEDS

transformers.utils.logging.disable_progress_bar()
TOL = 1e-4


@pytest.fixture(scope='module')
def tok(): return tiny_bpe("Tiny language models learn the structure of text, one token at a time. " * 40, 400, specials=(EOS, '<|bos|>'))


def max_diff(model, hf, idx):
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.abs().max() > 1.0          # logits of a scale where a wrong weight would show
    return (ours - theirs).abs().max().item()


CONFIGS = {
    'deep-narrow': ModelConfig.named('deep-narrow'),
    'balanced': ModelConfig.named('balanced'),
    'shallow-wide': ModelConfig.named('shallow-wide'),
    'gqa': ModelConfig.named('balanced', n_kv_head=2, vocab_size=1024, rope_theta=500000.0, norm_eps=1e-5),
    'untied_mlp_hidden': ModelConfig(n_layer=2, d_model=96, n_head=3, vocab_size=512, tie_embeddings=False, mlp_hidden=160),
}


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_match_transformers(name, tok, tmp_path):
    cfg = CONFIGS[name]
    model = scaled(cfg)
    out = export_hf(model, tok, tmp_path / name)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == 'LlamaForCausalLM'
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    d = max_diff(model, hf, idx)
    print(f"{name}: max |logit diff| {d:.2e}")
    assert d <= TOL


def test_parity_check_is_sensitive(tok, tmp_path):
    "Negative controls: the interleaved RoPE convention, a wrong rope_theta or a wrong eps all break the 1e-4 match."
    cfg = CONFIGS['gqa']
    model = scaled(cfg)
    out = export_hf(model, tok, tmp_path / 'm')
    idx = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(model, hf, idx) <= TOL
    hd = cfg.head_dim   # rotate-half pairs (i, i+hd/2) -> interleaved pairs (2i, 2i+1): what a wrong convention looks like
    perm = torch.arange(hd).view(2, hd // 2).t().reshape(-1)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj, nh in ((layer.self_attn.q_proj, cfg.n_head), (layer.self_attn.k_proj, cfg.kv_heads)):
                w = proj.weight.view(nh, hd, -1)
                proj.weight.copy_(w[:, perm].reshape_as(proj.weight))
    assert max_diff(model, hf, idx) > 100 * TOL
    for field, wrong in [('rope_theta', 10000.0), ('norm_eps', 1e-2)]:
        other = Transformer(cfg.replace(**{field: wrong})).eval()
        other.load_state_dict(model.state_dict())
        assert max_diff(other, hf.__class__.from_pretrained(out).eval(), idx) > 100 * TOL


def test_greedy_generation_matches_transformers(tok, tmp_path):
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, vocab_size=tok.get_vocab_size(), seq_len=64)
    model = scaled(cfg, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tok, tmp_path / 'g')).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    ours = model.generate(prompt, 20, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_folder_contents_and_tokenizer(tok, tmp_path):
    cfg = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=512, seq_len=128, rope_theta=20000.0, norm_eps=1e-5)
    out = export_hf(Transformer(cfg), tok, tmp_path / 'export')
    names = {p.name for p in out.iterdir()}
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json'} <= names
    assert not any(p.name.startswith('.') for p in tmp_path.iterdir())      # no temp folders left behind
    c = json.loads((out / 'config.json').read_text())
    assert c['architectures'] == ['LlamaForCausalLM'] and c['rms_norm_eps'] == 1e-5
    assert c['rope_theta'] == 20000.0 and c['rope_parameters']['rope_theta'] == 20000.0
    assert c['max_position_embeddings'] == 128 and c['tie_word_embeddings'] is True
    conf = AutoConfig.from_pretrained(out)
    assert conf.rope_parameters['rope_theta'] == 20000.0 and conf.num_key_value_heads == 2
    eos = tok.token_to_id(EOS)   # documents start after <|endoftext|>: it is BOS, EOS and padding
    gc = GenerationConfig.from_pretrained(out)
    assert (gc.eos_token_id, gc.bos_token_id, gc.pad_token_id) == (eos, eos, eos) == (c['bos_token_id'], c['eos_token_id'], c['pad_token_id'])
    hft = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / 'tokenizer_config.json').read_text())['tokenizer_class'] == 'PreTrainedTokenizerFast'
    for s in ["Tiny models learn text.", "naïve café — ünïcödé 🙂", ""]:
        assert hft(s)['input_ids'] == tok.encode(s).ids
        assert hft.decode(tok.encode(s).ids) == s
    assert (hft.eos_token, hft.bos_token, hft.pad_token) == (EOS, EOS, EOS)
    assert hft.model_max_length == 128


def test_overwrite_replaces_folder(tok, tmp_path):
    cfg = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=512, seq_len=32)
    a, b = scaled(cfg, seed=1), scaled(cfg, seed=2)
    export_hf(a, tok, tmp_path / 'm')
    (tmp_path / 'm' / 'stale.txt').write_text('left over from an old export')
    out = export_hf(b, tok, tmp_path / 'm')
    assert not (out / 'stale.txt').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m']
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(b, hf, torch.randint(0, 512, (1, 32))) <= TOL


@pytest.mark.parametrize('field,value', [('norm', 'layernorm'), ('mlp', 'relu2'), ('mlp', 'gelu'), ('rotary_frac', 0.5),
                                         ('softcap', 30.0), ('qk_norm', True), ('embed_rank', 16)])
def test_incompatible_config_names_field_and_writes_nothing(field, value, tok, tmp_path):
    cfg = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=512, seq_len=32).replace(**{field: value})
    with pytest.raises(NotLlamaError) as e:
        export_hf(Transformer(cfg), tok, tmp_path / 'never')
    msg = str(e.value)
    assert f"{field}={value!r}" in msg and LLAMA_NEEDS[field][1] in msg
    assert isinstance(e.value, ConfigError) and e.value.field == field
    assert list(tmp_path.iterdir()) == []


def test_incompatible_lists_every_field():
    cfg = ModelConfig(norm='layernorm', qk_norm=True, softcap=15.0)
    with pytest.raises(NotLlamaError) as e:
        llama_config(cfg)
    assert set(e.value.problems) == {'norm', 'qk_norm', 'softcap'}
    for f in ('norm', 'qk_norm', 'softcap'): assert f in str(e.value)


def test_tokenizer_larger_than_vocab_is_refused(tok, tmp_path):
    cfg = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=300, seq_len=32)
    with pytest.raises(ConfigError, match='vocab_size=300'):
        export_hf(Transformer(cfg), tok, tmp_path / 'never')
    assert list(tmp_path.iterdir()) == []


def test_state_dict_mapping_is_complete():
    cfg = ModelConfig(n_layer=3, d_model=64, n_head=4, n_kv_head=1, vocab_size=512, tie_embeddings=False)
    m = Transformer(cfg)
    sd = llama_state_dict(m)
    assert sum(v.numel() for v in sd.values()) == m.n_params()
    assert sd['model.layers.2.self_attn.k_proj.weight'].shape == (16, 64)
    assert torch.equal(sd['model.layers.1.mlp.up_proj.weight'], m.blocks[1].mlp.c_fc.weight)
    assert torch.equal(sd['model.layers.1.mlp.gate_proj.weight'], m.blocks[1].mlp.c_gate.weight)
    assert torch.equal(sd['model.layers.1.self_attn.v_proj.weight'], m.blocks[1].attn.c_attn.weight[-16:])


def test_other_model_family_is_refused(tok, tmp_path):
    "A model that is not the decoder-only Transformer (another registered family) is refused by name, nothing written."
    class EncDec(torch.nn.Module):
        def __init__(self): super().__init__(); self.cfg = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=512, seq_len=32)
    with pytest.raises(ConfigError, match=r"model='EncDec' is invalid.*Transformer"):
        export_hf(EncDec(), tok, tmp_path / 'never')
    assert list(tmp_path.iterdir()) == []
