"""Front ends turn a task's raw batch input into (features [B, T, F], mask [B, T] or None)."""

from __future__ import annotations

import torch
from torch import nn

from rnnlab.errors import ConfigError


class TokenEmbedding(nn.Module):
    """Token ids to embeddings; id 0 is padding and is masked out of pooling."""

    def __init__(self, vocab_size: int, embedding_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ConfigError(f"embedding_dim must be positive, got {embedding_dim}.")
        if not 0 <= dropout < 1:
            raise ConfigError(f"front_end dropout must be in [0, 1), got {dropout}.")
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.output_size = embedding_dim

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dropout(self.embedding(tokens)), tokens != 0


class DenseFeatures(nn.Module):
    """Real-valued frames [B, T, F] (audio features, time-series windows), optionally projected.

    With `projection_dim` set, a linear layer maps the F input features to that width;
    otherwise the features go to the encoder as they are. No padding mask: all steps are real.
    """

    def __init__(self, num_features: int, projection_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if num_features <= 0:
            raise ConfigError(f"num_features must be positive, got {num_features}.")
        if projection_dim is not None and projection_dim <= 0:
            raise ConfigError(f"front_end.projection_dim must be positive or null, got {projection_dim}.")
        if not 0 <= dropout < 1:
            raise ConfigError(f"front_end dropout must be in [0, 1), got {dropout}.")
        self.projection = nn.Linear(num_features, projection_dim) if projection_dim else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.output_size = projection_dim or num_features

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.dropout(self.projection(frames)), None
