"""The tiny pipelines' tokenizers, built locally from a fixed word list (nothing downloaded).

Built with the ``tokenizers`` backend of ``transformers``: a byte-level BPE for CLIP
(whole-word merges over the word list, so any text encodes without unknown tokens) and a
Unigram vocabulary for T5.
"""

from __future__ import annotations

import string

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer, T5Tokenizer

CLIP_MAX_LENGTH = 77
# FluxPipeline pads T5 prompts to max_sequence_length=512 by default (its maximum) and
# StableDiffusion3Pipeline to 256: the tokenizer accepts up to 512.
T5_MAX_LENGTH = 512

# Fixed word list of both vocabularies: common prompt words, so typical prompts encode to
# whole-word tokens. Any other text still encodes (character pieces), never to <unk> for
# ASCII input.
_WORD_LIST = """
    a an the of in on at with and or by for from to under over near into is are this that
    photo photograph picture image painting drawing sketch illustration render portrait
    landscape closeup close up view shot scene style art artwork digital oil watercolor
    pencil anime cartoon realistic photorealistic detailed highly high quality best masterpiece
    cinematic lighting light dark bright soft sharp focus blur bokeh background foreground
    cat cats dog dogs bird birds horse fish animal person people man woman girl boy child
    face eyes hair hands smile robot car house city street road building tree trees forest
    flower flowers garden mountain mountains river lake sea ocean beach sky cloud clouds sun
    moon star stars night day morning evening sunset sunrise rain snow winter summer spring
    autumn fire water stone wood glass metal gold silver red green blue yellow orange purple
    pink black white gray brown colorful small large big tiny old young new beautiful cute
    sitting standing running walking flying wearing holding looking table chair window door
    room kitchen castle bridge boat ship train space planet astronaut dragon wizard knight
    hat dress shirt jacket food cake apple coffee cup book
"""
_WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())


_VOCAB_MULTIPLE = 64


def _letter_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a in string.ascii_lowercase for b in string.ascii_lowercase]


def _bpe_apply(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to ``pieces``: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(pieces)
    while len(pieces) > 1:
        best = min(
            range(len(pieces) - 1),
            key=lambda i: ranks.get((pieces[i], pieces[i + 1]), len(ranks)),
        )
        if (pieces[best], pieces[best + 1]) not in ranks:
            break
        pieces[best : best + 2] = [pieces[best] + pieces[best + 1]]
    return pieces


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE in the CLIP layout: 256 byte symbols, their ``</w>`` forms, word merges.

    Every listed word becomes a single token: for each word, the merges known so far are
    applied and new merges (ranked after all earlier ones, so earlier words keep their
    tokenization) join the remaining pieces left to right. The start and end tokens close
    the vocabulary, as in the real CLIP vocabulary.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        pieces = _bpe_apply([*word[:-1], word[-1] + "</w>"], ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            ranks[(current, piece)] = len(ranks)
            current += piece
            vocab.setdefault(current, len(vocab))
    # Round the vocabulary (and so the embedding rows) up to a multiple of _VOCAB_MULTIPLE
    # with two-letter word tokens, ranked after the word merges.
    for first, second in _letter_pairs():
        if (len(vocab) + 2) % _VOCAB_MULTIPLE == 0:
            break
        if first + second + "</w>" not in vocab:
            ranks[(first, second + "</w>")] = len(ranks)
            vocab[first + second + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = sorted(ranks, key=ranks.__getitem__)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram vocabulary in the T5 layout: <pad>=0, </s>=1, <unk>=2, then pieces.

    Whole words (with the ``▁`` word-start marker) score higher than single characters, so
    listed words encode as one piece and anything else falls back to characters.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {piece for piece, _ in vocab}
    for word in _WORDS:
        piece = "▁" + word
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, -3.0))
    for word in _WORDS:  # the same words inside other text (after "-", "(", ...)
        if word not in seen:
            seen.add(word)
            vocab.append((word, -4.0))
    for char in string.ascii_letters + string.digits + string.punctuation:
        for piece in (char, "▁" + char):
            if piece not in seen:
                seen.add(piece)
                vocab.append((piece, -8.0))
    for first, second in _letter_pairs():  # round up to a multiple of _VOCAB_MULTIPLE
        if len(vocab) % _VOCAB_MULTIPLE == 0:
            break
        if "▁" + first + second not in seen:
            seen.add("▁" + first + second)
            vocab.append(("▁" + first + second, -6.0))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)
