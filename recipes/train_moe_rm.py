# /// script
# dependencies = [
#     "trl-moe-rm",
#     "peft",
# ]
# ///
"""
Train a sparse Mixture-of-Experts reward model (thin launcher around `trl_moe_rm.scripts.train`).

```bash
python recipes/train_moe_rm.py --config recipes/configs/minilm_controlled.yaml
accelerate launch --config_file trl_moe_rm/accelerate_configs/zero3.yaml recipes/train_moe_rm.py \
    --config recipes/configs/qwen2.5-0.5b_ultrafeedback.yaml
```

Run `python recipes/train_moe_rm.py --help` for every option; see docs/recipes.md.
"""

from trl_moe_rm.scripts.train import cli, main, make_parser


__all__ = ["main", "make_parser"]


if __name__ == "__main__":
    cli()
