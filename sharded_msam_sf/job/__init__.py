"""The main job's building blocks (see sharded_msam_sf/train.py)."""
