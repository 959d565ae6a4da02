"""The main job's config, data and model pieces (single process, no process group)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sharded_msam_sf.job.config import ConfigError, JobConfig, load_config
from sharded_msam_sf.job.data import Batches, load_corpus
from sharded_msam_sf.job.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
JOB_CONFIGS = sorted(ROOT.glob("configs/job/*.json"))


def write(tmp_path, cfg: dict) -> Path:
    p = tmp_path / "job.json"
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    world = 8 if "gpu" in path.name else 2
    cfg = load_config(path, world_size=world)
    assert cfg.world_size == world
    assert cfg.dp_size * cfg.parallel.tp * cfg.parallel.pp == world
    assert cfg.grad_accum * cfg.train.micro_batch_size * cfg.dp_size == cfg.train.global_batch_size


def test_default_config_is_the_documented_one():
    cfg = load_config(ROOT / "configs/job/default.json", world_size=2)
    assert (cfg.engine.name, cfg.engine.zero_stage, cfg.engine.device, cfg.engine.backend) == \
        ("deepspeed", 2, "cpu", "gloo")
    assert cfg.optimizer_kwargs.get("sam_mode", "one_pass") == "one_pass"
    assert cfg.data.path is None  # the embedded corpus


@pytest.mark.parametrize("raw, key", [
    ({"train": {"max_step": 10}}, "train.max_step"),
    ({"trainer": {}}, "trainer"),
    ({"optimizer": {"type": "AdamWMSAMScheduleFree", "params": {"rhoo": 0.1}}}, "optimizer.params.rhoo"),
])
def test_unknown_key_is_named(tmp_path, raw, key):
    with pytest.raises(ConfigError, match=f"'?{key}'?.*unknown|unknown.*'{key}'"):
        load_config(write(tmp_path, raw), world_size=2)


@pytest.mark.parametrize("raw, key", [
    ({"train": {"max_steps": "10"}}, "train.max_steps"),
    ({"train": {"max_steps": 10.5}}, "train.max_steps"),
    ({"engine": {"activation_checkpointing": 1}}, "engine.activation_checkpointing"),
    ({"model": {"n_layer": True}}, "model.n_layer"),
    ({"engine": {"name": "megatron"}}, "engine.name"),
    ({"engine": {"zero_stage": 4}}, "engine.zero_stage"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({"model": {"n_embd": 65, "n_head": 4}}, "model.n_embd"),
    ({"optimizer": {"type": "AdamWMSAMScheduleFree", "params": {"lr": -1}}}, "optimizer.params.lr"),
    ({"engine": {"name": "ddp", "dtype": "fp16"}}, "engine.dtype"),
    ({"train": 3}, "train"),
])
def test_wrong_type_or_value_is_named(tmp_path, raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, raw), world_size=2)


def test_float_accepts_int(tmp_path):
    cfg = load_config(write(tmp_path, {"train": {"grad_clip": 2}}), world_size=1)
    assert cfg.train.grad_clip == 2.0 and isinstance(cfg.train.grad_clip, float)


@pytest.mark.parametrize("gbs, mbs, world, accum", [(16, 8, 2, 1), (16, 4, 2, 2), (16, 8, 1, 2), (48, 2, 3, 8)])
def test_batch_split(tmp_path, gbs, mbs, world, accum):
    cfg = load_config(write(tmp_path, {"train": {"global_batch_size": gbs, "micro_batch_size": mbs}}),
                      world_size=world)
    assert cfg.grad_accum == accum


@pytest.mark.parametrize("gbs, mbs, world", [(16, 8, 3), (10, 4, 1), (8, 8, 2)])
def test_impossible_batch_split(tmp_path, gbs, mbs, world):
    with pytest.raises(ConfigError, match=r"train\.global_batch_size.*multiple.*world size"):
        load_config(write(tmp_path, {"train": {"global_batch_size": gbs, "micro_batch_size": mbs}}),
                    world_size=world)


def test_world_size_comes_from_the_launcher_env(tmp_path, monkeypatch):
    path = write(tmp_path, {"train": {"global_batch_size": 16, "micro_batch_size": 8}})
    for v in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("RANK", "0")  # the launcher's rule (launch_env.discover): RANK says which variables count
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size \\(3\\)"):
        load_config(path)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    assert load_config(path).grad_accum == 1
    monkeypatch.delenv("PMI_RANK")  # a stray size without its launcher's rank is not a world size
    assert load_config(path).grad_accum == 2


def test_missing_data_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path.*not found"):
        load_config(write(tmp_path, {}), data_path=str(tmp_path / "nope.bin"), world_size=1)
    with pytest.raises(ConfigError, match=r"data\.val_path.*not found"):
        (tmp_path / "t.bin").write_bytes(b"\0\0" * 100)
        load_config(write(tmp_path, {"data": {"path": str(tmp_path / "t.bin"),
                                              "val_path": str(tmp_path / "v.bin")}}), world_size=1)
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "missing.json", world_size=1)


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["train.max_steps=7", "log.out_dir=/x/y", "engine.name=fsdp2",
                                            'optimizer.params.betas=[0.95, 0.99]'], world_size=1)
    assert cfg.train.max_steps == 7 and cfg.log.out_dir == "/x/y" and cfg.engine.name == "fsdp2"
    assert tuple(cfg.optimizer_kwargs["betas"]) == (0.95, 0.99)
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        load_config(write(tmp_path, {}), ["train.max_stepz=7"], world_size=1)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, {}), ["train.max_steps"], world_size=1)


def test_cli_config_error_exits_before_any_process_group(tmp_path):
    """A bad config ends the job with status 2 and a message naming the key, with no launcher
    variables set and nothing listening (init_process_group would otherwise wait for peers)."""
    path = write(tmp_path, {"train": {"global_batch_size": 16, "micro_batch_size": 8}})
    env = dict(os.environ, WORLD_SIZE="3", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="9")
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.train", "--config", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "config error" in proc.stderr and "train.global_batch_size" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.train", "--config", str(path),
                           "--override", "eval.every=3"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "eval.every" in proc.stderr


# ------------------------------------------------------------------ data
def test_embedded_corpus_split_is_deterministic_and_disjoint():
    cfg = load_config(None, world_size=1)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert len(a.val) > 10_000 and len(a.train) > 5 * len(a.val)
    assert a.unigram_baseline() > 2.0  # byte-level source: a few nats per byte without context


@pytest.mark.parametrize("world, mbs", [(1, 4), (2, 4), (4, 2), (2, 8)])
def test_global_batch_is_independent_of_world_size(world, mbs):
    """The union over ranks and micro-batches of step k's data is the same for every split."""
    def global_batch(world, mbs):
        cfg = load_config(None, ["train.global_batch_size=16", f"train.micro_batch_size={mbs}"], world_size=world)
        corpus = load_corpus(cfg)
        rows = []
        for rank in range(world):
            rows += [x for x, _ in Batches(corpus, cfg, rank, world).micro_batches(5, torch.device("cpu"))]
        return sorted(tuple(r.tolist()) for r in torch.cat(rows))
    ref = global_batch(1, 16)
    got = global_batch(world, mbs)
    assert len(got) == 16 and len(got[0]) == 64 and got == ref


