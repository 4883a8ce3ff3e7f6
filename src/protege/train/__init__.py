"""Training methods, one module each (`sft`, `rm`, `dpo`, `rs`, `ppo`, `grpo`): a config, its batches and its loss.

They share one loop (`fit.py`: accelerate, accumulation, eval, checkpoints, resume), pure losses (`losses.py`,
`rl_losses.py`), the policy as a token scorer (`policy.py`), a run's state (`state.py`: optimizer, schedule,
checkpoints, metrics) and model setup (`model.py`: LoRA / full, precision, quantization).
"""
