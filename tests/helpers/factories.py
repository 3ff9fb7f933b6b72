"""Model factories for the ``svdq --model module:function`` tests."""

import os

import torch
from torch import nn


class ByteMLP(nn.Module):
    """A plain torch language model over bytes: embedding → MLP → logits.

    With the environment variable ``SVDQ_TEST_CRASH_AT=N`` its N-th forward call raises ``RuntimeError``
    (the crash-mid-run tests)."""

    vocab_size = 256
    seq_len = 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(256, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.lm_head = nn.Linear(64, 256)
        self.calls = 0
        self.crash_at = int(os.environ.get("SVDQ_TEST_CRASH_AT", "0"))

    def forward(self, tokens):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError(f"ByteMLP: simulated crash in forward call {self.calls}")
        h = self.embed(tokens)
        return self.lm_head(h + self.down(torch.nn.functional.gelu(self.up(h))))


def make_byte_mlp():
    return ByteMLP()


def not_a_module():
    return 42
