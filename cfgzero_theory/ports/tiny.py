"""Shared pieces of the random diffusers checkpoints the tests, demos and benchmarks build.

A model folder's ``tiny`` module (:mod:`cfgzero_theory.sd3.tiny`, :mod:`cfgzero_theory.flux.tiny`)
builds a random diffusers pipeline of a named size with diffusers, transformers and torch (the
``[test]`` extra; nothing is downloaded) and saves it, so that our loaders read what diffusers
wrote.  This module gives them the hand-written tokenizers and the weight treatment:

* :func:`clip_tokenizer` ``(pad_token=None)`` — a CLIP BPE tokenizer over :data:`TINY_WORDS`;
* :func:`t5_tokenizer` ``()`` — a T5 Unigram tokenizer over the same words;
* :func:`gemma_tokenizer` ``()`` — a Gemma BPE tokenizer over the same words (``<bos>`` first, right padding);
* :func:`finish_models` ``(models, perturb, torch_dtype)`` — eval mode, optional ``perturb·N(0, 1)``
  moves of every weight (so that LayerNorm-initialised scales and zero biases are not trivially
  1 and 0), optional cast.
"""

from __future__ import annotations

import importlib

__all__ = ["CLIP_MAX_LENGTH", "TINY_WORDS", "clip_tokenizer", "finish_models", "gemma_tokenizer", "require_torch",
           "t5_tokenizer"]

#: The words the tiny tokenizers know whole; other text falls back to letters.
TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "beach")
CLIP_MAX_LENGTH = 77


def require_torch():
    """``torch``, or an ``ImportError`` saying how to install what the random checkpoints need."""
    try:
        importlib.import_module("diffusers")
        importlib.import_module("transformers")
        return importlib.import_module("torch")
    except ImportError as err:
        raise ImportError('random checkpoints are built with torch, diffusers and transformers: '
                          'pip install -e ".[test]"') from err


def _clip_vocab():
    """A byte-level BPE vocabulary (letters, whole words as merges) and its merges."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["!", "!</w>", *letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in TINY_WORDS:
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right into the whole word
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the end-of-text id is the largest, as in CLIP
    return {token: i for i, token in enumerate(dict.fromkeys(vocab))}, list(dict.fromkeys(merges))


def clip_tokenizer(pad_token: str | None = None):
    """A ``transformers.CLIPTokenizer`` over :data:`TINY_WORDS` (``model_max_length`` 77); its
    ``vocab`` maps ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id)."""
    import transformers

    vocab, merges = _clip_vocab()
    options = {} if pad_token is None else {"pad_token": pad_token}
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH, **options)


def t5_tokenizer():
    """A ``transformers.T5Tokenizer`` Unigram model: T5's specials, the whole words, single letters."""
    import transformers

    words = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words += [("\u2581" + w, -3.0) for w in TINY_WORDS]
    words += [(chr(c), -6.0) for c in range(ord("a"), ord("z") + 1)]
    return transformers.T5Tokenizer(vocab=words, extra_ids=0)


def gemma_tokenizer():
    """A ``transformers.GemmaTokenizer`` (BPE, tokenizers-backed) over :data:`TINY_WORDS`: Gemma's
    specials at Gemma's ids (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4), ``▁``
    and the letters, each word whole with and without its leading ``▁`` (``"a photo"`` →
    ``<bos> a ▁photo``); ``<bos>`` is written first, padding goes right; other characters are
    ``<unk>`` (no byte fallback tokens).  63 tokens."""
    import transformers

    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581", *(chr(c) for c in range(ord("a"), ord("z") + 1))]
    merges = []
    for word in TINY_WORDS:
        pieces = list(word)
        while len(pieces) > 1:  # merge left to right into the whole word, then "▁" + word
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.append(pieces[0])
        merges.append(("\u2581", word))
        vocab.append("\u2581" + word)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    return transformers.GemmaTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), add_bos_token=True,
                                       add_eos_token=False, padding_side="right")


def finish_models(models, perturb: float | None, torch_dtype=None) -> None:
    """Put torch ``models`` in eval mode, move every weight by ``perturb·N(0, 1)`` (``None``: no
    move) and cast them to ``torch_dtype`` (``None``: as built), in place."""
    torch = require_torch()
    with torch.no_grad():
        for model in models:
            model.eval()
            if perturb is not None:
                for param in model.parameters():
                    param.add_(perturb * torch.randn_like(param))
            if torch_dtype is not None and next(model.parameters()).dtype != torch_dtype:
                model.to(torch_dtype)
