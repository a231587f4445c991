"""Bounded generation cache for SparseK (SPEC 1.5), and the base shared with the CCA cache.

How it plugs into transformers: the caches are ``transformers.Cache`` subclasses, so
``model.generate(..., cache=SparseKCache(model))`` (``past_key_values=`` before transformers 5.25)
and our own loop both use them. The attention modules still call ``cache.update(k, v, layer)``;
that returns the new keys unchanged and stores nothing. The registered sparse attention function
then sees that the cache has a ``sparse_attend`` method and hands the whole layer over to it
(queries, keys, values, scores, padding mask): the cache layer updates its state and computes the
attention itself, because only it knows which keys are still held.

Per layer, batch row and KV head, a SparseK layer holds ``w + k`` K/V slots in one buffer:

* slots ``[0, w)``: a ring of the last ``w`` keys (position ``p`` in slot ``p % w``), gate 1;
* slots ``[w, w + k)``: the current top-k candidates, gate ``clip(u - tau, 0, 1)``;
* beside them, scores only (no K/V) of the other candidates whose ``p`` is still non-zero, which
  ``tau`` needs (``extra`` buffer, float32; it grows only if many candidates share the band).

A decode step is the same update as a chunk with one token: the key that leaves the window
becomes a candidate, the top-k is recomputed over "old top-k + leaving keys" (a key evicted from
the top-k can never return, SPEC 1.5), ``tau`` over all live scores, and scores with ``p = 0``
are dropped. Every step has static shapes and no host synchronisation, so the generation loop
can capture it in a CUDA graph; the decode attention is one split-K kernel over the ``w + k``
slots (``sparsek.kernels.gated_decode_attention``).

Chunks of more than one token against a non-empty cache (chunked prefill, a new chat turn) use
``sparsek_chunk_attention_reference``, which takes explicit key positions; the first chunk of an
empty cache goes through the ordinary prefill op (Triton on GPU), and its state is built directly
(``SparseKLayer._build_from_chunk``: one top-k over the candidates, no sort of all ``L`` keys).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sparsek.kernels import gated_decode_attention
from sparsek.kernels.decode_reference import (
    capped_simplex_threshold,
    sort_by_position,
    sparsek_chunk_attention_reference,
)
from sparsek.kernels.sparsek_reference import topk_mask

from .configuration_sparsek import SparseSettings, sparse_settings


def _gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t [B, Hkv, N, *rest]`` gathered along dim 2 with ``idx [B, Hkv or 1, M]``."""
    idx = idx.expand(t.shape[0], t.shape[1], idx.shape[-1])
    view = idx.reshape(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
    return torch.gather(t, 2, view)


def token_validity(attention_mask: torch.Tensor | None, batch: int, lq: int, device) -> torch.Tensor:
    """Which of the ``lq`` new tokens are real (left padding), ``[B, lq]`` bool."""
    if attention_mask is None:
        return torch.ones(batch, lq, dtype=torch.bool, device=device)
    return attention_mask[:, -lq:].to(device=device, dtype=torch.bool)


def new_token_positions(count: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Position of each new token (``-1`` for padding): ``count + cumsum(valid) - 1``."""
    pos = count[:, None] + valid.long().cumsum(-1) - 1
    return torch.where(valid, pos, torch.full_like(pos, -1))


def recent_gather_index(count: torch.Tensor, n_new: torch.Tensor, ring: int, chunk: int):
    """Index maps for the "recent" array: the ring (``ring`` slots) followed by the new tokens.

    Entry ``j`` of the recent array holds position ``count - ring + j``. Returns, per entry, the
    ring slot to read (``j < ring``) and the chunk column to read (``j >= ring``; the chunk's valid
    tokens are its last ``n_new`` columns), plus the entry's position.
    """
    device = count.device
    j = torch.arange(ring + chunk, device=device)
    pos = count[:, None] - ring + j  # [B, R + C]
    slot = torch.remainder(pos, ring)
    col = (j - ring) + (chunk - n_new[:, None])
    return slot, col.clamp(0, max(chunk - 1, 0)), pos


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class BoundedLayer(CacheLayerMixin):
    """One layer of a bounded cache. ``update`` stores nothing: ``attend`` does the work."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, settings: SparseSettings, layer_idx: int):
        super().__init__()
        self.settings = settings
        self.layer_idx = layer_idx
        self.columns = 0  # input columns seen (padding included): what generate() slices by
        self.empty = True
        self.count: torch.Tensor | None = None  # [B] real tokens seen per row
        self.budget = 0  # decode steps that fit without growing a buffer (checked, one sync)

    # --- transformers' layer interface ------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.columns = 0
        self.empty = True
        self.is_initialized = False
        for name in self._state_names():
            setattr(self, name, None)

    def _state_names(self) -> tuple[str, ...]:
        return ("count",)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in self._state_names():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in self._state_names():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))

    # --- the sparse path ----------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, scaling, scores):
        raise NotImplementedError

    def reserve(self, steps: int) -> bool:
        """Make room for ``steps`` more decode steps; True if buffers were reallocated."""
        return False

    def stored_kv_entries(self) -> torch.Tensor:
        """K/V entries held per (row, KV head), ``[B, Hkv]``."""
        raise NotImplementedError

    def kv_bytes(self) -> int:
        raise NotImplementedError


