"""Bounded generation cache for CCA (SPEC 2.4).

Per layer and batch row, one K/V buffer of ``R + Ncap + 1`` slots per KV head:

* slots ``[0, R)``, ``R = s + g``: raw K/V of the last ``R`` tokens (position ``p`` in slot
  ``p % R``); a query at ``t`` sees the raw keys ``P(t) * g <= p <= t`` (``s`` to ``s + g - 1`` of
  them), and the group that leaves the window next is still there to be pooled;
* slots ``[R, R + Ncap)``: the cores, one per finished group (``Hkv`` heads, SPEC 2.1);
* one spare slot that is never valid (masked writes land there, so updates need no branches).

Beside it: the last query (all ``H`` heads) of each group whose core is not pooled yet, in a small
ring, because pooling group ``n`` needs the query at ``(n + 1) * g - 1`` (SPEC 2.1).

When ``P`` grows (a group leaves the window), that group is pooled into its core and its raw
entries are overwritten as the ring advances. Every layer is compressed. ``Ncap`` grows with the
context (one core per ``g`` tokens): :meth:`CCALayer.reserve` sizes it before a run of decode steps,
so captured CUDA graphs never see a reallocation.
"""

from __future__ import annotations

import torch

from sparsek.kernels import gated_decode_attention
from sparsek.kernels.decode_reference import cca_chunk_attention_reference, cca_visible_cores

from .cache_sparsek import (
    BoundedCache,
    BoundedLayer,
    SparseKCache,
    _capturing,
    _gather_seq,
    new_token_positions,
    recent_gather_index,
    token_validity,
)


