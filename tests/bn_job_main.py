"""The main job with a BatchNorm after the embeddings (the job's GPT has none), for test_bn_job.py:
``torchrun ... tests/bn_job_main.py --config ...`` runs ``sharded_msam_sf.train.main`` on that model."""
import sys

import torch

from sharded_msam_sf.job import engines
from sharded_msam_sf.job import model as M


class GPTWithBN(M.GPT):
    """The job's GPT, with ``BatchNorm1d(n_embd)`` over (batch, time) on the token + position embeddings."""

    def __init__(self, cfg, activation_checkpointing=False):
        super().__init__(cfg, activation_checkpointing)
        self.bn = torch.nn.BatchNorm1d(cfg.n_embd)

    def forward(self, idx, targets=None):
        x = self.bn(M.embed(self, idx).transpose(1, 2)).transpose(1, 2)
        logits = M.head(self, M.run_blocks(self, x, self.blocks))
        return logits if targets is None else M.lm_loss(logits, targets)


if __name__ == "__main__":
    engines.GPT = GPTWithBN
    from sharded_msam_sf.train import main
    sys.exit(main())
