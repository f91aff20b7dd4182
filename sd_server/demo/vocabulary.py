"""The demo model's CLIP tokenizer: every byte (so any prompt tokenizes), and each word of the world as one token,
with BPE merges written here so that the real CLIPTokenizer reproduces exactly those words."""

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

from sd_server.demo.world import BACKGROUNDS, COLOURS, SHAPES, SIZES

TEXT_POSITIONS = 16  # prompts of the world are ~10 tokens; fewer padding positions for cross-attention to wade through
TRIGGER = "sks"  # in the vocabulary, never in a training prompt: free for a user's own subject
WORDS = ("a", "on", "of", "background", "shape", "photo", TRIGGER, *SHAPES, *COLOURS, *BACKGROUNDS, *SIZES)


def apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair, everywhere, until none is ranked."""
    while len(symbols) > 1:
        pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks) + 1))
        if best not in ranks:
            break
        merged, index = [], 0
        while index < len(symbols):
            if index < len(symbols) - 1 and (symbols[index], symbols[index + 1]) == best:
                merged.append(symbols[index] + symbols[index + 1])
                index += 2
            else:
                merged.append(symbols[index])
                index += 1
        symbols = merged
    return symbols


def word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges that make each word one token: for each word in turn, run the merges so far, then join what is
    left from the left. Later merges rank higher, so they never change how an earlier word splits."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        symbols = apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    return merges


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is every byte (as word piece and as word end), every merged piece, and
    the world's words."""
    symbols = sorted(ByteLevel.alphabet())
    merges = word_merges(WORDS)
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(symbol + "</w>" for symbol in symbols)]
    tokens += [left + right for left, right in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_POSITIONS)