def test_steps_draw_different_windows_and_targets_shift():
    cfg = load_config(None, world_size=2)
    b = Batches(load_corpus(cfg), cfg, 0, 2)
    (x0, y0), = b.micro_batches(0, torch.device("cpu"))
    (x1, _), = b.micro_batches(1, torch.device("cpu"))
    assert not torch.equal(x0, x1)
    assert torch.equal(x0[:, 1:], y0[:, :-1])


def test_eval_shares_are_equal_in_count_and_cover_the_set():
    cfg = load_config(None, ["eval.batches=5"], world_size=2)
    corpus = load_corpus(cfg)
    shares = [list(Batches(corpus, cfg, r, 2).eval_micro_batches(torch.device("cpu"))) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 3
    assert sum(w for s in shares for _, _, w in s) == 5


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file(tmp_path, dtype):
    tokens = (np.arange(20_000) * 7 % 1000).astype(dtype)
    tokens.tofile(tmp_path / "tokens.bin")
    cfg = load_config(write(tmp_path, {"data": {"dtype": dtype}, "model": {"vocab_size": 1000}}),
                      data_path=str(tmp_path / "tokens.bin"), world_size=1)
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 18_000 and len(corpus.val) == 2_000
    assert np.array_equal(corpus.val, tokens[18_000:])
    x, y = next(Batches(corpus, cfg, 0, 1).micro_batches(0, torch.device("cpu")))
    assert x.dtype == torch.int64 and int(x.max()) < 1000
    # a nanoGPT-style directory
    d = tmp_path / "owt"
    d.mkdir()
    tokens[:15_000].tofile(d / "train.bin")
    tokens[15_000:].tofile(d / "val.bin")
    cfg = load_config(write(tmp_path, {"data": {"dtype": dtype}, "model": {"vocab_size": 1000}}),
                      data_path=str(d), world_size=1)
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 15_000 and len(corpus.val) == 5_000


def test_token_file_errors(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    cfg = load_config(write(tmp_path, {"model": {"vocab_size": 300}}), data_path=str(tmp_path / "t.bin"),
                      world_size=1)
    with pytest.raises(ConfigError, match=r"model\.vocab_size.*token id 4999"):
        load_corpus(cfg)
    (tmp_path / "odd.bin").write_bytes(b"\0" * 1001)
    cfg = load_config(write(tmp_path, {}), data_path=str(tmp_path / "odd.bin"), world_size=1)
    with pytest.raises(ConfigError, match="whole number of uint16"):
        load_corpus(cfg)
    np.zeros(50, dtype=np.uint16).tofile(tmp_path / "tiny.bin")
    cfg = load_config(write(tmp_path, {}), data_path=str(tmp_path / "tiny.bin"), world_size=1)
    with pytest.raises(ConfigError, match="fewer than model.block_size"):
        load_corpus(cfg)


# ------------------------------------------------------------------ model
def test_gpt_is_causal_and_learns_shapes():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 256, (2, 16))
    logits = m(x)
    assert logits.shape == (2, 16, 256)
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256
    logits2 = m(x2)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-6)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    assert m.lm_head.weight is m.wte.weight
    loss = m(x, x)
    assert abs(loss.item() - np.log(256)) < 0.5


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    a, b = GPT(cfg), GPT(cfg, activation_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 16))
    a(x, x).backward()
    b(x, x).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


