"""What one adaptation step computes: the losses, as one module that FSDP2 can wrap as its root.

Everything a step needs runs inside ``AdaptObjective.forward``:

1. when needed, a dense pass of the *starting weights* (``--objective distill|mix`` for the
   teacher's hidden states, ``--scorer-loss`` for each layer's dense q/k), without gradient: no
   second copy of the model. When ``--train`` names weights the dense pass uses (attention, all),
   their starting values are kept (``freeze_teacher``) and swapped in for that pass only; a
   teacher that moved with the student would let both drift together (the KL of a model to
   itself is minimised by any weights that make sparse and dense agree, e.g. a uniform output:
   CCA adapted that way collapsed to loss 10.9 in 600 steps on the H100);
2. the sparse (student) pass, with gradient;
3. next-token cross-entropy and/or KL(dense || sparse), in token chunks through the LM head, each
   chunk recomputed in the backward pass, so the ``[tokens, vocab]`` logits never exist whole.

Keeping all of it inside one ``forward`` is what makes FSDP2 work without special cases: the root
parameters (embeddings, final norm, LM head) are unsharded for the duration of the call, and
every layer's parameters are unsharded while that layer runs, in both passes.

The scorer loss (SPEC 1.6) is computed per layer during the dense pass, where the dense q/k
exist; its gradient w.r.t. ``W_score``/``b_score`` is taken right there (a tiny graph: the
scorer's input is detached) and handed to the sparse pass, which attaches it to the scorer's
output (``_InjectGrad``). The gradient thus reaches the parameters inside the layer's own
backward, where FSDP2 reduces it together with everything else.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsek.kernels.sparsek_recall import sparsek_selection_recall
from sparsek.kernels.sparsek_scorer_loss import sparsek_scorer_loss
from sparsek.runtime.capture import capture_dense_layers
from sparsek.runtime.dense_switch import dense_attention

_LOGIT_ELEMENTS = 1 << 25  # tokens x vocab per chunk of the LM head


class _InjectGrad(torch.autograd.Function):
    """Identity on ``u``; in backward adds precomputed gradients to the scorer's parameters."""

    @staticmethod
    def forward(ctx, u, weight, bias, grad_weight, grad_bias):
        ctx.grads = (grad_weight, grad_bias)
        return u.clone()

    @staticmethod
    def backward(ctx, grad_u):
        gw, gb = ctx.grads
        return grad_u, gw, gb, None, None


def _fp32_scorer(scorer: nn.Module) -> None:
    """Scores stay float32 under bf16 autocast (SPEC 1.1: positions reach 10^6)."""
    original = scorer.forward

    def forward(hidden_states, positions):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return original(hidden_states, positions)

    scorer.forward = forward


