"""A preallocated KV cache with one row per running request (ragged lengths).

Row r holds its request's keys/values at cache indices [start[r], length[r]):
prefill left-pads a group of new prompts to a common length T, so a short prompt
starts at T - len. Decode writes each row's new key at its own `length[r]`, so rows
of different lengths step together without re-padding. Finished rows are
compacted (the last row moves into the hole), keeping the running rows at
0..n-1 so every decode step reads plain slices, never gathered copies.

The model never sees where it writes: `update()` (the transformers `Cache` hook that
every attention layer calls) consults the mode set by `for_prefill` / `for_decode`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

__all__ = ["SlotCache"]

_GROW = 256  # capacity grows in steps of this many positions (one copy per 256 tokens, not per token)


class SlotCache(Cache):
    def __init__(self, max_rows: int, device: torch.device, dtype: torch.dtype):
        super().__init__(layers=[])
        self.max_rows = max_rows
        self.device = device
        self.dtype = dtype
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (max_rows, kv_heads, capacity, head_dim)
        self.values: dict[int, torch.Tensor] = {}
        self.capacity = 0
        self._mode: tuple = ("none",)

    # ---- modes (set before each forward) ------------------------------------------------------

    def for_prefill(self, rows: slice, width: int) -> None:
        """Next forward writes `width` positions at indices [0, width) of `rows`."""
        self.reserve(width)
        self._mode = ("prefill", rows, width)

    def for_decode(self, n_rows: int, write_at: torch.Tensor, kv_len: int) -> None:
        """Next forward writes one position per row r < n_rows at `write_at[r]`; attends to [0, kv_len)."""
        self.reserve(kv_len)
        self._mode = ("decode", n_rows, write_at, kv_len)

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        new_cap = -(-length // _GROW) * _GROW
        for store in (self.keys, self.values):
            for layer, old in store.items():
                grown = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
                grown[:, :, : self.capacity] = old
                store[layer] = grown
        self.capacity = new_cap

    def clear(self) -> None:
        self.keys, self.values, self.capacity = {}, {}, 0

    # ---- transformers Cache hooks ---------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:  # lazily: layers may differ in kv heads / head dim
            shape = (self.max_rows, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys[layer_idx] = torch.zeros(shape, device=self.device, dtype=key_states.dtype)
            vshape = (self.max_rows, value_states.shape[1], self.capacity, value_states.shape[3])
            self.values[layer_idx] = torch.zeros(vshape, device=self.device, dtype=value_states.dtype)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._mode[0] == "prefill":
            _, rows, width = self._mode
            k[rows, :, :width] = key_states
            v[rows, :, :width] = value_states
            return k[rows, :, :width], v[rows, :, :width]
        if self._mode[0] == "decode":
            _, n, write_at, kv_len = self._mode
            row_ids = torch.arange(n, device=self.device)
            k[row_ids, :, write_at] = key_states[:, :, 0]  # (n, kv_heads, head_dim) scattered per row
            v[row_ids, :, write_at] = value_states[:, :, 0]
            return k[:n, :, :kv_len], v[:n, :, :kv_len]
        raise RuntimeError("SlotCache used outside Engine (call for_prefill/for_decode first)")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the engine always passes position_ids, so transformers never needs this

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    # ---- row bookkeeping ------------------------------------------------------------------------

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions to row `dst` (compaction after a row finishes)."""
        for store in (self.keys, self.values):
            for t in store.values():
                t[dst, :, :length] = t[src, :, :length]
