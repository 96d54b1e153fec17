"""A small causal decoder in plain torch, and its own generation loop: the inference check's model
when transformers is not installed, and (with ``moe=True``) the mixture-of-experts example.

Imported by reprobox_inference in a run, after torch; standard library and torch only.
"""

from typing import Any

__all__ = ["Sampling", "build", "generate"]

_WIDTH, _HEADS, _EXPERTS = 64, 4, 4
# Switch Transformer's default: each expert takes at most 1.25x its even share of tokens.
_CAPACITY_FACTOR = 1.25


class Sampling:
    """Temperature, top-k and top-p, as transformers' logits processors apply them."""

    def __init__(self, temperature: float, top_k: int, top_p: float) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def filtered(self, logits: Any) -> Any:
        """Scores with every token outside top-k and top-p set to -inf."""
        scores = logits / self.temperature
        kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
        ordered, order = scores.sort(dim=-1, descending=False)
        remove = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
        remove[..., -1] = False  # always keep the most likely token
        return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def build(torch: Any, *, vocab: int, moe: bool) -> Any:
    """A pre-norm decoder: learned positions, causal attention, an MLP or a top-1 MoE."""
    nn = torch.nn
    functional = torch.nn.functional
    module: Any = nn.Module

    def mlp() -> Any:
        return nn.Sequential(
            nn.Linear(_WIDTH, 2 * _WIDTH), nn.GELU(), nn.Linear(2 * _WIDTH, _WIDTH)
        )

    class Attention(module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(_WIDTH, 3 * _WIDTH)
            self.out = nn.Linear(_WIDTH, _WIDTH)

        def forward(self, x: Any, mask: Any) -> Any:
            batch, length, _ = x.shape
            q, k, v = (
                t.view(batch, length, _HEADS, -1).transpose(1, 2)
                for t in self.qkv(x).chunk(3, dim=-1)
            )
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            allowed = causal[None, None] & mask[:, None, None, :].bool()
            # An additive mask of the dtype's minimum, not -inf, as transformers' masks are:
            # a padding row that sees no key stays finite.
            bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~allowed, torch.finfo(x.dtype).min)
            # scaled_dot_product_attention, not q @ k.transpose(): on this CPU the plain
            # matmul of a one-prompt batch gave other bits than the same prompt in a batch.
            attended = functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.out(attended.transpose(1, 2).reshape(batch, length, _WIDTH))

    class Experts(module):  # type: ignore[misc]
        """Top-1 routing with a capacity per expert counted over the whole batch's tokens.

        Tokens claim places in batch order, so a prompt's token can lose its place to a token
        of another prompt in the same batch: the batch dependence this model is here to show.
        """

        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(_WIDTH, _EXPERTS)
            self.experts = nn.ModuleList(mlp() for _ in range(_EXPERTS))

        def forward(self, x: Any, mask: Any) -> tuple[Any, Any]:
            flat = x.reshape(-1, _WIDTH)
            valid = mask.reshape(-1).bool()
            gate, choice = self.router(flat).softmax(-1).max(-1)
            chosen = functional.one_hot(choice, _EXPERTS) * valid[:, None]
            rank = (chosen.cumsum(0) * chosen).sum(-1)  # 1-based place in its expert's queue
            capacity = -(-int(valid.sum()) * _CAPACITY_FACTOR // _EXPERTS)
            kept = valid & (rank <= capacity)
            out = torch.zeros_like(flat)
            for number, expert in enumerate(self.experts):
                # Every expert on every token, then select: no data-dependent indexing.
                selected = (kept & (choice == number)).to(flat.dtype)[:, None]
                out = out + selected * gate[:, None] * expert(flat)
            return out.view_as(x), (valid & ~kept).view(mask.shape)

    class Block(module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(_WIDTH), nn.LayerNorm(_WIDTH)
            self.attention = Attention()
            self.ffn = Experts() if moe else mlp()

        def forward(self, x: Any, mask: Any) -> tuple[Any, Any]:
            x = x + self.attention(self.norm1(x), mask)
            if moe:
                update, dropped = self.ffn(self.norm2(x), mask)
            else:
                update, dropped = self.ffn(self.norm2(x)), torch.zeros_like(mask, dtype=torch.bool)
            return x + update, dropped

    class Decoder(module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(vocab, _WIDTH)
            self.positions = nn.Embedding(64, _WIDTH)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.norm = nn.LayerNorm(_WIDTH)
            self.head = nn.Linear(_WIDTH, vocab, bias=False)
            # Small embeddings, as language models start: the layers, not the last token
            # alone, decide the next token.
            nn.init.normal_(self.tokens.weight, std=0.02)
            nn.init.normal_(self.positions.weight, std=0.02)

        def get_output_embeddings(self) -> Any:
            return self.head

        def forward(self, ids: Any, mask: Any) -> tuple[Any, Any]:
            # Positions count real tokens only, so left padding does not shift them.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            x = self.tokens(ids) + self.positions(positions)
            dropped = torch.zeros_like(mask, dtype=torch.bool)
            for block in self.blocks:
                x, block_dropped = block(x, mask)
                dropped = dropped | block_dropped
            return self.head(self.norm(x)), dropped

    return Decoder()


def generate(
    torch: Any,
    model: Any,
    ids: Any,
    mask: Any,
    *,
    new_tokens: int,
    sampling: Sampling | None,
    generators: list[Any] | None = None,
) -> tuple[Any, list[Any], list[list[list[int]]]]:
    """Greedy (``sampling=None``) or sampled generation, left-padded, without a KV cache.

    Sampling draws from torch's global generator (what the hook seeds), or with one
    ``torch.Generator`` per row, so that a row's draws do not depend on its batch. Returns
    the new tokens, each step's last-position logits, and each step's tokens dropped by the
    experts' capacity per row (counted among the row's real tokens).
    """
    steps_logits, steps_dropped = [], []
    for _ in range(new_tokens):
        logits, dropped = model(ids, mask)
        last = logits[:, -1, :]  # left padding: the last column is every row's last token
        steps_logits.append(last)
        steps_dropped.append(
            [d[m.bool()].nonzero().flatten().tolist() for d, m in zip(dropped, mask, strict=True)]
        )
        if sampling is None:
            chosen = last.argmax(-1)
        else:
            probs = sampling.filtered(last).softmax(-1)
            if generators is None:
                chosen = torch.multinomial(probs, 1).squeeze(-1)
            else:
                rows = zip(probs, generators, strict=True)
                chosen = torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in rows])
        ids = torch.cat([ids, chosen[:, None]], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return ids[:, -new_tokens:], steps_logits, steps_dropped
