"""Training recipes (TRL SFT, GRPO with tool environments, DPO; locally or on Ray Train).

The recipes live beside the strategies they train; see the README's training section for what exists.
"""
