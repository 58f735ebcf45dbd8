"""Sequence packing: several batches of different sequence lengths as one token stream.

The student sees 2 global crops (257 tokens at 224 px) and N local crops (50 tokens at 98 px) per step. Packing them
as a (1, T, D) stream lets every token-wise op (norms, qkv, projection, FFN) run as one large matmul; only attention
needs to know where each sequence starts, which :class:`PackedSequences` describes (DINOv2 paper Sec. 5,
"Sequence packing").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class PackedSequences:
    """Layout of a packed stream: ``groups[i] = (batch_i, tokens_i)``, groups stored one after the other.

    Caches (per instance, so per forward pass) the boolean block-diagonal mask and the xformers bias, so the blocks of
    one forward share them.
    """

    def __init__(self, groups: Sequence[tuple[int, int]]) -> None:
        self.groups: tuple[tuple[int, int], ...] = tuple((int(b), int(n)) for b, n in groups)
        offsets = [0]
        for b, n in self.groups:
            offsets.append(offsets[-1] + b * n)
        self.offsets: tuple[int, ...] = tuple(offsets)
        self._cache: dict[Any, Any] = {}

    @classmethod
    def from_tensors(cls, xs: Sequence[Tensor]) -> PackedSequences:
        return cls([(x.shape[0], x.shape[1]) for x in xs])

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def seqlens(self) -> list[int]:
        """One entry per sequence (not per group): the format xformers' BlockDiagonalMask wants."""
        return [n for b, n in self.groups for _ in range(b)]

    def pack(self, xs: Sequence[Tensor]) -> Tensor:
        """list of (B_i, N_i, D) -> (1, T, D)."""
        if tuple((x.shape[0], x.shape[1]) for x in xs) != self.groups:
            raise ValueError("tensors do not match the packing layout")
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], dim=0).unsqueeze(0)

    def unpack(self, x: Tensor) -> list[Tensor]:
        """(1, T, D) -> list of (B_i, N_i, D) views."""
        if x.shape[0] != 1 or x.shape[1] != self.total_tokens:
            raise ValueError(f"expected (1, {self.total_tokens}, D), got {tuple(x.shape)}")
        flat = x[0]
        return [
            flat[self.offsets[i] : self.offsets[i + 1]].view(b, n, *flat.shape[1:])
            for i, (b, n) in enumerate(self.groups)
        ]

    def block_diagonal_mask(self, device: torch.device) -> Tensor:
        """(T, T) boolean mask, True where attention is allowed (same sequence)."""
        key = ("mask", str(device))
        if key not in self._cache:
            seq_id = torch.repeat_interleave(
                torch.arange(len(self.seqlens), device=device),
                torch.tensor(self.seqlens, device=device),
                output_size=self.total_tokens,  # known here: spares a device-to-host sync on CUDA
            )
            self._cache[key] = seq_id[:, None] == seq_id[None, :]
        return self._cache[key]

    def xformers_bias(self) -> Any:
        if "xformers" not in self._cache:
            from xformers.ops import fmha  # only reached when the xformers backend was selected

            self._cache["xformers"] = fmha.BlockDiagonalMask.from_seqlens(self.seqlens)
        return self._cache["xformers"]

    def row_index(self, keep: Sequence[Tensor | None]) -> tuple[Tensor, PackedSequences]:
        """Token-row indices of the kept samples of each group, and the layout of the gathered sub-stream.

        ``keep[i]`` holds sample indices of group i (``None`` keeps all). Used by the efficient stochastic depth.
        """
        rows, groups = [], []
        for i, ((b, n), idx) in enumerate(zip(self.groups, keep)):
            if idx is None:
                idx = torch.arange(b)
            idx = idx.to("cpu") if idx.device.type != "cpu" else idx
            r = self.offsets[i] + idx[:, None] * n + torch.arange(n)[None, :]
            rows.append(r.reshape(-1))
            groups.append((int(idx.numel()), n))
        return torch.cat(rows), PackedSequences(groups)

    def __repr__(self) -> str:
        return f"PackedSequences(groups={list(self.groups)})"
