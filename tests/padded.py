"""Test-only reference path: a right-padded (B, T) batch through the model with plain causal attention (the
scripts only ever run packed rows), to compare against transformers and against the packed forward."""
import torch
import torch.nn.functional as F


class Causal:
    """Right-padded rows: plain causal attention (padding sits after every real token)."""

    def attend(self, attn, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def forward(model, idx):
    """Final hidden states (B, T, hidden) of the rows of idx (B, T), positions 0..T-1 in every row."""
    positions = torch.arange(idx.shape[1], device=idx.device)[None].expand(idx.shape[0], -1)
    return model(idx, positions=positions, ctx=Causal())


def logits(model, idx):
    return model.lm_head(forward(model, idx)).float()