class BoundedCache(Cache):
    """A ``transformers.Cache`` whose layers keep bounded sparse-attention state."""

    layer_class: type[BoundedLayer] = BoundedLayer

    def __init__(self, model_or_config, num_layers: int | None = None):
        config = getattr(model_or_config, "config", model_or_config)
        self.settings = sparse_settings(config)
        n = num_layers if num_layers is not None else config.num_hidden_layers
        super().__init__(layers=[self.layer_class(self.settings, i) for i in range(n)])

    # the hook the attention function looks for (see modeling_sparsek.sparse_attention_forward)
    def sparse_attend(self, module, query, key, value, attention_mask, scaling, sparsek_scores=None):
        # inference mode, always: buffers made under our loop's inference_mode can then still be
        # updated when the same cache is driven by generate() (which uses no_grad)
        with torch.inference_mode():
            return self.layers[module.layer_idx].attend(module, query, key, value, attention_mask, scaling, sparsek_scores)

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].columns if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.get_seq_length(layer_idx) + q, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a bounded sparse cache cannot be cropped (dropped keys are gone)")

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    # --- used by the generation loop ------------------------------------------------------------
    def reserve(self, steps: int) -> bool:
        """Grow buffers so that ``steps`` decode steps need no reallocation (one host sync)."""
        grown = False
        for layer in self.layers:
            grown |= layer.reserve(steps)
        return grown

    def advance_columns(self, n: int) -> None:
        """Account for ``n`` columns processed by a replayed CUDA graph (Python did not run)."""
        for layer in self.layers:
            layer.columns += n

    def stored_kv_entries(self) -> torch.Tensor:
        """K/V entries held, ``[layers, B, Hkv]`` (what the memory bound is about)."""
        return torch.stack([layer.stored_kv_entries() for layer in self.layers])

    def kv_bytes(self) -> int:
        """Bytes of the K/V buffers allocated (the bounded part of the memory)."""
        return sum(layer.kv_bytes() for layer in self.layers)


