"""One simulated rank of a device-mesh engine (fsdp2, hsdp, fsdp2-tp, hsdp-tp, pp-tp): fake group,
mesh, meta model, wrapping, the optimizer's measurements, the shape-rule checks and the memory
estimate (:func:`simulate_mesh`)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from . import engines, memory, models, shape_rule, world
from .measure import measure_optimizer

__all__ = ["simulate_mesh"]

_ONE_D = {"fsdp2": "dp", "hsdp": "shard"}  # the shard dim of the 1-D shape rule


def simulate_mesh(cfg: Dict[str, Any], engine: str, n: int, rank: int, *, mesh: Optional[Tuple[int, ...]] = None,
                  sam_mode: str = "one_pass", all_ranks: bool = False, flatten: bool = False,
                  build: Optional[Callable[[], Any]] = None, wrap: Optional[Callable[[Any, Any], tuple]] = None,
                  optimizer_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The report of rank ``rank`` of ``n``. ``build()`` (default: the HF model of ``cfg`` on meta) and
    ``wrap(model, root_mesh) -> (model, optimizer kwargs)`` (default: :func:`.engines.wrap`) let another
    model (the main job's GPT) be simulated; ``optimizer_kwargs``: its hyperparameters."""
    shape, names = world.mesh_shape(engine, n, mesh)
    world.init_fake(rank, n)
    try:
        root = world.make_mesh(shape, names)
        model = build() if build is not None else models.build_meta_model(cfg)
        if wrap is not None:
            model, opt_kwargs = wrap(model, root)
        else:
            model, opt_kwargs = engines.wrap(engine, model, root, flatten=flatten)
        opt_kwargs = dict(optimizer_kwargs or {}, **opt_kwargs)
        opt_kwargs.pop("sam_mode", None)
        report = measure_optimizer(model, sam_mode=sam_mode, opt_kwargs=opt_kwargs)
        report.update(engine=engine, world=n, rank=rank, mesh=list(shape), mesh_dims=list(names),
                      sam_mode=sam_mode, coordinate=list(root.get_coordinate()))
        params = list(model.parameters())
        if engine in _ONE_D and all(hasattr(p, "device_mesh") for p in params):
            dim = _ONE_D[engine]
            shard_n, i = root[dim].size(), root.get_coordinate()[names.index(dim)]
            shapes = [tuple(p.shape) for p in params]
            rule = sum(shape_rule.rows_on(s[0], shard_n, i) * (p.numel() // s[0]) for s, p in zip(shapes, params))
            report["shape_rule_local_elements"] = rule
            report["shape_rule_matches"] = rule == report["local_param_elements"]
            report["state_is_12x_local"] = report["state_bytes"] == 12 * report["local_param_elements"]
            if all_ranks:
                report["all_ranks"] = shape_rule.all_ranks_1d(shapes, shard_n)
                report["all_ranks"]["replicas_of_each_shard"] = n // shard_n
        else:
            report["state_is_12x_local"] = report["state_bytes"] == 12 * report["local_param_elements"]
            if all_ranks:
                raise ValueError(f"--all-ranks is for 1-D FSDP2 and HSDP (engine {engine})")
        report["memory"] = memory.mesh_estimate(report)
        return report
    finally:
        world.destroy()
