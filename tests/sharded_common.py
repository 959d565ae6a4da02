"""Shared pieces of the multi-rank back-end tests (DDP, FSDP1, FSDP2, HSDP, DCP).

Every scenario runs the same loop on a wrapped model (each rank on its slice of the
global batch, losses are means, so the engine's gradient averaging gives the
global-batch gradient) and on an unwrapped copy with the single-process optimizer
(the full global batch on every rank, no communication), then compares the
eval-mode weights. The model has odd sizes so that shards are uneven and the last
layer's shards are empty on rank 1 (FSDP2) and FSDP1 flat params carry padding.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from sharded_msam_sf import AdamWMSAMScheduleFree

TOL = 1e-5
HP = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, warmup_steps=2)
GLOBAL_BATCH = 8
D_IN = 4


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def global_batch(step: int, n: int = GLOBAL_BATCH):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, 1, generator=g)


def local_slice(t: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    per = t.shape[0] // dp_size
    return t[dp_rank * per:(dp_rank + 1) * per]


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


# ---------------------------------------------------------------- wrapping
def wrap(engine: str, model: nn.Sequential, *, mp: bool = False, mesh=None):
    """Wrap ``model`` (in place where the engine does) for ``engine`` in
    ddp | fsdp2 | hsdp | fsdp1_orig | fsdp1_flat."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model)
    if engine in ("fsdp2", "hsdp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        kw = {}
        if engine == "hsdp":
            from torch.distributed.device_mesh import init_device_mesh
            kw["mesh"] = mesh or init_device_mesh("cpu", (2, dist.get_world_size() // 2),
                                                  mesh_dim_names=("replicate", "shard"))
        elif mesh is not None:
            kw["mesh"] = mesh
        if mp:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(model[0], **kw)
        fully_shard(model[2], **kw)
        fully_shard(model, **kw)
        return model
    if engine in ("fsdp1_orig", "fsdp1_flat", "fsdp1_hybrid"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision, ShardingStrategy
        kw = dict(device_id=torch.device("cpu"), use_orig_params=engine != "fsdp1_flat")
        if engine == "fsdp1_hybrid":   # HYBRID_SHARD on a (replicate, shard) mesh
            from torch.distributed.device_mesh import init_device_mesh
            kw.update(sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                      device_mesh=mesh or init_device_mesh("cpu", (2, dist.get_world_size() // 2),
                                                           mesh_dim_names=("replicate", "shard")))
        if mp:
            kw["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                   buffer_dtype=torch.float32)
        model[0] = FSDP(model[0], **kw)
        model[2] = FSDP(model[2], **kw)
        return FSDP(model, **kw)
    raise ValueError(engine)


def param_groups(engine: str, wrapped: nn.Module, ref: nn.Module, wd: float = 0.1):
    """(groups for the wrapped model, the same groups for the reference): decay / no decay.

    FSDP1 flat params mix weights and biases, so there the decay group is the first
    Linear's unit (its weight and bias) and the rest is the no-decay group."""
    if engine == "fsdp1_flat":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        first = [m._handle.flat_param for m in FSDP.fsdp_modules(wrapped)
                 if m._handle is not None and isinstance(m.module, nn.Linear) and m.module.in_features == D_IN]
        ids = {id(p) for p in first}
        rest = [p for p in wrapped.parameters() if id(p) not in ids]
        ref_first = list(ref[0].parameters())
        ref_ids = {id(p) for p in ref_first}
        ref_rest = [p for p in ref.parameters() if id(p) not in ref_ids]
        return ([{"params": first, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                [{"params": ref_first, "weight_decay": wd}, {"params": ref_rest, "weight_decay": 0.0}])

    def split(named):
        named = list(named)
        return ([{"params": [p for n, p in named if n.endswith("weight")], "weight_decay": wd},
                 {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0}])
    return split(wrapped.named_parameters()), split(ref.named_parameters())


def full_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full (unsharded) weights, every rank, clean FQNs (collective for sharded models)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not any(True for _ in model.parameters()):
        return {}
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    out = {}
    for k, v in sd.items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().float().clone()
    return out


def max_abs_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float((a[k] - b[k].reshape(a[k].shape)).abs().max()) for k in a)


# ---------------------------------------------------------------- the loop
def ascent_scale(opt) -> float:
    """The ascent scale ``s`` of the first param group with the ascent (rho > 0; 0 if none)."""
    return next((g["ascent_scale"] for g in opt.param_groups if g["rho"] > 0), 0.0)


def run_loop(model, opt, *, mode: str, steps: int, dp_rank: int, dp_size: int, switch_at: Optional[int] = None,
             nan_at: Optional[int] = None, nan_fn: Optional[Callable] = None, record: Optional[dict] = None,
             start: int = 0, final_eval: bool = True, backward: Optional[Callable] = None,
             evaluate: Optional[Callable] = None):
    """The seed's loop (two_pass) or MSAM's (one_pass) on this rank's slice of each global batch.

    ``switch_at``: after that step, eval() + an eval forward (which leaves FSDP roots
    unsharded) + train(). ``nan_fn(step)`` runs after the (first) backward of step
    ``nan_at``. ``record`` collects the ascent scales and eval losses. ``backward(x, y)``
    (default: ``mse(model, x, y).backward()``) takes one gradient, ``evaluate(x, y)``
    (default: ``mse(model, x, y)``) the eval loss, e.g. through a pipeline schedule."""
    backward = backward or (lambda x, y: mse(model, x, y).backward())
    evaluate = evaluate or (lambda x, y: mse(model, x, y))
    opt.train()
    model.train()
    for i in range(start, steps):
        x, y = global_batch(i)
        x, y = local_slice(x, dp_rank, dp_size), local_slice(y, dp_rank, dp_size)
        backward(x, y)
        if nan_at == i and nan_fn is not None:
            nan_fn(i)
        if mode == "two_pass":
            opt.move_to_ascent()
            if record is not None:
                record.setdefault("scale", []).append(ascent_scale(opt))
            backward(x, y)
            opt.move_from_ascent()
        opt.step()
        if mode == "one_pass" and record is not None:
            record.setdefault("scale", []).append(ascent_scale(opt))
        opt.zero_grad(set_to_none=True)
        if switch_at is not None and i == switch_at:
            opt.eval()
            model.eval()
            with torch.no_grad():
                xe, ye = global_batch(10_000)
                loss = evaluate(xe, ye)
            if record is not None:
                record.setdefault("eval_loss", []).append(float(loss))
            model.train()
            opt.train()
    if final_eval:
        opt.eval()


def reference_run(engine: str, wrapped: nn.Module, ref: nn.Module, *, mode: str, steps: int,
                  regroup: Optional[Callable] = None, **kw):
    """The single-process optimizer on ``ref`` with the full global batch (no communication);
    ``regroup(groups)`` replaces the param groups of :func:`param_groups`."""
    _, ref_groups = param_groups(engine, wrapped, ref)
    ref_groups = regroup(ref_groups) if regroup is not None else ref_groups
    opt = AdamWMSAMScheduleFree(ref_groups, sam_mode=mode, **HP)
    assert type(opt.backend).__name__ == "LocalBackend"
    run_loop(ref, opt, mode=mode, steps=steps, dp_rank=0, dp_size=1, **kw)
    return opt


def bf16_control_run(ref: nn.Module, opt, *, steps: int, dp_size: int, switch_at: Optional[int] = None):
    """The one_pass loop on one process under the engines' bf16 mixed-precision policy
    (``param_dtype=bf16, reduce_dtype=fp32``, fp32 masters): each step casts the fp32 params
    to bf16, takes every data-parallel rank's slice's gradient in bf16 (inputs cast to bf16,
    as the engines' root does), casts each to fp32 and averages them in fp32 — what FSDP's
    fp32 reduce-scatter computes — then steps the fp32 masters. ``record`` as in run_loop."""
    record: Dict[str, list] = {}
    opt.train()
    for i in range(steps):
        x, y = global_batch(i)
        low = copy.deepcopy(ref).to(torch.bfloat16)
        total = None
        for r in range(dp_size):
            loss = mse(low, local_slice(x, r, dp_size).to(torch.bfloat16), local_slice(y, r, dp_size))
            grads = [g.float() for g in torch.autograd.grad(loss, list(low.parameters()))]
            total = grads if total is None else [a + g for a, g in zip(total, grads)]
        for p, g in zip(ref.parameters(), total):
            p.grad = g / dp_size
        opt.step()
        opt.zero_grad(set_to_none=True)
        record.setdefault("scale", []).append(ascent_scale(opt))
        if switch_at is not None and i == switch_at:
            opt.eval()
            with torch.no_grad():
                xe, ye = global_batch(10_000)
                record.setdefault("eval_loss", []).append(
                    float(mse(copy.deepcopy(ref).to(torch.bfloat16), xe.to(torch.bfloat16), ye)))
            opt.train()
    opt.eval()
    return record


def global_norm(opt) -> float:
    """||m|| over every group with rho > 0, through the optimizer's own back end (each local sum of
    squares over its replica count first, under a ``weighted`` reduction)."""
    backend, rows = opt.backend, []
    for g in opt.param_groups:
        sumsq = 0.0
        for p in opt._with_m(g):
            m = backend.local(opt.state[p]["exp_avg"]).double().reshape(-1)
            if not backend.reduction.weighted:
                sumsq += float(m.square().sum())
                continue
            for rng, replicas in backend.replica_pieces(p):   # each piece over its replica count
                piece = m if rng is None else m[rng[0]:rng[1]]
                sumsq += float(piece.square().sum()) / replicas
        rows.append(sumsq)
    stats = torch.tensor(rows + [0.0], dtype=torch.float64)
    opt.backend.all_reduce_(stats)
    return math.sqrt(float(stats[:-1].sum()))


def reference_norm(opt) -> float:
    total = 0.0
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            if "exp_avg" in st:
                total += float(st["exp_avg"].double().square().sum())
    return math.sqrt(total)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# ---------------------------------------------------------------- scenarios: measure on the ranks
def _nan_into(opt, rank_to_poison: int, rank: int):
    """Write a NaN into the first non-empty local gradient, on ``rank_to_poison`` only."""
    def poison(step):
        if rank != rank_to_poison:
            return
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                loc = opt.backend.local(p.grad)
                if loc.numel():
                    loc.view(-1)[0] = float("nan")
                    return
        raise AssertionError("no local gradient to poison")
    return poison


def measure_equivalence(engine: str, mode: str, rank: int, world_size: int, *, steps: int = 8, switch_at: int = 3,
                        nan_at: Optional[int] = 5, nan_rank: int = 1, nan_via_data: bool = False, dp_rank=None,
                        dp_size=None, opt_kwargs: Optional[dict] = None, pass_model: bool = False,
                        make: Optional[Callable[..., nn.Module]] = None, wrapper: Optional[Callable] = None) -> dict:
    """Run ``engine`` and the single-process control on the same global batches; return what
    :data:`EQUIVALENCE_CHECKS` compares (the global norm, the ascent scales, the skipped steps,
    the eval losses, the final weights), for the parent process to assert one by one.
    ``make(seed)``/``wrapper(engine, model)``: another model and its wrapping (default
    :func:`make_model`, :func:`wrap`)."""
    dp_rank = rank if dp_rank is None else dp_rank
    dp_size = world_size if dp_size is None else dp_size
    base = (make or make_model)(seed=3)
    ref = clone_model(base)
    wrapped = (wrapper or wrap)(engine, clone_model(base))
    groups, _ = param_groups(engine, wrapped, ref)
    extra = dict(opt_kwargs or {}, **({"model": wrapped} if pass_model else {}))
    opt = AdamWMSAMScheduleFree(groups, sam_mode=mode, **HP, **extra)

    rec, ref_rec = {}, {}
    if nan_at is not None and nan_via_data:
        # a NaN in this rank's input: the engine's gradient averaging spreads it to every rank
        real = global_batch

        def patched(step, n=GLOBAL_BATCH):
            x, y = real(step, n)
            if step == nan_at:
                x = x.clone()
                per = x.shape[0] // dp_size
                x[nan_rank * per] = float("nan")
            return x, y
        globals()["global_batch"] = patched
    try:
        nan_fn = None if (nan_at is None or nan_via_data) else _nan_into(opt, nan_rank, rank)
        run_loop(wrapped, opt, mode=mode, steps=steps, dp_rank=dp_rank, dp_size=dp_size, switch_at=switch_at,
                 nan_at=nan_at, nan_fn=nan_fn, record=rec, final_eval=False)
        ref_nan = None
        if nan_at is not None and not nan_via_data:
            def ref_nan(step):
                for p in ref.parameters():
                    p.grad.view(-1)[0] = float("nan")
                    return
        ref_opt = reference_run(engine, wrapped, ref, mode=mode, steps=steps, switch_at=switch_at, nan_at=nan_at,
                                nan_fn=ref_nan, record=ref_rec, final_eval=False)
    finally:
        if nan_at is not None and nan_via_data:
            globals()["global_batch"] = real

    out = dict(norm=global_norm(opt), ref_norm=reference_norm(ref_opt), scales=rec["scale"],
               ref_scales=ref_rec["scale"], steps=steps, skipped=opt.skipped_steps, ref_skipped=ref_opt.skipped_steps,
               expected_skips=0 if nan_at is None else 1, eval_loss=rec["eval_loss"],
               ref_eval_loss=ref_rec["eval_loss"], backend=type(opt.backend).__name__)
    opt.eval()
    ref_opt.eval()
    theirs = {k: v.detach().float() for k, v in ref.state_dict().items()}
    out["diff"] = max_abs_diff(full_weights(wrapped), theirs)
    out["moved"] = max_abs_diff(theirs, {k: v.detach().float() for k, v in base.state_dict().items()})
    return out


def _check_norm(r: dict) -> None:
    # the global ||m|| through the back end's one all-reduce equals the unsharded one
    assert r["ref_norm"] > 0 and abs(r["norm"] - r["ref_norm"]) <= 1e-6 * r["ref_norm"], (r["norm"], r["ref_norm"])


def _check_scales(r: dict) -> None:
    # the ascent scale s = ±rho/||m|| of every step (0 where skipped)
    assert len(r["scales"]) == len(r["ref_scales"]) == r["steps"], (r["scales"], r["ref_scales"])
    for a, b in zip(r["scales"], r["ref_scales"]):
        assert abs(a - b) <= 1e-5 * max(abs(b), 1e-12), (r["scales"], r["ref_scales"])


def _check_skips(r: dict) -> None:
    # a NaN on one rank skips the same step on every rank, as on one process
    assert r["skipped"] == r["ref_skipped"] == r["expected_skips"], (r["skipped"], r["ref_skipped"])


def _check_eval_loss(r: dict) -> None:
    # eval() mid-run (after an eval forward that leaves FSDP roots unsharded) gives the control's loss
    assert len(r["eval_loss"]) == len(r["ref_eval_loss"]) > 0
    for a, b in zip(r["eval_loss"], r["ref_eval_loss"]):
        assert abs(a - b) <= TOL, (a, b)


def _check_weights(r: dict) -> None:
    # the trajectory moved (a no-op optimizer would pass a loose check) and equals the control's
    assert r["moved"] > 1e-3, r["moved"]
    assert r["diff"] <= TOL, r["diff"]


EQUIVALENCE_CHECKS: Dict[str, Callable[[dict], None]] = {
    "global_norm": _check_norm, "ascent_scales": _check_scales, "nan_skips": _check_skips,
    "eval_loss": _check_eval_loss, "final_weights": _check_weights,
}


def assert_on_every_rank(results: Dict[int, dict], key, check: Callable[[dict], None]) -> None:
    """``check`` on every rank's measurement ``results[rank][key]``, naming the rank that fails."""
    for rank in sorted(results):
        try:
            check(results[rank][key])
        except AssertionError as e:
            raise AssertionError(f"rank {rank}, {key}: {e}") from None


def measure_bf16(engine: str, rank: int, world_size: int, *, steps: int = 6, switch_at: int = 2) -> dict:
    """bf16 mixed precision (fp32 sharded masters) against :func:`bf16_control_run`: the max
    |diff| of the final weights and eval losses, the dtypes of params and state."""
    base = make_model(seed=3)
    ref = clone_model(base)
    model = wrap(engine, clone_model(base), mp=True)
    opt = AdamWMSAMScheduleFree(model.parameters(), **HP)
    rec = {}
    run_loop(model, opt, mode="one_pass", steps=steps, dp_rank=rank, dp_size=world_size, switch_at=switch_at,
             record=rec)
    loc = [(p, opt.backend.local(p)) for p in model.parameters()]
    # FSDP1 gives no gradient to an empty view: such a param gets no state
    state_dtypes = {str(opt.backend.local(opt.state[p][k]).dtype) for p, lp in loc if lp.numel()
                    for k in ("z", "exp_avg_sq", "exp_avg")}
    ref_opt = AdamWMSAMScheduleFree(ref.parameters(), **HP)
    ref_rec = bf16_control_run(ref, ref_opt, steps=steps, dp_size=world_size, switch_at=switch_at)
    theirs = {k: v.float() for k, v in ref.state_dict().items()}
    fp32_control = clone_model(base)
    fp32_opt = AdamWMSAMScheduleFree(fp32_control.parameters(), **HP)
    run_loop(fp32_control, fp32_opt, mode="one_pass", steps=steps, dp_rank=0, dp_size=1, switch_at=switch_at)
    ours = full_weights(model)
    return dict(diff=max_abs_diff(ours, theirs), eval_loss=rec["eval_loss"], ref_eval_loss=ref_rec["eval_loss"],
                scales=rec["scale"], ref_scales=ref_rec["scale"],
                diff_vs_fp32=max_abs_diff(ours, {k: v.float() for k, v in fp32_control.state_dict().items()}),
                param_dtypes={str(p.dtype) for p, _ in loc} | {str(lp.dtype) for _, lp in loc},
                state_dtypes=state_dtypes)


def measure_collectives(engine: str, rank: int, world_size: int, *, steps: int = 3, dp_rank=None, dp_size=None,
                        opt_kwargs=None, pass_model: bool = False, make: Optional[Callable[..., nn.Module]] = None,
                        wrapper: Optional[Callable] = None, setup: Optional[Callable] = None) -> dict:
    """Per mode: the collectives of ours (issued from inside the package) over ``steps`` steps,
    all collectives of ours and of torch.optim.AdamW in the same loop, and the collectives of
    eval()/train()/eval(); for :func:`check_collectives`. ``make``/``wrapper`` as in
    :func:`measure_equivalence`; ``setup()`` (instead) gives a fresh ``(model, run_loop keyword
    arguments)`` for each optimizer; ``opt_kwargs`` may be a function of that model."""
    from sharded_msam_sf.testing.comm_count import CommCounter
    dp_rank = rank if dp_rank is None else dp_rank
    dp_size = world_size if dp_size is None else dp_size
    setup = setup or (lambda: ((wrapper or wrap)(engine, (make or make_model)(seed=5)), {}))
    out = {}
    for mode in ("one_pass", "two_pass"):
        m = out[mode] = {"steps": steps}
        for which in ("ours", "adamw"):
            model, loop_kw = setup()
            if which == "ours":
                kw = opt_kwargs(model) if callable(opt_kwargs) else opt_kwargs
                extra = dict(kw or {}, **({"model": model} if pass_model else {}))
                opt = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **HP, **extra)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=0.01)
                opt.train = opt.eval = lambda: None
                opt.move_from_ascent = lambda: None
                opt.move_to_ascent = lambda: opt.zero_grad(set_to_none=True)
            run_loop(model, opt, mode=mode, steps=1, dp_rank=dp_rank, dp_size=dp_size, final_eval=False, **loop_kw)
            with CommCounter() as cc:
                run_loop(model, opt, mode=mode, steps=1 + steps, start=1, dp_rank=dp_rank, dp_size=dp_size,
                         final_eval=False, **loop_kw)
            m[f"total_{which}"] = cc.total_calls
            if which == "ours":
                m["ours"] = [(c.name, c.shape) for c in cc.ours()]
                m["n_groups"] = len(opt.param_groups)
                with CommCounter() as cc:
                    opt.eval()
                    opt.train()
                    opt.eval()
                m["train_eval"] = cc.total_calls
    return out


def check_collectives(m: dict, per_step: int) -> None:
    """Ours: ``per_step`` all-reduces of G + 1 float64 (``m["stats_shape"]`` where given) per step and
    nothing else (also: the difference against AdamW in the same loop), none in train()/eval()."""
    want = tuple(m.get("stats_shape", (m["n_groups"] + 1,)))
    assert len(m["ours"]) == per_step * m["steps"], m["ours"]
    assert all(name == "all_reduce" and shape == want for name, shape in m["ours"]), m["ours"]
    assert m["total_ours"] - m["total_adamw"] == per_step * m["steps"], (m["total_ours"], m["total_adamw"])
    assert m["train_eval"] == 0, m["train_eval"]
