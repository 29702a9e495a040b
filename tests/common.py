"Helpers shared by the test modules (model and tokenizer fixtures that need no data set)."
import math
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

from supra.model.transformer import Transformer, EOS_TOKEN


def scaled(cfg, seed=0):
    """A random model with O(1) logits: at the 0.02 init logits are ~1e-2, so greedy decoding would barely depend on
    the weights and a 1e-4 tolerance would prove little."""
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1])) if p.dim() == 2 else p.normal_(1, 0.1)
    return m


def tiny_bpe(text:str, vocab_size:int, specials=(EOS_TOKEN,)) -> Tokenizer:
    "A byte-level BPE tokenizer trained on `text` in memory, with the pool's end-of-text token."
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return t
