"""Kept for the imports that name it: the module is :mod:`sharded_msam_sf.deepspeed.ds_config`."""
from .deepspeed.ds_config import check_deepspeed_config, client_config, load_deepspeed_config

__all__ = ["load_deepspeed_config", "check_deepspeed_config", "client_config"]
