"""Command-line scripts of `trl_moe_rm` (training; the `trl-moe-rm` CLI wraps them)."""
