"""PEFT LoRA on a tiny ``LlamaForCausalLM`` built from a config (no hub download), trained by ``MSAMTrainer`` in
two_pass, with HF gradient checkpointing on (the reference runs without it): the optimizer holds the adapters only (so ‖m‖ is over the
adapters), the saved adapters and ``merge_and_unload()`` hold x of the single-process reference loop on the same
batches, and gradient checkpointing does not change the trajectory."""
import os

import pytest

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS, N, T, TOL = 3, 8, 8, 1e-6
OPT = dict(lr=0.02, rho=0.05, warmup_steps=1, sam_mode="two_pass")


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # lora_B starts at 0: give it values so the adapters act from step 1
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def dataset():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (N, T), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(N)]


def adapters(model):
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference():
    """The plain two_pass loop on the whole batch; x of the adapters, the merged q_proj of layer 0, ‖m‖."""
    from sharded_msam_sf import AdamWMSAMScheduleFree
    model = make_model()
    opt = AdamWMSAMScheduleFree([p for p in model.parameters() if p.requires_grad], **OPT)
    ids = torch.stack([d["input_ids"] for d in dataset()])
    opt.train()
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.move_to_ascent()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.move_from_ascent()
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.eval()
    m_norm = torch.sqrt(sum((s["exp_avg"].double() ** 2).sum() for s in opt.state.values())).item()
    out = adapters(model)
    merged = model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach().clone()
    return out, merged, m_norm


def test_lora_with_gradient_checkpointing_adapters_saved_and_merged_at_x(tmp_path, checkpointing=True):
    """With checkpointing on against the reference without it: LoRA and checkpointing in one run (CI time)."""
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.integrations.hf import MSAMTrainer
    model = make_model()
    lora = {id(p) for p in model.parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=N, max_steps=STEPS,
                             learning_rate=OPT["lr"], weight_decay=0.0, lr_scheduler_type="constant",
                             save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=0.0,
                             gradient_checkpointing=checkpointing, dataloader_num_workers=0)
    trainer = MSAMTrainer(model=model, args=args, train_dataset=dataset(),
                          optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, OPT))
    trainer.train()
    assert trainer.model.base_model.model.is_gradient_checkpointing == checkpointing
    ref, ref_merged, ref_norm = reference()
    opt = trainer.optimizer.optimizer
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == lora  # the adapters only: the frozen base has no z, v, m and no part in ‖m‖
    norm = torch.sqrt(sum((s["exp_avg"].double() ** 2).sum() for s in opt.state.values())).item()
    assert norm == pytest.approx(ref_norm, rel=1e-5)
    got = adapters(trainer.model)
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= TOL
    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(ref)
    assert max((saved[k] - ref[k]).abs().max().item() for k in ref) <= TOL
    merged = trainer.model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach()
    assert (merged - ref_merged).abs().max().item() <= TOL
    print(f"MAXDIFF peft-lora two_pass checkpointing={checkpointing} "
          f"{max((got[k] - ref[k]).abs().max().item() for k in ref):.2e}")