class CCALayer(BoundedLayer):
    """Raw window of ``s + g`` tokens, pending group queries and all cores (SPEC 2.4)."""

    def _state_names(self):
        return ("count", "kbuf", "vbuf", "raw_pos", "valid", "qring", "ncores")

    @property
    def raw_slots(self) -> int:
        return self.settings.cca_window + self.settings.group

    @property
    def core_capacity(self) -> int:
        return self.kbuf.shape[2] - self.raw_slots - 1

    def _init(self, query: torch.Tensor, key: torch.Tensor, cores: int) -> None:
        b, hkv, _, d = key.shape
        h = query.shape[1]
        r, g = self.raw_slots, self.settings.group
        dev = key.device
        self.kbuf = key.new_zeros(b, hkv, r + cores + 1, d)
        self.vbuf = key.new_zeros(b, hkv, r + cores + 1, d)
        self.raw_pos = torch.full((b, r), -1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(b, hkv, r + cores + 1, dtype=torch.bool, device=dev)
        self.qring = query.new_zeros(b, h, r // g + 2, d)
        self.ncores = torch.zeros(b, dtype=torch.long, device=dev)
        self.count = torch.zeros(b, dtype=torch.long, device=dev)
        self.is_initialized = True

    def _grow_cores(self, needed: int) -> bool:
        cap = self.core_capacity
        if needed <= cap:
            return False
        new_cap = max(needed, 2 * cap, 64)
        r = self.raw_slots
        pad = new_cap - cap

        def grow(t):
            return torch.cat([t[:, :, : r + cap], t.new_zeros(*t.shape[:2], pad + 1, *t.shape[3:])], dim=2)

        self.kbuf, self.vbuf, self.valid = grow(self.kbuf), grow(self.vbuf), grow(self.valid)
        return True

    def _cores_needed(self, last_pos: int) -> int:
        s, g = self.settings.cca_window, self.settings.group
        return max(0, (last_pos + 1 - s) // g)

    def reserve(self, steps: int) -> bool:
        if not self.is_initialized:
            return False
        longest = int(self.count.max())
        grown = self._grow_cores(self._cores_needed(longest + steps - 1))
        self.budget = steps
        return grown

    def stored_kv_entries(self) -> torch.Tensor:
        raw = (self.raw_pos >= 0).sum(-1)
        return (raw + self.ncores)[:, None].expand(-1, self.kbuf.shape[1])

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return 2 * self.kbuf.numel() * self.kbuf.element_size()

    def attend(self, module, query, key, value, attention_mask, scaling, scores=None):
        b, _, lq, _ = query.shape
        tok_valid = token_validity(attention_mask, b, lq, query.device)
        if not self.is_initialized:
            self._init(query, key, cores=max(64, self._cores_needed(key.shape[2] - 1)))
        decode = lq == 1 and (attention_mask is None or bool(tok_valid.all()))
        new_pos = new_token_positions(self.count, tok_valid)
        if decode:
            if self.budget <= 0 and not _capturing(query):
                self.reserve(64)
            self.budget -= 1
            self._update(query, key, value, tok_valid, new_pos)
            out = gated_decode_attention(query, self.kbuf, self.vbuf, None, self.valid, scaling)
        else:
            self._grow_cores(self._cores_needed(int(self.count.max()) + lq - 1))
            if self.empty:
                from .modeling_sparsek import sparse_attention_forward

                mask = attention_mask[:, -lq:] if attention_mask is not None else None
                out = sparse_attention_forward(module, query, key, value, mask, scaling)[0].transpose(1, 2)
                self._update(query, key, value, tok_valid, new_pos)
            else:
                rk, rv, rpos, rvalid = self._update(query, key, value, tok_valid, new_pos)
                r = self.raw_slots
                cap = self.core_capacity
                out = cca_chunk_attention_reference(
                    query, new_pos, self.kbuf[:, :, r : r + cap], self.vbuf[:, :, r : r + cap],
                    rk, rv, rpos, rvalid, self.settings.group, self.settings.cca_window, scaling,
                )
            self.budget = 0
        self.columns += lq
        self.empty = False
        return out.transpose(1, 2).contiguous(), None

    def _update(self, query, key, value, tok_valid, new_pos):
        """Fold ``C`` new tokens in: pool the groups that leave the window, advance the rings.

        Returns the "recent" raw keys (old ring followed by the new tokens) with positions and
        validity, which a multi-token chunk attends to.
        """
        s, g = self.settings.cca_window, self.settings.group
        r = self.raw_slots
        b, hkv, c, d = key.shape
        h = query.shape[1]
        gq = h // hkv
        nq = self.qring.shape[2]
        cap = self.core_capacity
        dev = key.device
        n_new = tok_valid.sum(-1)
        count, new_count = self.count, self.count + n_new
        scale = d**-0.5

        # recent = raw ring (positions count - R .. count - 1) followed by the new tokens
        slot, col, rpos = recent_gather_index(count, n_new, r, c)
        j = torch.arange(r + c, device=dev)
        from_ring = (j < r)[None, :]
        ring_ok = (torch.gather(self.raw_pos, 1, slot) == rpos) & from_ring
        new_ok = ((j - r)[None, :] < n_new[:, None]) & ~from_ring
        rvalid = (ring_ok | new_ok) & (rpos >= 0)
        fr = from_ring[:, None, :, None]
        rk = torch.where(fr, _gather_seq(self.kbuf, slot[:, None]), _gather_seq(key, col[:, None]))
        rv = torch.where(fr, _gather_seq(self.vbuf, slot[:, None]), _gather_seq(value, col[:, None]))

        # pool every group that leaves the window: n in [ncores, P(new_count - 1))
        p_new = torch.where(new_count > 0, cca_visible_cores(new_count - 1, g, s), torch.zeros_like(new_count))
        m = c // g + 2  # static bound on new groups per row
        n_idx = self.ncores[:, None] + torch.arange(m, device=dev)[None, :]  # [B, m]
        active = n_idx < p_new[:, None]
        kidx = (n_idx[:, :, None] * g + torch.arange(g, device=dev) - (count[:, None, None] - r)).clamp(0, r + c - 1)
        kidx = kidx.reshape(b, 1, m * g)
        gk = _gather_seq(rk, kidx).reshape(b, hkv, m, g, d)
        gv = _gather_seq(rv, kidx).reshape(b, hkv, m, g, d)
        q_pos = (n_idx + 1) * g - 1  # [B, m]
        old_q = _gather_seq(self.qring, torch.remainder(n_idx, nq)[:, None])  # [B, H, m, d]
        qcol = (q_pos - count[:, None] + (c - n_new[:, None])).clamp(0, c - 1)
        chunk_q = _gather_seq(query, qcol[:, None])
        gqry = torch.where((q_pos < count[:, None])[:, None, :, None], old_q, chunk_q)
        acc = torch.promote_types(key.dtype, torch.float32)
        logits = torch.einsum("bhgnd,bhnjd->bhgnj", gqry.to(acc).reshape(b, hkv, gq, m, d), gk.to(acc)) * scale
        weights = torch.softmax(logits, dim=-1).mean(dim=2)
        core_k = torch.einsum("bhnj,bhnjd->bhnd", weights, gk.to(acc)).to(key.dtype)
        core_v = torch.einsum("bhnj,bhnjd->bhnd", weights, gv.to(acc)).to(value.dtype)
        dest = torch.where(active, r + n_idx.clamp(max=cap - 1), torch.full_like(n_idx, r + cap))  # spare slot
        dest_h = dest[:, None, :].expand(b, hkv, m)
        self.kbuf.scatter_(2, dest_h[..., None].expand(b, hkv, m, d), core_k)
        self.vbuf.scatter_(2, dest_h[..., None].expand(b, hkv, m, d), core_v)

        # pending group queries: slot sl holds the newest group n = sl (mod nq) whose last query is seen
        n_last = torch.div(new_count, g, rounding_mode="floor") - 1  # [B]
        sl = torch.arange(nq, device=dev)
        n_sl = n_last[:, None] - torch.remainder(n_last[:, None] - sl[None, :], nq)  # [B, nq]
        qp_sl = (n_sl + 1) * g - 1
        from_chunk = (qp_sl >= count[:, None]) & (n_sl >= 0)
        ccol = (qp_sl - count[:, None] + (c - n_new[:, None])).clamp(0, c - 1)
        new_q = torch.where(from_chunk[:, None, :, None], _gather_seq(query, ccol[:, None]), self.qring)

        # the raw ring advances: slot sr holds position p of the last R with p % R == sr
        sr = torch.arange(r, device=dev)
        start = new_count - r
        p_slot = start[:, None] + torch.remainder(sr[None, :] - start[:, None], r)
        ridx = (p_slot - (count[:, None] - r)).clamp(0, r + c - 1)
        ring_valid = torch.gather(rvalid, 1, ridx) & (p_slot >= 0)
        new_rk = _gather_seq(rk, ridx[:, None])
        new_rv = _gather_seq(rv, ridx[:, None])

        # visibility for the next decode query at position new_count - 1
        last = new_count - 1
        raw_vis = ring_valid & (p_slot >= p_new[:, None] * g) & (p_slot <= last[:, None])
        core_vis = torch.arange(cap + 1, device=dev)[None, :] < p_new[:, None]

        self.kbuf[:, :, :r].copy_(new_rk)
        self.vbuf[:, :, :r].copy_(new_rv)
        self.raw_pos.copy_(torch.where(ring_valid, p_slot, torch.full_like(p_slot, -1)))
        self.valid.copy_(torch.cat([raw_vis, core_vis], dim=1)[:, None].expand_as(self.valid))
        self.qring.copy_(new_q)
        self.ncores.copy_(p_new)
        self.count.copy_(new_count)
        return rk, rv, rpos, rvalid


class CCACache(BoundedCache):
    """Bounded CCA cache: ``s + g`` raw K/V entries plus one core per finished group."""

    layer_class = CCALayer


def make_cache(model) -> BoundedCache:
    """The bounded cache that fits a converted model's sparse method."""
    from .configuration_sparsek import sparse_settings

    method = sparse_settings(model.config).method
    return CCACache(model) if method == "cca" else SparseKCache(model)

