"""
Benchmarks of trl_moe_rm and the code only they use: baselines (`baselines.py`), real-data loaders (`dsp.py`,
`real_datasets.py`) and interval helpers (`stats.py`). Not part of the installed package: run the scripts from the
repository root as modules, e.g. `python -m benchmarks.real_data`.
"""
