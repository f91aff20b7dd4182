"""Prompts as AUTOMATIC1111 encodes them: attention weights (parsed in sd_server.domain.prompt_weights) scale each
token's embedding, and prompts past CLIP's 77 tokens are encoded in chunks of 75 tokens (the text encoder's
positions less the start and end tokens) whose embeddings are concatenated. A batch whose prompts are all plain
and short goes to the pipeline as text, exactly as before."""

import math
import threading
from pathlib import Path
from typing import Any

import torch
import transformers

from sd_server.domain.prompt_weights import is_plain, parse_attention
from sd_server.storage.model_files import checkpoint_location


def weighted_tokens(tokenizer: Any, text: str) -> tuple[list[int], list[float]]:
    """The token ids of ``text`` without start and end tokens, and each token's weight."""
    ids: list[int] = []
    weights: list[float] = []
    for segment, weight in parse_attention(text):
        tokens = tokenizer(segment, add_special_tokens=False, truncation=False, verbose=False).input_ids if segment else []
        ids += tokens
        weights += [weight] * len(tokens)
    return ids, weights


def chunk_tokens(tokenizer: Any) -> int:
    """Tokens of a prompt in one chunk: the text encoder's positions (77 for SD1.5) less the start and end tokens."""
    return tokenizer.model_max_length - 2


def count_chunks(tokenizer: Any, text: str) -> int:
    """How many chunks ``text`` takes (at least one)."""
    return chunks_of(tokenizer, weighted_tokens(tokenizer, text)[0])


def chunks_of(tokenizer: Any, ids: list[int]) -> int:
    """How many chunks the token ``ids`` of a prompt take (at least one)."""
    return max(1, math.ceil(len(ids) / chunk_tokens(tokenizer)))


class PromptCounter:
    """Counts the 75-token chunks of prompts with each base's tokenizer, read from its folder (or hub snapshot) once:
    small, no weights."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()  # a tokenizer is not safe to share between threads

    def chunks(self, base: str, texts: list[str]) -> int:
        """How many chunks the longest of ``texts`` takes with ``base``'s tokenizer (1 when the tokenizer cannot be
        read: the model's load reports why, and the batch pads to what its prompts need)."""
        with self._lock:
            tokenizer = self.tokenizer(base)
            return max((count_chunks(tokenizer, text) for text in texts if text), default=1) if tokenizer else 1

    def tokenizer(self, base: str) -> Any:
        """``base``'s tokenizer (read once), or None when it cannot be read; not thread-safe (``chunks`` locks)."""
        if base not in self._tokenizers:
            try:
                location = checkpoint_location(self.models_dir, base)
                self._tokenizers[base] = transformers.CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
            except (OSError, ValueError):
                return None
        return self._tokenizers[base]


def prompt_arguments(pipeline: Any, prompts: list[str], negatives: list[str], chunks: int) -> dict[str, Any]:
    """The pipeline's text arguments: the prompts themselves when all are plain and fit one chunk (exactly today's
    path), else prompt and negative embeddings of ``chunks`` chunks each (more if a prompt needs them), weighted."""
    tokenizer = pipeline.tokenizer
    prompt_tokens, negative_tokens = ([weighted_tokens(tokenizer, text) for text in texts] for texts in (prompts, negatives))
    chunks = max(chunks, *(chunks_of(tokenizer, ids) for ids, _ in prompt_tokens + negative_tokens))
    if chunks == 1 and all(is_plain(text) for text in prompts + negatives):
        return {"prompt": prompts, "negative_prompt": negatives}
    return {
        "prompt_embeds": encode_tokens(pipeline, prompt_tokens, chunks),
        "negative_prompt_embeds": encode_tokens(pipeline, negative_tokens, chunks),
    }


@torch.no_grad()
def encode_tokens(pipeline: Any, tokens: list[tuple[list[int], list[float]]], chunks: int) -> torch.Tensor:
    """Embeddings of prompts given as (token ids, weights): each chunk encoded as CLIP sees a prompt (start, 75
    tokens, end, padding), every token scaled by its weight, each prompt's mean kept as A1111 does."""
    tokenizer, text_encoder, size = pipeline.tokenizer, pipeline.text_encoder, chunk_tokens(pipeline.tokenizer)
    pieces = []
    for index in range(chunks):
        window = slice(index * size, (index + 1) * size)
        ids = torch.tensor([chunk_ids(tokenizer, text_ids[window]) for text_ids, _ in tokens], device=text_encoder.device)
        weights = torch.tensor([[1.0, *chunk_weights(text_weights[window], size), 1.0] for _, text_weights in tokens])
        # One call for the whole batch per chunk: per-image LoRA hooks on the text encoder see the batch's order.
        embeddings = text_encoder(ids)[0].to(text_encoder.dtype)
        pieces.append(apply_weights(embeddings, weights.to(embeddings.device)))
    return torch.cat(pieces, dim=1)


def chunk_ids(tokenizer: Any, ids: list[int]) -> list[int]:
    """A chunk's ids: start, the tokens, end, padding (as the tokenizer pads a prompt)."""
    padding = [tokenizer.pad_token_id] * (chunk_tokens(tokenizer) - len(ids))
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *padding]


def chunk_weights(weights: list[float], size: int) -> list[float]:
    """A chunk's ``size`` token weights: the tokens', then 1 for the padding."""
    return [*weights, *[1.0] * (size - len(weights))]


def apply_weights(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's embedding times its weight, each sample rescaled to the mean it had (untouched where every
    weight is 1, so a plain prompt encodes exactly as the pipeline encodes it)."""
    weighted = embeddings.clone()
    for sample in range(embeddings.shape[0]):
        if torch.all(weights[sample] == 1.0):
            continue
        original_mean = embeddings[sample].float().mean()
        scaled = embeddings[sample].float() * weights[sample, :, None]
        weighted[sample] = (scaled * (original_mean / scaled.mean())).to(embeddings.dtype)
    return weighted
