"""Shared test fixtures: a tiny character-level tokenizer and tiny random models, built in memory."""
import os
import re
import string

# Tests never reach a model or dataset hub: everything they use is built here or committed under tests/.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch


def make_tiny_tokenizer(words=()):
    """A character-level fast tokenizer (printable ASCII + 4 specials), no files, no hub. words: strings that become
    one token each (after those ids), e.g. the label words of tasks.prompts.TEMPLATES, which a character tokenizer
    would split into " " + letters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable) + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    whole = "".join(f"{re.escape(w)}|" for w in sorted(words, key=len, reverse=True))  # longest first
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(whole + r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_llama(vocab_size, seed=0, layers=2, hidden=32):
    """A random Llama causal LM with `layers` layers: big enough to have blocks, small enough for CI."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


def crash_after_checkpoint(monkeypatch, at_round):
    """tasks.checkpoint.save writes round `at_round`'s checkpoint, then the process is interrupted (Ctrl-C)."""
    import tasks

    real = tasks.checkpoint.save

    def save_then_crash(out, script, rnd, *rest, **kw):
        real(out, script, rnd, *rest, **kw)
        if rnd == at_round:
            raise KeyboardInterrupt

    monkeypatch.setattr(tasks.checkpoint, "save", save_then_crash)