def _chunk_losses(hs, ht, labels, weight, bias, temperature: float):
    """Sums over the chunk: cross-entropy of the student, KL(teacher || student)."""
    logits = F.linear(hs, weight, bias).float()
    ce = F.cross_entropy(logits, labels, reduction="sum")
    if ht is None:
        return torch.stack([ce, torch.zeros_like(ce)])
    with torch.no_grad():
        t_logp = torch.log_softmax(F.linear(ht, weight, bias).float() / temperature, dim=-1)
    s_logp = torch.log_softmax(logits / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum() * temperature**2
    return torch.stack([ce, kl])


def token_losses(lm_head: nn.Linear, h_student, h_teacher, input_ids, attention_mask, temperature: float = 1.0):
    """``[ce_sum, kl_sum]`` over every position with a next-token target (padding excluded)."""
    valid = attention_mask[:, 1:].bool()
    hs = h_student[:, :-1][valid]
    ht = None if h_teacher is None else h_teacher[:, :-1][valid]
    labels = input_ids[:, 1:][valid]
    vocab = lm_head.weight.shape[0]
    chunk = max(1, _LOGIT_ELEMENTS // vocab)
    total = hs.new_zeros(2, dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and hs.requires_grad
    for c0 in range(0, hs.shape[0], chunk):
        args = (hs[c0 : c0 + chunk], None if ht is None else ht[c0 : c0 + chunk], labels[c0 : c0 + chunk],
                lm_head.weight, lm_head.bias, temperature)
        total = total + (checkpoint(_chunk_losses, *args, use_reentrant=False) if needs_grad else _chunk_losses(*args))
    return total


class AdaptObjective(nn.Module):
    """Wraps the converted model; ``forward`` returns the step's loss and its parts."""

    def __init__(self, model, objective: str, mix_weight: float, temperature: float, autocast: bool):
        super().__init__()
        self.model = model
        self.objective, self.mix_weight, self.temperature = objective, mix_weight, temperature
        self.autocast = autocast
        self.settings = model.sparse_settings
        self._scorer_grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._teacher: list[tuple[nn.Parameter, torch.Tensor]] = []
        if self.settings.method == "sparsek":
            for layer in model.model.layers:
                scorer = layer.self_attn.scorer
                _fp32_scorer(scorer)
                scorer.register_forward_hook(self._make_inject_hook(layer.self_attn.layer_idx))

    def _make_inject_hook(self, layer_idx: int):
        def hook(module, args, output):
            grads = self._scorer_grads.get(layer_idx)
            if grads is None or not torch.is_grad_enabled():
                return output
            gw, gb = grads
            return _InjectGrad.apply(output, module.weight, module.bias, gw.to(module.weight.dtype), gb.to(module.bias.dtype))

        return hook

    def freeze_teacher(self) -> int:
        """Keep the current values of the trainable weights that the dense pass uses as the teacher's.

        Call once after sharding (the copies are sharded like the parameters) and before a
        checkpoint is loaded (so a resumed run keeps the same teacher). The scorer is excluded: the
        dense pass does not use it. Costs one copy of those weights. Returns the element count."""
        self._teacher = [(p, p.detach().clone()) for n, p in self.named_parameters()
                         if p.requires_grad and ".scorer." not in n]
        return sum(s.numel() for _, s in self._teacher)

    @contextlib.contextmanager
    def _teacher_weights(self):
        """Swap the teacher's weights in (in place, so FSDP2 gathers them), and back on exit."""

        def swap():
            with torch.no_grad():
                for p, saved in self._teacher:
                    tmp = p.detach().clone()
                    p.detach().copy_(saved)
                    saved.copy_(tmp)

        if not self._teacher:
            yield
            return
        swap()
        try:
            yield
        finally:
            swap()

    def _amp(self, device: torch.device):
        if self.autocast:  # adapt turns it on for CUDA (or --autocast bf16); CPU autocast works too
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _hidden(self, input_ids, attention_mask):
        mask = None if bool(attention_mask.all()) else attention_mask
        return self.model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state

    def forward(self, input_ids, attention_mask, loss_scale: float = 1.0, scorer_scale: float = 0.0,
                query_index: torch.Tensor | None = None, mode: str = "train"):
        """``mode="train"``: ``(loss, stats)`` with ``loss`` ready for ``backward`` (sums times
        ``loss_scale``) and ``stats = [ce_sum, kl_sum, scorer_loss_sum, scorer_layers]`` detached.
        ``mode="eval"``: ``stats = [sparse_ce_sum, dense_ce_sum, recall_sum, recall_count]``."""
        self._scorer_grads.clear()
        if mode == "eval":
            return self._evaluate(input_ids, attention_mask)
        lengths = attention_mask.sum(-1)
        sparsek = self.settings.method == "sparsek"
        want_teacher = self.objective in ("distill", "mix")
        want_scorer = sparsek and scorer_scale > 0 and query_index is not None and query_index.numel() > 0
        scorer_stats = torch.zeros(2, device=input_ids.device)
        h_teacher = None
        # Teacher and student run in separate autocast regions: autocast caches the bf16 copies of
        # float32 weights for the whole region, so one region would hand the student the
        # teacher's (swapped-in) weights.
        if want_teacher or want_scorer:

            def on_layer(module, hidden, positions, q, k):
                with torch.enable_grad():
                    w, b = module.scorer.weight, module.scorer.bias
                    u = module.scorer(hidden.detach(), positions)
                    loss, n = sparsek_scorer_loss(q, k, u, self.settings.topk, self.settings.window,
                                                  getattr(module, "scaling", None), lengths, query_index)
                    if n == 0:
                        return
                    gw, gb = torch.autograd.grad(loss * scorer_scale, [w, b])
                self._scorer_grads[module.layer_idx] = (gw.detach(), gb.detach())
                scorer_stats.add_(torch.stack([loss.detach(), torch.ones_like(loss)]))

            ctx = capture_dense_layers(self.model, on_layer) if want_scorer else dense_attention(self.model)
            with self._amp(input_ids.device), torch.no_grad(), ctx, self._teacher_weights():
                h = self._hidden(input_ids, attention_mask)
            h_teacher = h.detach() if want_teacher else None
        with self._amp(input_ids.device):
            h_student = self._hidden(input_ids, attention_mask)
            sums = token_losses(self.model.lm_head, h_student, h_teacher, input_ids, attention_mask, self.temperature)
        if self.objective == "lm":
            loss = sums[0]
        elif self.objective == "distill":
            loss = sums[1]
        else:
            loss = (1 - self.mix_weight) * sums[0] + self.mix_weight * sums[1]
        return loss * loss_scale, torch.cat([sums.detach(), scorer_stats])

    @torch.no_grad()
    def _evaluate(self, input_ids, attention_mask):
        lengths = attention_mask.sum(-1)
        recall = torch.zeros(2, device=input_ids.device)
        with self._amp(input_ids.device):
            sparse_ce = token_losses(self.model.lm_head, self._hidden(input_ids, attention_mask), None,
                                     input_ids, attention_mask)[0]
        if self.settings.method == "sparsek":

            def on_layer(module, hidden, positions, q, k):
                u = module.scorer(hidden, positions)
                r, informative = sparsek_selection_recall(q, k, u, self.settings.topk, self.settings.window,
                                                          getattr(module, "scaling", None), lengths)
                recall.add_(torch.stack([(r * informative).sum(), informative.sum().float()]))

            ctx = capture_dense_layers(self.model, on_layer)
        else:
            ctx = dense_attention(self.model)
        # the dense reference is the teacher (starting weights); its own autocast region (see forward)
        with self._amp(input_ids.device), ctx, self._teacher_weights():
            dense_ce = token_losses(self.model.lm_head, self._hidden(input_ids, attention_mask), None,
                                    input_ids, attention_mask)[0]
        return None, torch.stack([sparse_ce, dense_ce, recall[0], recall[1]])
