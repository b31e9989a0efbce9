"""P-tuning (Liu et al., 2021): learned "virtual tokens" put in front of every input.

Instead of changing any weight, p-tuning learns a *prompt* the model reads before the real text. The
prompt is not made of vocabulary tokens: it is ``virtual_tokens`` free vectors in embedding space.
Learning those vectors directly (prompt tuning) works but trains slowly; p-tuning produces them with a
small MLP, the *prompt encoder*, which reparameterises them and makes optimisation much easier::

    table  (virtual_tokens, embedding_dim)        a trainable embedding table, one row per virtual token
      -> Linear(embedding_dim, bottleneck_dim) -> GELU -> Linear(bottleneck_dim, d_model)
      -> (virtual_tokens, d_model)                 the virtual prompt, shared by every example

    model input:  [v_1 ... v_10] [User: Context: ... Question: ...\\n\\nAssistant: answer]

The model's hook ``GPT.virtual_prompt`` does the plumbing: it prepends the prompt, counts positions
after it, keeps it visible in the attention mask of left-padded batches, stores it in the KV cache once,
and strips the virtual positions from the output, so logits and labels stay aligned with ``input_ids``.

With NeMo's defaults (10 tokens, 1024/1024) the encoder has 10x1024 + 1024x1024 + 1024 + 1024x576 + 576 =
1,650,240 parameters, but after training only its *output* matters: ``freeze_prompt_encoder`` replaces
it by that (10, 576) table (5,760 numbers) with identical outputs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..model import GPT
from ..precision import trainable_dtype
from .config import PtuningPEFTConfig


class PromptEncoder(nn.Module):
    """Embedding table of virtual tokens -> MLP -> (n_virtual_tokens, d_model) prompt embeddings."""

    peft_scheme: ClassVar[str] = "ptuning"

    def __init__(self, n_virtual_tokens: int, d_model: int, embedding_dim: int = 1024, bottleneck_dim: int = 1024,
                 init_std: float = 0.023, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.n_virtual_tokens = n_virtual_tokens
        self.embedding = nn.Embedding(n_virtual_tokens, embedding_dim, **factory)  # N(0, 1), as in NeMo
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, bottleneck_dim, **factory), nn.GELU(),
                                 nn.Linear(bottleneck_dim, d_model, **factory))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def prompt(self) -> torch.Tensor:
        """The virtual prompt, (n_virtual_tokens, d_model)."""
        return self.mlp(self.embedding.weight)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.prompt().unsqueeze(0).expand(batch_size, -1, -1)

    def freeze(self) -> "FrozenPrompt":
        """The encoder's current output as a fixed table (for inference: no MLP to run)."""
        with torch.no_grad():
            frozen = FrozenPrompt(self.prompt())
        if hasattr(self, "adapter_name"):  # a named adapter stays named (peft/multi.py)
            frozen.adapter_name = self.adapter_name
        return frozen


class FrozenPrompt(nn.Module):
    """A fixed (n_virtual_tokens, d_model) virtual prompt: what a trained ``PromptEncoder`` collapses to."""

    peft_scheme: ClassVar[str] = "ptuning"

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.n_virtual_tokens = table.shape[0]
        self.table = nn.Parameter(table.detach().clone(), requires_grad=False)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.table.unsqueeze(0).expand(batch_size, -1, -1)


def apply_ptuning(model: GPT, cfg: PtuningPEFTConfig) -> list[str]:
    """Install a ``PromptEncoder`` as the model's virtual prompt."""
    if model.virtual_prompt is not None:
        raise ValueError("the model already has a virtual prompt; p-tuning can be added only once")
    weight = model.wte.weight
    model.virtual_prompt = PromptEncoder(cfg.virtual_tokens, model.config.d_model, cfg.embedding_dim,
                                         cfg.bottleneck_dim, cfg.init_std, weight.device, trainable_dtype(weight.dtype))
    return ["virtual_prompt"]


def freeze_prompt_encoder(model: GPT) -> FrozenPrompt:
    """Replace the model's ``PromptEncoder`` by its output table (identical logits, no MLP). Idempotent."""
    prompt = model.virtual_prompt
    if isinstance(prompt, FrozenPrompt):
        return prompt
    if not isinstance(prompt, PromptEncoder):
        raise ValueError("freeze_prompt_encoder: the model has no p-tuning prompt encoder")
    model.virtual_prompt = prompt.freeze()
    return model.virtual_prompt


__all__ = ["PromptEncoder", "FrozenPrompt", "apply_ptuning", "freeze_prompt_encoder"]
