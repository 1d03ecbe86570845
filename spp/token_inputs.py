"""Inputs for language models: random token ids, Gaussian embeddings, or a text file through the model's tokenizer.

Each is an ``InputSource`` (``spp.inputs``): micro-batch ``j`` always holds the same samples, so shards of a run
see disjoint parts whose union is what one process sees. Batches are tensors of token ids (B, L), or, where the
model needs more than one input (an encoder-decoder's ``decoder_input_ids``, ``inputs_embeds``), dicts the
recorder passes as keyword arguments: ``model(**batch)``.

Token ids are checked against the model's vocabulary and position table here, so a bad id is a one-line error
naming the file and the id, not an IndexError deep inside an embedding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from spp.errors import SppError
from spp.inputs import InputSource

DEFAULT_SEQ_LEN = 128
MAX_DEFAULT_SEQUENCES = 64  # without --num-samples, a text file contributes at most this many sequences
Batch = torch.Tensor | dict[str, torch.Tensor]


def _is_integer(dtype: Any) -> bool:
    """A torch or numpy integer dtype (not bool, not floating)."""
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    return getattr(dtype, "kind", "") in ("i", "u")


def check_token_ids(ids: Any, *, vocab_size: int | None, where: str) -> None:
    """An integer (N, L) array of ids in [0, vocab_size); a one-line SppError otherwise.

    Works on tensors and (memory-mapped) numpy arrays; one pass over the data for min and max.
    """
    dtype = getattr(ids, "dtype", None)
    if not _is_integer(dtype):
        raise SppError(f"--input {where}: token ids must be integers, not {dtype}")
    shape = tuple(int(d) for d in ids.shape)
    if len(shape) != 2:
        raise SppError(f"--input {where}: token ids must be (N, L), not shape {shape}")
    if not shape[0] or not shape[1]:
        raise SppError(f"--input {where}: shape {shape} holds no tokens")
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise SppError(f"--input {where}: token id {low} is negative")
    if vocab_size is not None and high >= vocab_size:
        raise SppError(
            f"--input {where}: token id {high} is outside the model's vocabulary (ids 0..{vocab_size - 1}); "
            "were these ids made by another tokenizer?"
        )


def check_seq_len(seq_len: int, *, max_positions: int | None, where: str) -> None:
    """A sequence length the model's position table holds (models without one take any length)."""
    if seq_len < 1:
        raise SppError(f"--seq-len must be at least 1, not {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise SppError(
            f"{where}: sequences of {seq_len} tokens, but the model's position table holds {max_positions}; "
            f"use --seq-len {max_positions} or less"
        )


def _check_counts(num_samples: int, batch_size: int) -> None:
    if batch_size < 1 or num_samples < 1:
        raise SppError("--batch-size and --num-samples must be at least 1")


def _generator(seed: int, j: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + j)  # the same scheme as GaussianInput


