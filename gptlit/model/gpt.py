"""A GPT in plain PyTorch: RoPE (or learned positions), causal SDPA attention with a KV cache, an MLP.

The variants of `gptlit.model.config.GPTConfig`: LayerNorm or RMSNorm; the MLPs named in `gptlit.model.config.MLPS`;
grouped-query attention (``n_kv_heads``), QK-norm, a head tied to the embedding or not. The layers (norms,
attention with its KV cache, MLPs: each variant one class, registered under its config name) are in
`gptlit/model/layers.py`, the rotary embeddings in `gptlit/model/rope.py`; here the Block and the GPT assemble them.
Nothing here imports Lightning: the model can be used, tested and exported on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from gptlit.checkpoint import model_state_dict, read_checkpoint
from gptlit.errors import UsageError
from gptlit.model.cached_pass import CachedPass
from gptlit.model.config import GPTConfig
from gptlit.model.layers import MLP, CausalSelfAttention, KVCache, Norm
from gptlit.model.loss import chunked_cross_entropy
from gptlit.model.rope import build_rope_cache

if TYPE_CHECKING:
    from gptlit.generation.decoding import SamplingOptions
    from gptlit.generation.draft import NgramTable


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Decoding runs the same operations through `gptlit.model.cached_pass` (this forward and the attention's, over the
    KV cache, without module calls): a change here goes there too; tests/test_cached_pass.py holds the two equal.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm_1 = Norm.named(config.norm_type)(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = Norm.named(config.norm_type)(config)
        self.mlp = MLP.named(config.mlp)(config)

    def forward(self, x, rope, input_pos=None, mask=None, cache_len=None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, input_pos, mask, cache_len)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model.

    Args:
        config: The model's shape (see :class:`gptlit.model.config.GPTConfig`).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.embed_dim)
        self.wpe = None if config.use_rope else nn.Embedding(config.block_size, config.embed_dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = Norm.named(config.norm_type)(config)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied: one matrix embeds and un-embeds tokens

        if config.use_rope:
            cos, sin = build_rope_cache(config.block_size, config.head_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("causal_mask", None, persistent=False)  # (L, L) bool, built with the KV cache

        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layers),
        # so the residual's variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def load_from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
        """The GPT a gptlit checkpoint (``.ckpt``) holds, in eval mode on ``map_location``.

        Read weights-only: a checkpoint whose pickle would run code is refused, never executed. Its
        tokenizer: ``gptlit.Tokenizer.from_checkpoint(path)``.
        """
        return cls.from_checkpoint(read_checkpoint(path)).to(map_location).eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> GPT:
        """The GPT of a checkpoint already read (`gptlit.checkpoint.read_checkpoint`)."""
        model = cls(GPTConfig(**checkpoint["gptlit"]["config"]))
        model.load_state_dict(model_state_dict(checkpoint))
        return model

    # Forward ---------------------------------------------------------------------------------------

    def forward(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, cache_len: int | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        With ``input_pos`` (T,) — the positions of these tokens, increasing — keys and values are read
        from and written to the KV cache, so a prompt can be fed once and then one token at a time.
        ``cache_len`` says the tokens are the cache's last ones: their positions are cache_len - T .. cache_len - 1
        (``input_pos`` must be those), and attention reads the cache's first cache_len positions only, which saves
        reading the rest (a single token then needs no mask). By default the whole cache is read (masked), so that
        every decoding pass has the same shapes.
        """
        return self.lm_head(self.hidden_states(idx, input_pos, cache_len))  # (B, T, vocab_size)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of idx (B, T) against targets (B, T), without building the logits."""
        h = self.hidden_states(idx)  # (B, T, C)
        # reshape, not view: targets may be a strided slice of one buffer, as in buf[:, 1:]
        return chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))

    def hidden_states(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, cache_len: int | None = None
    ) -> torch.Tensor:
        """The final-normed residual stream (B, T, C) that the head turns into logits."""
        T = idx.size(1)
        if input_pos is None:
            if T > self.config.block_size:
                raise UsageError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            pos, mask = slice(0, T), None
        else:
            if self.causal_mask is None:
                raise RuntimeError("forward with input_pos needs a KV cache: call model.set_kv_cache(batch_size)")
            # Row p of the causal mask lets a query at position p see keys 0..p.
            if cache_len is None:  # the whole cache: the positions not written yet are masked
                pos, mask = input_pos, self.causal_mask[input_pos]  # mask (T, L)
            else:  # the cache's last T tokens: slices, not gathers; the last token sees every position
                pos = slice(cache_len - T, cache_len)
                mask = None if T == 1 else self.causal_mask[pos, :cache_len]  # (T, cache_len)

        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[pos]  # (T, C) broadcast over the batch
        x = F.dropout(x, self.config.dropout, self.training)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.config.use_rope else None  # 2 x (T, hs)
        for block in self.blocks:
            x = block(x, rope, input_pos, mask, cache_len)
        return self.norm_f(x)  # (B, T, C)

    # KV cache --------------------------------------------------------------------------------------

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Preallocate a KV cache for ``batch_size`` sequences of ``max_seq_len`` (default block_size)."""
        max_seq_len = max_seq_len or self.config.block_size
        if max_seq_len > self.config.block_size:
            raise UsageError(
                f"max_seq_len {max_seq_len} exceeds block_size {self.config.block_size}: positions past "
                "block_size were never trained"
            )
        param = self.wte.weight
        device, dtype = device or param.device, dtype or param.dtype
        for block in self.blocks:
            block.attn.kv_cache = KVCache(
                batch_size, self.config.kv_heads, max_seq_len, self.config.head_size, device, dtype
            )
        ones = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device)
        self.causal_mask = torch.tril(ones)  # (L, L)

    def cached_pass(self, products: str = "fastest") -> CachedPass:
        """The forward pass of decoding over the current KV cache, in eval mode: ``forward(idx, input_pos,
        cache_len)``'s logits with less Python per pass, its products in the form the CPU runs fastest (up to
        rounding; bit for bit with ``products="linear"``: `gptlit.model.cached_pass`)."""
        return CachedPass(self, products)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.causal_mask = None

    @property
    def kv_cache_shape(self) -> tuple[int, int] | None:
        """(batch_size, max_seq_len) of the current KV cache, or None."""
        cache = self.blocks[0].attn.kv_cache
        return None if cache is None else (cache.k.size(0), cache.k.size(2))

    # Accounting ------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied embedding/head matrix counted once; ``non_embedding`` drops the token and position
        embeddings (an untied head stays: it is a matrix product)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12·n_layers·T·C.

        N is every parameter but the embeddings, plus the head (biases and norm gains add a negligible 0.1%);
        the second term is the attention scores and their weighted sum (PaLM, appendix B).
        """
        T = seq_len or self.config.block_size
        head = self.wte.weight.numel() if self.config.tie_embeddings else 0  # untied: counted already
        n_matmul = self.num_params(non_embedding=True) + head
        return 6 * n_matmul + 12 * self.config.n_layers * T * self.config.embed_dim

    # Seed-style generation -------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        token_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
        draft_table: NgramTable | None = None,
        compile: bool = False,
        *,
        draft_tokens: int = 8,
        options: SamplingOptions | None = None,
    ) -> torch.Tensor | list:
        """The prompt followed by its continuation of up to max_new_tokens tokens, in the prompt's own form.

        A list of ids gives a list of ids (a list of lists, one per prompt, for several prompts); a tensor
        (B, T) or (T,) gives a tensor (B, T + max_new_tokens), rows that reached ``eos_id`` early padded
        with it. The options are those of `gptlit.generation.generate.generate`: a `SamplingOptions` as
        ``options``, or the keywords that make one.
        """
        from gptlit.generation.generate import generate, sampling_options

        keywords = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, draft_tokens=draft_tokens)
        options = sampling_options(options, max_new_tokens, compile=compile, **keywords)
        if not isinstance(token_ids, torch.Tensor):
            nested = len(token_ids) > 0 and not isinstance(token_ids[0], Integral)
            rows = [[int(t) for t in row] for row in token_ids] if nested else [[int(t) for t in token_ids]]
            new = generate(self, rows, eos_id=eos_id, draft_table=draft_table, options=options)
            out = [row + continuation for row, continuation in zip(rows, new, strict=True)]
            return out if nested else out[0]
        if token_ids.dim() == 1:
            token_ids = token_ids.unsqueeze(0)
        new = generate(self, token_ids, eos_id=eos_id, draft_table=draft_table, options=options)
        width = max(map(len, new))
        padded = [row + [eos_id] * (width - len(row)) for row in new]  # only rows that stopped at eos are short
        new_ids = torch.tensor(padded, dtype=token_ids.dtype, device=token_ids.device)  # (B, new)
        return torch.cat((token_ids, new_ids.view(token_ids.size(0), -1)), dim=1)