def test_gpu_config_is_about_1_3b_parameters():
    cfg = load_config(ROOT / "configs/job/gpt-1.3b-gpu.json", world_size=8)
    with torch.device("meta"):
        m = GPT(GPTConfig(**vars(cfg.model)))
    n = m.num_params()
    assert 1.2e9 < n < 1.45e9, n
    assert cfg.engine.dtype == "bf16" and cfg.engine.device == "cuda"


# ------------------------------------------------------------------ hostile configs (issue 14, item 7)
@pytest.mark.parametrize("text, key", [
    ('{"train": {"grad_clip": NaN}}', r"train\.grad_clip.*>= 0"),
    ('{"train": {"grad_clip": Infinity}}', r"train\.grad_clip.*finite"),
    ('{"train": {"seed": -1}}', r"train\.seed.*\[0, 2\*\*32 - 1\].*-1"),
    ('{"train": {"seed": 4294967296}}', r"train\.seed"),
    ('{"train": {"seed": 100000000000000000000000}}', r"train\.seed"),
    ('{"train": {"max_skipped_steps": -1}}', r"train\.max_skipped_steps"),
    ('{"train": {"max_steps": 5, "max_steps": 50}}', r"key 'max_steps' is given twice"),
    ('{"engine": {"name": "ddp"}, "engine": {"name": "fsdp2"}}', r"key 'engine' is given twice"),
    ('{"engine": {"name": "deepspeed", "deepspeed": {"optimizer": {"type": "Adam", "params": {}}}}}',
     r"engine\.deepspeed\.optimizer.*'optimizer' section"),
    ('{"engine": {"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 3}}}}',
     r"engine\.deepspeed\.zero_optimization\.stage.*engine\.zero_stage"),
    ('{"engine": {"name": "deepspeed", "deepspeed": {"gradient_clipping": 0}}}', r"train\.grad_clip"),
])
def test_hostile_config_is_refused(tmp_path, text, key):
    p = tmp_path / "job.json"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_config(p, world_size=2)


