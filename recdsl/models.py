"""``CausalLM``: a small language model around any rule's ``Mixer``.

Embedding, pre-norm blocks (RMSNorm -> mixer -> residual; RMSNorm -> SwiGLU MLP -> residual),
a final RMSNorm and a head tied to the embedding. ``generate`` decodes with the mixers'
caches (convolution inputs and recurrent states), one token per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RecdslError
from .runtime.mixer import Mixer


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, rule, hidden_size, num_heads, intermediate_size, norm_eps, **options):
        super().__init__()
        self.mixer_norm = RMSNorm(hidden_size, norm_eps)
        self.mixer = Mixer(rule, hidden_size, num_heads, **options)
        self.mlp_norm = RMSNorm(hidden_size, norm_eps)
        self.mlp = SwiGLU(hidden_size, intermediate_size)

    def forward(self, x, past=None, use_cache=False):
        h = self.mixer(self.mixer_norm(x), past=past, use_cache=use_cache)
        if use_cache:
            h, past = h
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return (x, past) if use_cache else x


def _intermediate(hidden_size: int, multiple: int = 16) -> int:
    """8/3 of hidden_size, rounded up to a multiple of 16 (LLaMA's SwiGLU width)."""
    size = (8 * hidden_size + 2) // 3
    return multiple * ((size + multiple - 1) // multiple)


class CausalLM(nn.Module):
    """``CausalLM(rule, vocab_size, hidden_size, num_layers, num_heads, **options)``; options
    go to every ``Mixer`` (``dims``, ``conv``, ``gates``, ``allow_neg_eigval``, ``backend``, ...)
    except ``intermediate_size`` (default 8/3 of hidden, rounded up to 16), ``norm_eps`` and
    ``initializer_range`` (std of the embedding and linear weights, 0.02)."""

    def __init__(self, rule, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int | None = None, norm_eps: float = 1e-5,
                 initializer_range: float = 0.02, **options):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.blocks = nn.ModuleList(
            Block(rule, hidden_size, num_heads, intermediate_size or _intermediate(hidden_size),
                  norm_eps, **options)
            for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size, norm_eps)
        # weights only: the mixers' gate biases and decay params keep their own initialisation
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=initializer_range)

    def forward(self, input_ids, past=None, use_cache=False):
        """``input_ids`` [B, T] -> logits [B, T, vocab]; with ``use_cache`` also the caches
        (one per layer), which a later call continues from (``past=``)."""
        x = self.embed(input_ids)
        pasts = []
        for i, block in enumerate(self.blocks):
            out = block(x, past=None if past is None else past[i], use_cache=use_cache)
            if use_cache:
                x, layer_past = out
                pasts.append(layer_past)
            else:
                x = out
        logits = F.linear(self.norm(x), self.embed.weight)
        return (logits, pasts) if use_cache else logits

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None,
                 generator=None):
        """Append ``max_new_tokens`` tokens to ``input_ids`` [B, T] and return [B, T + new]:
        greedy at ``temperature`` 0, else sampled from softmax(logits / temperature), over the
        ``top_k`` likeliest tokens when given, drawing from ``generator``. The prompt runs once,
        then each new token is one cached step."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise RecdslError(f"input_ids must be [B, T] with T >= 1, not {list(input_ids.shape)}")
        if temperature < 0:
            raise RecdslError(f"temperature must be >= 0, not {temperature}")
        tokens = input_ids
        logits, past = self(input_ids, use_cache=True)
        for _ in range(max_new_tokens):
            nxt = self._pick(logits[:, -1].float(), temperature, top_k, generator)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            logits, past = self(nxt[:, None], past=past, use_cache=True)
        return tokens

    @staticmethod
    def _pick(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            k = min(int(top_k), logits.shape[-1])
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
