"""Shared pieces of the HF Trainer tests: a tiny model with an HF-style forward (returns the loss),
its data, the Trainer's param grouping, and the single-process reference optimizer on the same
global batches (every step sees the whole 8-example set: shuffling and the split over ranks do
not change the mean loss)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from sharded_msam_sf import AdamWMSAMScheduleFree  # noqa: E402

IN, HID, OUT, N = 6, 10, 3, 8
LR, WD = 0.02, 0.1
OPT_KW = dict(lr=LR, rho=0.05, betas=(0.9, 0.99), warmup_steps=2)


class HFNet(torch.nn.Module):
    """``forward(x, labels) -> {"loss", "logits"}``, as a transformers model returns."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HID)
        self.fc2 = torch.nn.Linear(HID, OUT)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.mse_loss(logits.float(), labels)
        return out


def make_model(seed: int = 0) -> HFNet:
    torch.manual_seed(seed)
    return HFNet()


def dataset() -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(N, IN, generator=g), torch.randn(N, OUT, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(N)]


def full_batch():
    data = dataset()
    return torch.stack([d["x"] for d in data]), torch.stack([d["labels"] for d in data])


def trainer_groups(model) -> List[Dict[str, Any]]:
    """``Trainer.create_optimizer``'s groups: weights with args.weight_decay, biases with 0."""
    return [{"params": [p for n, p in model.named_parameters() if not n.endswith("bias")], "weight_decay": WD},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]


def reference(steps: int, sam_mode: str, *, at: Optional[List[int]] = None,
              one_group: bool = False) -> Dict[int, Dict[str, torch.Tensor]]:
    """The single-process optimizer on the full batch: ``{k: x after k steps}`` for k in ``at``
    (default: the last), and the eval loss at the last x under key -1 (a 0-d tensor under "loss").
    ``one_group``: every parameter in one group with weight decay (the HF DeepSpeed JSON route,
    where DeepSpeed gets the model's parameters as one list)."""
    model = make_model()
    groups = [{"params": list(model.parameters()), "weight_decay": WD}] if one_group else trainer_groups(model)
    opt = AdamWMSAMScheduleFree(groups, sam_mode=sam_mode, **OPT_KW)
    x, y = full_batch()
    at = set(at or [steps])
    out: Dict[int, Dict[str, torch.Tensor]] = {}
    opt.train()
    for k in range(1, steps + 1):
        loss = model(x, y)["loss"]
        loss.backward()
        if sam_mode == "two_pass":
            opt.move_to_ascent()
            model(x, y)["loss"].backward()
            opt.move_from_ascent()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k in at:
            opt.eval()
            out[k] = {n: p.detach().clone() for n, p in model.named_parameters()}
            if k == steps:
                with torch.no_grad():
                    out[-1] = {"loss": model(x, y)["loss"].detach()}
            opt.train()
    return out


def max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def saved_weights(path: str) -> Dict[str, torch.Tensor]:
    """The model file a Trainer wrote in ``path`` (safetensors, or pytorch_model.bin)."""
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file
        return load_file(st)
    return torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu")


def training_args(out_dir: str, steps: int, **kw: Any):
    from transformers import TrainingArguments
    base = dict(output_dir=out_dir, per_device_train_batch_size=N, per_device_eval_batch_size=N, max_steps=steps,
                learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", warmup_steps=0,
                save_strategy="steps", save_steps=2, eval_strategy="no", logging_strategy="no", report_to=[],
                seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)
