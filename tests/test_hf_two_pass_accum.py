"""HF ``MSAMTrainer`` two_pass with gradient clipping on (``max_grad_norm``, the Trainer's default 1.0 and one
that acts on every step) and with ``gradient_accumulation_steps=2``: the weights after ``train()`` equal the
single-process loop on the whole batch that clips g (the gradient the update uses) and folds g0 unclipped."""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from tests import hf_common as H  # noqa: E402

STEPS, TOL = 3, 1e-6


def reference(clip: float, clip_g0: bool = False):
    from sharded_msam_sf import AdamWMSAMScheduleFree
    model = H.make_model()
    opt = AdamWMSAMScheduleFree(H.trainer_groups(model), sam_mode="two_pass", **H.OPT_KW)
    x, y = H.full_batch()
    opt.train()
    for _ in range(STEPS):
        model(x, y)["loss"].backward()
        if clip_g0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.move_to_ascent()
        model(x, y)["loss"].backward()
        opt.move_from_ascent()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.eval()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(tmp_path, **kw):
    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.integrations.hf import MSAMTrainer
    args = H.training_args(str(tmp_path), STEPS, use_cpu=True, save_strategy="no", **kw)
    trainer = MSAMTrainer(model=H.make_model(), args=args, train_dataset=H.dataset(),
                          optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, dict(H.OPT_KW, sam_mode="two_pass")))
    trainer.train()
    return {n: p.detach() for n, p in trainer.model.named_parameters()}, trainer


@pytest.mark.parametrize("accum", [1, 2], ids=["accum1", "accum2"])
@pytest.mark.parametrize("clip", [1.0, 0.05], ids=["max_grad_norm=1.0", "max_grad_norm=0.05"])
def test_two_pass_clips_g_not_g0(tmp_path, accum, clip):
    weights, trainer = _train(tmp_path, max_grad_norm=clip, gradient_accumulation_steps=accum,
                              per_device_train_batch_size=H.N // accum)
    ref = reference(clip)
    assert H.max_diff(weights, ref) < TOL
    assert [g["k"] for g in trainer.optimizer.optimizer.param_groups] == [STEPS, STEPS]
    if clip < 1.0:  # the clip acts: it is another trajectory than no clip, and than clipping g0 too
        assert H.max_diff(ref, reference(0.0)) > 1e-5
        assert H.max_diff(ref, reference(clip, clip_g0=True)) > 1e-5
    print(f"MAXDIFF hf-msam two_pass accum{accum} clip{clip} {H.max_diff(weights, ref):.2e}")