class _DictBatches(InputSource):
    """``batches()`` for sources whose micro-batches may be dicts (``InputSource.batches`` reads ``.shape``)."""

    def batches(  # type: ignore[override]
        self,
        indices: Iterable[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Batch]:
        for j in range(self.num_batches) if indices is None else indices:
            yield self.batch(j, device, dtype)


# ---- random token ids --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenInput(_DictBatches):
    """Token ids drawn uniformly from ``[0, vocab_size)``: (num_samples, seq_len), in micro-batches.

    Micro-batch j comes from a generator seeded with (seed, j). ``decoder=True`` (encoder-decoder models) yields
    ``{"input_ids": ids, "decoder_input_ids": ids}``: the decoder reads the same ids.
    """

    vocab_size: int
    seq_len: int = DEFAULT_SEQ_LEN
    num_samples: int = 8
    batch_size: int = 8
    seed: int = 0
    decoder: bool = False
    max_positions: int | None = None

    def __post_init__(self) -> None:
        _check_counts(self.num_samples, self.batch_size)
        if self.vocab_size < 1:
            raise SppError(f"the model's vocabulary is empty (vocab_size={self.vocab_size})")
        check_seq_len(self.seq_len, max_positions=self.max_positions, where="--input tokens")

    def batch(  # type: ignore[override]
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Batch:
        n = len(self.batch_slice(j))
        ids = torch.randint(0, self.vocab_size, (n, self.seq_len), generator=_generator(self.seed, j))
        ids = ids.to(device)
        return {"input_ids": ids, "decoder_input_ids": ids} if self.decoder else ids

    def describe(self) -> dict[str, Any]:
        return {
            "input": "tokens",
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "input_shape": [self.seq_len],
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "decoder_input": "same ids" if self.decoder else "",
        }


# ---- Gaussian embeddings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingInput(_DictBatches):
    """``inputs_embeds`` ~ N(0, std^2) of shape (num_samples, seq_len, hidden_size): the layers' input without
    the embedding table, and without what the table's module applies (transformers 5 scales Gemma's embeddings by
    sqrt(hidden_size) inside the embedding module, so x reaches the first layer unscaled).

    Yields ``{"inputs_embeds": x}`` (plus ``decoder_inputs_embeds``: the same x, for encoder-decoder models).
    """

    hidden_size: int
    seq_len: int = DEFAULT_SEQ_LEN
    num_samples: int = 8
    batch_size: int = 8
    seed: int = 0
    std: float = 1.0
    decoder: bool = False
    max_positions: int | None = None

    def __post_init__(self) -> None:
        _check_counts(self.num_samples, self.batch_size)
        if self.hidden_size < 1:
            raise SppError(f"hidden size must be positive, not {self.hidden_size}")
        check_seq_len(self.seq_len, max_positions=self.max_positions, where="--input embeddings")

    def batch(  # type: ignore[override]
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Batch:
        n = len(self.batch_slice(j))
        x = torch.randn((n, self.seq_len, self.hidden_size), generator=_generator(self.seed, j))
        if self.std != 1.0:
            x.mul_(self.std)
        x = x.to(device=device, dtype=dtype)
        return {"inputs_embeds": x, "decoder_inputs_embeds": x} if self.decoder else {"inputs_embeds": x}

    def describe(self) -> dict[str, Any]:
        return {
            "input": "embeddings",
            "input_std": self.std,
            "seq_len": self.seq_len,
            "input_shape": [self.seq_len, self.hidden_size],
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


# ---- text --------------------------------------------------------------------------------------------------


def _tokenize_file(path: str, tokenizer: Any, needed: int) -> torch.Tensor:
    """The file's token ids, no special tokens, read in pieces of whole lines until ``needed`` ids are there (a
    large corpus is not read whole). Pieces end at line breaks, where tokenizers do not merge across."""
    from spp.hf import quiet_transformers

    ids: list[int] = []
    piece: list[str] = []
    size, seen_text = 0, False
    try:
        with open(path, encoding="utf-8") as f, quiet_transformers():
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= _PIECE_CHARS:
                    seen_text |= any(p.strip() for p in piece)
                    ids.extend(tokenizer("".join(piece), add_special_tokens=False)["input_ids"])
                    piece, size = [], 0
                    if len(ids) >= needed:
                        break
            if piece and len(ids) < needed:
                seen_text |= any(p.strip() for p in piece)
                ids.extend(tokenizer("".join(piece), add_special_tokens=False)["input_ids"])
    except UnicodeDecodeError:
        raise SppError(f"--input {path}: not UTF-8 text") from None
    if not seen_text:
        raise SppError(f"--input {path}: the file holds no text")
    return torch.tensor(ids, dtype=torch.long)


_PIECE_CHARS = 1 << 18


class TextInput(_DictBatches):
    """A text file through the model's own tokenizer, cut into consecutive sequences of ``seq_len`` tokens.

    The text is tokenised as one stream (no special tokens between pieces), only as far as the sequences asked for
    need; the last partial sequence is dropped. Without ``num_samples``, at most MAX_DEFAULT_SEQUENCES sequences.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        *,
        seq_len: int = DEFAULT_SEQ_LEN,
        num_samples: int | None = None,
        batch_size: int = 8,
        decoder: bool = False,
        where: str = "text",
        tokenizer: str = "",
    ) -> None:
        if ids.ndim != 1:
            raise SppError(f"--input {where}: expected one stream of token ids, not shape {tuple(ids.shape)}")
        if batch_size < 1 or (num_samples is not None and num_samples < 1):
            raise SppError("--batch-size and --num-samples must be at least 1")
        available = int(ids.numel()) // seq_len
        if available < 1:
            raise SppError(
                f"--input {where}: the text gives {ids.numel()} tokens, fewer than one sequence of {seq_len}; "
                "use a longer text or a smaller --seq-len"
            )
        wanted = num_samples if num_samples is not None else min(available, MAX_DEFAULT_SEQUENCES)
        if wanted > available:
            raise SppError(
                f"--input {where}: {wanted} sequences of {seq_len} tokens asked for, the text gives {available}"
            )
        self.data = ids[: wanted * seq_len].reshape(wanted, seq_len).contiguous()
        self.seq_len, self.num_samples, self.batch_size = seq_len, wanted, batch_size
        self.decoder, self.where, self.tokenizer = decoder, where, tokenizer
        self.tokens_read = int(ids.numel())

    @classmethod
    def from_file(
        cls,
        path: str,
        *,
        tokenizer: str | None,
        vocab_size: int | None,
        seq_len: int = DEFAULT_SEQ_LEN,
        num_samples: int | None = None,
        batch_size: int = 8,
        decoder: bool = False,
        max_positions: int | None = None,
    ) -> TextInput:
        """Tokenise ``path`` with the tokenizer saved at ``tokenizer`` (a folder or cached hub id; see spp.hf)."""
        check_seq_len(seq_len, max_positions=max_positions, where=f"--input {path}")
        if not os.path.isfile(path):
            raise SppError(f"--input {path}: no such file")
        if tokenizer is None:
            raise SppError(
                f"--input {path}: text needs the model's tokenizer, and this model has none saved "
                "(hf:TYPE models are built from a config alone); load the model from a folder or a cached hub id "
                "that holds its tokenizer, or use --input tokens"
            )
        from spp.hf import load_tokenizer

        tok = load_tokenizer(tokenizer)
        needed = (num_samples if num_samples is not None else MAX_DEFAULT_SEQUENCES) * seq_len
        ids = _tokenize_file(path, tok, needed)
        if ids.numel():
            check_token_ids(ids.reshape(1, -1), vocab_size=vocab_size, where=path)
        return cls(
            ids,
            seq_len=seq_len,
            num_samples=num_samples,
            batch_size=batch_size,
            decoder=decoder,
            where=path,
            tokenizer=tokenizer,
        )

    def batch(  # type: ignore[override]
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Batch:
        part = self.batch_slice(j)
        ids = self.data[part.start : part.stop].to(device)
        return {"input_ids": ids, "decoder_input_ids": ids} if self.decoder else ids

    def describe(self) -> dict[str, Any]:
        return {
            "input": "text",
            "input_path": self.where,
            "tokenizer": self.tokenizer,
            "seq_len": self.seq_len,
            "input_shape": [self.seq_len],
            "num_samples": self.num_samples,
            "tokens_read": self.tokens_read,
            "batch_size": self.batch_size,
        }