class SparseKLayer(BoundedLayer):
    """Window ring + top-k K/V with scores + live candidate scores (SPEC 1.5)."""

    def _state_names(self):
        return ("count", "kbuf", "vbuf", "score", "pos", "valid", "gates", "extra", "extra_valid")

    def _init(self, key: torch.Tensor) -> None:
        b, hkv, _, d = key.shape
        w, k = self.settings.window, self.settings.topk
        dev = key.device
        self.kbuf = key.new_zeros(b, hkv, w + k, d)
        self.vbuf = key.new_zeros(b, hkv, w + k, d)
        self.score = torch.zeros(b, hkv, w + k, dtype=torch.float32, device=dev)
        self.pos = torch.full((b, hkv, w + k), -1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(b, hkv, w + k, dtype=torch.bool, device=dev)
        self.gates = torch.zeros(b, hkv, w + k, dtype=torch.float32, device=dev)
        cap = max(64, k // 4)
        self.extra = torch.zeros(b, hkv, cap, dtype=torch.float32, device=dev)
        self.extra_valid = torch.zeros(b, hkv, cap, dtype=torch.bool, device=dev)
        self.count = torch.zeros(b, dtype=torch.long, device=dev)
        self.is_initialized = True

    def _grow_extra(self, needed: int) -> bool:
        cap = self.extra.shape[-1]
        if needed <= cap:
            return False
        new_cap = max(needed, 2 * cap)
        pad = new_cap - cap
        self.extra = torch.nn.functional.pad(self.extra, (0, pad))
        self.extra_valid = torch.nn.functional.pad(self.extra_valid, (0, pad))
        return True

    def reserve(self, steps: int) -> bool:
        if not self.is_initialized:
            return False
        # each step adds at most one live score per (row, head)
        live = int(self.extra_valid.sum(-1).max())
        grown = self._grow_extra(live + steps)
        self.budget = self.extra.shape[-1] - live
        return grown

    def stored_kv_entries(self) -> torch.Tensor:
        return self.valid.sum(-1)

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return 2 * self.kbuf.numel() * self.kbuf.element_size()

    def attend(self, module, query, key, value, attention_mask, scaling, scores):
        if scores is None:
            raise RuntimeError("SparseK attention needs the scorer's scores")
        b, _, lq, _ = query.shape
        if not self.is_initialized:
            self._init(key)
        tok_valid = token_validity(attention_mask, b, lq, query.device)
        decode = lq == 1 and (attention_mask is None or bool(tok_valid.all()))
        new_pos = new_token_positions(self.count, tok_valid)
        if decode:
            if self.budget <= 0 and not _capturing(query):
                self.reserve(64)
            self.budget -= 1
            self._decode_update(key, value, scores.float())
            out = gated_decode_attention(query, self.kbuf, self.vbuf, self.gates, self.valid, scaling)
        else:
            if self.empty:
                from .modeling_sparsek import sparse_attention_forward

                mask = attention_mask[:, -lq:] if attention_mask is not None else None
                out = sparse_attention_forward(module, query, key, value, mask, scaling, sparsek_scores=scores)[0]
                out = out.transpose(1, 2)
            else:
                out = self._chunk_attention(query, key, value, scores.float(), tok_valid, new_pos, scaling)
            if self.empty:
                self._build_from_chunk(key, value, scores.float(), tok_valid)
            else:
                self._update(key, value, scores.float(), tok_valid, new_pos, grow=True)
            self.budget = 0
        self.columns += lq
        self.empty = False
        return out.transpose(1, 2).contiguous(), None

    def _chunk_attention(self, query, key, value, scores, tok_valid, new_pos, scaling):
        b, hkv = key.shape[:2]
        lq = key.shape[2]
        e = self.extra.shape[-1]
        zeros = key.new_zeros(b, hkv, e, key.shape[-1])
        keys = torch.cat([self.kbuf, zeros, key], dim=2)
        values = torch.cat([self.vbuf, zeros, value], dim=2)
        z = torch.cat([self.score, self.extra, scores], dim=2)
        kpos = torch.cat(
            [self.pos, torch.full((b, hkv, e), -1, dtype=torch.long, device=key.device), new_pos[:, None].expand(b, hkv, lq)],
            dim=2,
        )
        kval = torch.cat([self.valid, self.extra_valid, tok_valid[:, None].expand(b, hkv, lq)], dim=2)
        return sparsek_chunk_attention_reference(
            query, new_pos, keys, values, z, kpos, kval, self.settings.topk, self.settings.window, scaling
        )

    def _decode_update(self, key, value, scores) -> None:
        """One new token per row (all rows real): the same result as ``_update`` with ``C = 1``,
        in about half the kernels. The key leaving the window (slot ``t % w``) takes a free top-k
        slot, or evicts the smallest ``(score, position)`` if it beats it (ties go to the newer key),
        or becomes score-only; then ``tau``, pruning and gates. Static shapes, no host sync."""
        w, k = self.settings.window, self.settings.topk
        b, hkv, _, d = key.shape
        t = self.count
        ridx = torch.remainder(t, w)[:, None, None].expand(b, hkv, 1)
        ridx_d = ridx[..., None].expand(b, hkv, 1, d)
        lk, lv = self.kbuf.gather(2, ridx_d), self.vbuf.gather(2, ridx_d)
        lu, lp = self.score.gather(2, ridx), self.pos.gather(2, ridx)
        leaving = self.valid.gather(2, ridx) & (t >= w)[:, None, None]

        top_s, top_v, top_p = self.score[:, :, w:], self.valid[:, :, w:], self.pos[:, :, w:]
        m = torch.where(top_v, top_s, torch.full_like(top_s, float("inf"))).amin(-1, keepdim=True)
        at_min = top_v & (top_s == m)
        big = torch.full_like(top_p, torch.iinfo(torch.long).max)
        min_idx = torch.where(at_min, top_p, big).argmin(-1, keepdim=True)
        free = ~top_v
        has_free = free.any(-1, keepdim=True)
        free_idx = free.to(torch.uint8).argmax(-1, keepdim=True)
        insert = leaving & (has_free | (lu >= m))
        evict = insert & ~has_free
        target = torch.where(has_free, free_idx, min_idx) + w
        target_d = target[..., None].expand(b, hkv, 1, d)
        to_extra = leaving & (evict | ~insert)
        extra_val = torch.where(evict, m, lu)

        def put(buf, idx, new, cond):
            buf.scatter_(2, idx, torch.where(cond, new, buf.gather(2, idx)))

        put(self.kbuf, target_d, lk, insert[..., None])
        put(self.vbuf, target_d, lv, insert[..., None])
        put(self.score, target, lu, insert)
        put(self.pos, target, lp, insert)
        put(self.valid, target, insert, insert)
        e_idx = (~self.extra_valid).to(torch.uint8).argmax(-1, keepdim=True)  # reserve() keeps one free
        put(self.extra, e_idx, extra_val, to_extra)
        put(self.extra_valid, e_idx, to_extra, to_extra)

        # the new token enters the ring where the leaving key was
        self.kbuf.scatter_(2, ridx_d, key)
        self.vbuf.scatter_(2, ridx_d, value)
        self.score.scatter_(2, ridx, scores)
        self.pos.scatter_(2, ridx, t[:, None, None].expand(b, hkv, 1))
        self.valid.scatter_(2, ridx, torch.ones_like(leaving))

        top_s, top_v = self.score[:, :, w:], self.valid[:, :, w:]
        tau = capped_simplex_threshold(torch.cat([top_s, self.extra], -1), torch.cat([top_v, self.extra_valid], -1), k)
        self.extra_valid &= self.extra.to(torch.float64) > tau[..., None]
        gates = (top_s.to(torch.float64) - tau[..., None]).clamp(0, 1).to(torch.float32)
        self.gates[:, :, w:] = torch.where(top_v, gates, torch.zeros_like(gates))
        self.gates[:, :, :w] = self.valid[:, :, :w].to(torch.float32)
        self.count += 1

    def _build_from_chunk(self, key, value, scores, tok_valid) -> None:
        """State of an *empty* cache after one left-padded chunk: the same state as ``_update``
        (valid entries bit-identical, ``tests/test_caches.py`` checks it), in far fewer kernels.

        Why a separate path: ``_update`` merges the chunk with an existing state, so it sorts and
        gathers all ``L`` keys (K/V included) by position, runs two argsorts over ``L`` and a top-k
        mask with a cumsum. With nothing cached, row ``b``'s real tokens are the last ``n_b``
        columns in position order already, so: the ring is a gather of the last ``w`` columns; the
        top-k is one ``torch.topk`` over the candidates (columns older than the window) on an int64
        key ``(order-preserving score bits, column)``, which breaks ties toward the newer key as
        SPEC 1.2 demands; ``tau`` is the same exact threshold over the candidates; the score-only
        entries are compacted with a cumsum. Only the ``w + k`` kept K/V rows are gathered.
        """
        w, k = self.settings.window, self.settings.topk
        b, hkv, c, d = key.shape
        dev = key.device
        n = tok_valid.sum(-1)  # [B]; real tokens are the last n columns (left padding)
        first = c - n  # column of position 0

        # ring: slot s holds position p = start + ((s - start) mod w), start = n - w
        s = torch.arange(w, device=dev)
        start = n - w
        p_slot = start[:, None] + torch.remainder(s[None, :] - start[:, None], w)  # [B, w]
        ring_ok = (p_slot >= 0)[:, None, :].expand(b, hkv, w)
        rcol = (p_slot + first[:, None]).clamp(0, c - 1)[:, None, :]
        zero = torch.zeros((), dtype=key.dtype, device=dev)
        self.kbuf[:, :, :w].copy_(torch.where(ring_ok[..., None], _gather_seq(key, rcol), zero))
        self.vbuf[:, :, :w].copy_(torch.where(ring_ok[..., None], _gather_seq(value, rcol), zero))
        self.score[:, :, :w].copy_(torch.where(ring_ok, _gather_seq(scores, rcol), 0.0))
        self.pos[:, :, :w].copy_(p_slot[:, None, :].expand(b, hkv, w))
        self.valid[:, :, :w].copy_(ring_ok)
        self.gates[:, :, :w].copy_(ring_ok.to(torch.float32))

        # candidates: columns [first, c - w), i.e. positions 0 .. n - w - 1
        lc = c - w
        self.kbuf[:, :, w:].zero_()
        self.vbuf[:, :, w:].zero_()
        self.score[:, :, w:].zero_()
        self.pos[:, :, w:].fill_(-1)
        self.valid[:, :, w:].zero_()
        self.gates[:, :, w:].zero_()
        self.extra_valid.zero_()
        if lc > 0:
            col = torch.arange(lc, device=dev)
            cand = (col[None, :] >= first[:, None])[:, None, :].expand(b, hkv, lc)
            z = scores[:, :, :lc]
            # order-preserving int32 image of the float32 scores (+0.0 folds -0.0 into +0.0, as
            # the float comparison does), then the column in the low 32 bits: ties -> newer key
            bits = (z + 0.0).contiguous().view(torch.int32)
            ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            key64 = (ordered.to(torch.int64) << 32) | col
            lowest = torch.iinfo(torch.int64).min
            key64 = torch.where(cand, key64, torch.full_like(key64, lowest))
            kk = min(k, lc)
            top_key, top_col = torch.topk(key64, kk, dim=-1, sorted=False)
            top_ok = top_key != lowest
            big = torch.iinfo(torch.int64).max
            sel_col = torch.sort(torch.where(top_ok, top_col, torch.full_like(top_col, big)), dim=-1).values
            sel_ok = sel_col != big
            sel_col = torch.where(sel_ok, sel_col, torch.zeros_like(sel_col))
            sel_u = torch.where(sel_ok, torch.gather(z, -1, sel_col), 0.0)

            tau = capped_simplex_threshold(z, cand, k)  # float64 [B, Hkv]
            gates = (sel_u.to(torch.float64) - tau[..., None]).clamp(0, 1).to(torch.float32)
            self.kbuf[:, :, w : w + kk].copy_(torch.where(sel_ok[..., None], _gather_seq(key, sel_col), zero))
            self.vbuf[:, :, w : w + kk].copy_(torch.where(sel_ok[..., None], _gather_seq(value, sel_col), zero))
            self.score[:, :, w : w + kk].copy_(sel_u)
            self.pos[:, :, w : w + kk].copy_(torch.where(sel_ok, sel_col - first[:, None, None], -1))
            self.valid[:, :, w : w + kk].copy_(sel_ok)
            self.gates[:, :, w : w + kk].copy_(torch.where(sel_ok, gates, torch.zeros_like(gates)))

            # score-only candidates whose p is still non-zero, compacted in position order
            chosen = torch.zeros_like(cand).scatter_(-1, top_col, top_ok)
            keep = cand & ~chosen & (z.to(torch.float64) > tau[..., None])
            self._grow_extra(int(keep.sum(-1).max()) + 1)
            cap = self.extra.shape[-1]
            slot = torch.where(keep, keep.to(torch.int32).cumsum(-1) - 1, cap).to(torch.int64)
            extra = torch.zeros(b, hkv, cap + 1, dtype=torch.float32, device=dev).scatter_(-1, slot, z)
            extra_valid = torch.zeros(b, hkv, cap + 1, dtype=torch.bool, device=dev).scatter_(-1, slot, keep)
            self.extra.copy_(extra[..., :cap])
            self.extra_valid.copy_(extra_valid[..., :cap])
        else:
            self._grow_extra(1)
        self.count.copy_(n)

    def _update(self, key, value, scores, tok_valid, new_pos, grow: bool) -> None:
        """Fold ``C`` new tokens into the state; static shapes for a fixed ``C`` (no host sync
        unless ``grow``)."""
        w, k = self.settings.window, self.settings.topk
        b, hkv, c, d = key.shape
        n_new = tok_valid.sum(-1)
        count, new_count = self.count, self.count + n_new

        # 1. recent = ring (positions count - w .. count - 1) followed by the new tokens
        slot, col, rpos = recent_gather_index(count, n_new, w, c)
        lr = w + c
        j = torch.arange(lr, device=key.device)
        from_ring = (j < w)[None, None, :]
        ring_slot = slot[:, None, :]
        col_i = col[:, None, :]
        rk = torch.where(from_ring[..., None], _gather_seq(self.kbuf, ring_slot), _gather_seq(key, col_i))
        rv = torch.where(from_ring[..., None], _gather_seq(self.vbuf, ring_slot), _gather_seq(value, col_i))
        ru = torch.where(from_ring, _gather_seq(self.score, ring_slot), _gather_seq(scores, col_i))
        ring_ok = _gather_seq(self.valid, ring_slot) & (_gather_seq(self.pos, ring_slot) == rpos[:, None])
        new_ok = ((j - w)[None, :] < n_new[:, None])[:, None, :]
        rvalid = torch.where(from_ring, ring_ok, new_ok) & (rpos >= 0)[:, None, :]
        rpos_h = rpos[:, None, :].expand(b, hkv, lr)

        # 2. the new ring: position p of the last w sits in slot p % w
        s = torch.arange(w, device=key.device)
        start = new_count - w  # [B]
        p_slot = start[:, None] + torch.remainder(s[None, :] - start[:, None], w)  # [B, w]
        ridx = (p_slot - (count[:, None] - w))[:, None, :]
        ring_k, ring_v = _gather_seq(rk, ridx), _gather_seq(rv, ridx)
        ring_u, ring_valid = _gather_seq(ru, ridx), _gather_seq(rvalid, ridx) & (p_slot >= 0)[:, None, :]
        ring_pos = p_slot[:, None, :].expand(b, hkv, w)

        # 3. keys that left the window: recent entries 0 .. n_new - 1
        lk = min(c, lr)
        leave_ok = rvalid[:, :, :lk] & (j[:lk][None, :] < n_new[:, None])[:, None, :]

        # 4. top-k over old top-k + leaving keys (a key evicted once never returns)
        ck = torch.cat([self.kbuf[:, :, w:], rk[:, :, :lk]], dim=2)
        cv = torch.cat([self.vbuf[:, :, w:], rv[:, :, :lk]], dim=2)
        cu = torch.cat([self.score[:, :, w:], ru[:, :, :lk]], dim=2)
        cp = torch.cat([self.pos[:, :, w:], rpos_h[:, :, :lk]], dim=2)
        cval = torch.cat([self.valid[:, :, w:], leave_ok], dim=2)
        cp, cval, ck, cv, cu = sort_by_position(cp, cval, ck, cv, cu)
        chosen = topk_mask(cu, cval, k)
        order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)[..., :k]
        top_k, top_v = _gather_seq(ck, order), _gather_seq(cv, order)
        top_u, top_p, top_valid = (torch.gather(t, -1, order) for t in (cu, cp, chosen))

        # 5. tau over every live candidate score; drop scores whose p reached 0
        all_u = torch.cat([cu, self.extra], dim=-1)
        all_ok = torch.cat([cval, self.extra_valid], dim=-1)
        tau = capped_simplex_threshold(all_u, all_ok, k)  # float64 [B, Hkv]
        rest_ok = torch.cat([cval & ~chosen, self.extra_valid], dim=-1)
        keep = rest_ok & (all_u.to(torch.float64) > tau[..., None])
        if grow:
            self._grow_extra(int(keep.sum(-1).max()) + 1)
        cap = self.extra.shape[-1]
        korder = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :cap]
        new_extra = torch.gather(all_u, -1, korder)
        new_extra_valid = torch.gather(keep, -1, korder)
        top_gates = torch.where(
            top_valid, (top_u.to(torch.float64) - tau[..., None]).clamp(0, 1).to(torch.float32), torch.zeros_like(top_u)
        )

        # 6. write back in place (the buffers are what a captured CUDA graph reads)
        self.kbuf[:, :, :w].copy_(ring_k)
        self.kbuf[:, :, w:].copy_(top_k)
        self.vbuf[:, :, :w].copy_(ring_v)
        self.vbuf[:, :, w:].copy_(top_v)
        self.score[:, :, :w].copy_(ring_u)
        self.score[:, :, w:].copy_(top_u)
        self.pos[:, :, :w].copy_(ring_pos)
        self.pos[:, :, w:].copy_(top_p)
        self.valid[:, :, :w].copy_(ring_valid)
        self.valid[:, :, w:].copy_(top_valid)
        self.gates[:, :, :w].copy_(ring_valid.to(torch.float32))
        self.gates[:, :, w:].copy_(top_gates)
        self.extra.copy_(new_extra)
        self.extra_valid.copy_(new_extra_valid)
        self.count.copy_(new_count)


class SparseKCache(BoundedCache):
    """Bounded SparseK cache: ``w + k`` K/V entries per KV head and layer at any length."""

    layer_class = SparseKLayer
