"""Optional experiment trackers beside TensorBoard (rank 0 only), behind pip extras:

* ``log.wandb: true`` — a Weights & Biases run (``pip install 'sharded_msam_sf[wandb]'``): the
  config as the run's config, every scalar the TensorBoard writer gets, under ``out_dir/wandb``.
  ``WANDB_MODE=offline`` (or ``log.wandb_mode: "offline"``) writes the run to disk only
  (``wandb sync`` uploads it later); project ``log.wandb_project``.
* ``log.mlflow: true`` — an MLflow run (``pip install 'sharded_msam_sf[mlflow]'``): the config
  flattened to params (``engine.name``, ``optimizer.params.lr``, ...), the scalars as metrics
  (``train/loss`` → ``train_loss``: MLflow's names), tracking URI ``MLFLOW_TRACKING_URI`` or
  ``out_dir/mlruns`` (a local file store, no server; ``MLFLOW_ALLOW_FILE_STORE=true`` is set for it,
  MLflow 3 refuses the file store otherwise).

:class:`Writers` sends the same ``scalars(step, {tag: value})`` to each of them and to the
TensorBoard writer, and the config once (``hparams``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional


def flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists and None as JSON text (trackers take scalars and strings)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


class WandbWriter:
    def __init__(self, out_dir: Path, config: dict, project: str, mode: Optional[str]):
        import wandb
        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, dir=str(out_dir), config=config, name=out_dir.name,
                              mode=mode or os.environ.get("WANDB_MODE") or "online", reinit="create_new")

    def scalars(self, step: int, values: dict) -> None:
        self.run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def hparams(self, config: dict, final: dict) -> None:
        self.run.summary.update({k: v for k, v in final.items() if v is not None})

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MlflowWriter:
    def __init__(self, out_dir: Path, config: dict, experiment: str):
        import mlflow
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store, no server, no database package (MLflow 3 asks for this opt-in)
            uri = (out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=out_dir.name)
        params = flatten(config)
        keys = list(params)
        for i in range(0, len(keys), 100):  # MLflow's batch limit
            mlflow.log_params({k: str(params[k])[:500] for k in keys[i:i + 100]})

    @staticmethod
    def _name(tag: str) -> str:
        return tag.replace("/", "_")

    def scalars(self, step: int, values: dict) -> None:
        metrics = {self._name(k): float(v) for k, v in values.items() if v is not None}
        if metrics:
            self.mlflow.log_metrics(metrics, step=step)

    def hparams(self, config: dict, final: dict) -> None:
        self.scalars(int(final.get("final_step") or 0), {f"final/{k}": v for k, v in final.items()
                                                       if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.mlflow.end_run()


class Writers:
    """The TensorBoard writer (``board``) and the optional trackers, one interface: ``writer`` is
    truthy when any is on (the loop then computes the per-step scalars)."""

    def __init__(self, board, cfg, out_dir: Path, enabled: bool):
        self.board = board
        self.others: List[Any] = []
        if enabled:
            config = cfg.to_dict()
            if cfg.log.wandb:
                self.others.append(WandbWriter(out_dir, config, cfg.log.project, cfg.log.wandb_mode))
            if cfg.log.mlflow:
                self.others.append(MlflowWriter(out_dir, config, cfg.log.project))
            if board.writer is not None:  # the config as text (readable at once) and, at the end, as hparams
                board.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    @property
    def writer(self):
        return self.board.writer or (self.others or None)

    def scalars(self, step: int, values: dict) -> None:
        self.board.scalars(step, values)
        for w in self.others:
            w.scalars(step, values)

    def hparams(self, config: dict, final: dict) -> None:
        """The config (flattened) with the run's final numbers: TensorBoard's HPARAMS tab, W&B's summary,
        MLflow's final metrics."""
        if self.board.writer is not None:
            metrics = {f"final/{k}": float(v) for k, v in final.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
            self.board.writer.add_hparams(flatten(config), metrics, run_name="hparams")
        for w in self.others:
            w.hparams(config, final)

    def flush(self) -> None:
        self.board.flush()
        for w in self.others:
            w.flush()

    def close(self) -> None:
        self.board.close()
        for w in self.others:
            w.close()
        self.others = []