def test_nan_override_and_offload_override(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.grad_clip"):
        load_config(None, ["train.grad_clip=NaN"], world_size=2)
    cfg = load_config(None, ['engine.deepspeed={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}'],
                      world_size=2)  # DeepSpeed keys the job does not own are fine
    assert cfg.engine.deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ConfigError, match=r"log\.out_dir.*is a file, not a directory"):
            load_config(None, [f"log.out_dir={out}"], world_size=1)


@pytest.mark.parametrize("override, message", [
    ("train.seed=-5", "train.seed"),
    ("log.out_dir={file}", "is a file"),
    ("log.out_dir={shared}", "writable by every user"),
])
def test_cli_refuses_before_any_process_group(tmp_path, override, message):
    """Exit status 2 with launcher variables set and nothing listening: no process group was started."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "shared").mkdir(mode=0o777)
    os.chmod(tmp_path / "shared", 0o777)
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="9")
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.train",
                           "--config", str(ROOT / "configs/job/ddp-cpu.json"), "--override", override.format(file=tmp_path / "file", shared=tmp_path / "shared")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# ------------------------------------------------------------------ the JSON Schema (issue 17)
def test_shipped_schema_is_the_generated_one():
    """docs/job-config.schema.json is what --print-schema writes; regenerate it with
    `python -m sharded_msam_sf.train --print-schema > docs/job-config.schema.json`."""
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.train", "--print-schema"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads((ROOT / "docs/job-config.schema.json").read_text())


def _schema_keys(schema: dict, node: dict, prefix: str = "") -> set:
    """Every key path the schema describes (following $ref into $defs)."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    out = set()
    for k, sub in node.get("properties", {}).items():
        out.add(prefix + k)
        out |= _schema_keys(schema, sub, f"{prefix}{k}.")
    return out


def test_schema_describes_every_key_of_the_shipped_configs():
    from sharded_msam_sf.job.config import json_schema
    schema = json_schema()
    keys = _schema_keys(schema, schema)
    assert {"train.grad_clip", "log.tensorboard", "optimizer.type", "optimizer.params.rho",
            "engine.deepspeed"} <= keys

    def paths(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict) and prefix + k != "engine.deepspeed":
                yield from paths(v, f"{prefix}{k}.")
    for path in JOB_CONFIGS:
        missing = set(paths(json.loads(path.read_text()))) - keys
        assert not missing, (path.name, missing)
    assert schema["$defs"]["TrainConfig"]["additionalProperties"] is False  # unknown keys are errors
    assert schema["$defs"]["OptimizerParams"]["properties"]["sam_mode"]["enum"] == ["one_pass", "two_pass"]


def test_config_reads_as_attributes_and_dumps_to_plain_json(tmp_path):
    cfg = load_config(None, ["optimizer.params.betas=[0.9, 0.95]", "engine.name=fsdp2"], world_size=2)
    assert isinstance(cfg, JobConfig)
    assert GPTConfig(**vars(cfg.model)) == GPTConfig()
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # what a checkpoint stores
    assert d["optimizer"] == {"type": "AdamWMSAMScheduleFree", "params": {"betas": [0.9, 0.95]}}
    assert d["engine"]["name"] == "fsdp2" and "world_size" not in d and "grad_accum" not in d
    assert cfg.optimizer_kwargs == {"betas": (0.9, 0.95)}
    assert isinstance(cfg.log.tensorboard, bool)


def test_every_error_is_reported_with_its_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.dropout=1.5", "train.seed=-1", "eval.batches=0"], world_size=1)
    msg = str(err.value)
    assert "'model.dropout'" in msg and "1.5" in msg and "less than 1" in msg
    assert "'train.seed'" in msg and "'eval.batches'" in msg


def test_a_schema_pointer_for_editors_is_accepted(tmp_path):
    """A top-level "$schema" (what editors read) is allowed and ignored; it must be a string."""
    p = write(tmp_path, {"$schema": "../docs/job-config.schema.json", "train": {"max_steps": 7}})
    assert load_config(p, world_size=2).train.max_steps == 7
    with pytest.raises(ConfigError, match=r"'\$schema' must be a string"):
        load_config(write(tmp_path, {"$schema": 3}), world_size=2)
    with pytest.raises(ConfigError, match="schema_ref|unknown|not permitted|extra"):
        load_config(write(tmp_path, {"train": {"$schema": "x"}}), world_size=2)
