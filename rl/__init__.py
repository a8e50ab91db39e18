"""Training recipes (installed as ``foveate.rl``; only the CLI imports them, never a strategy).

- `rl.sft`: supervised fine-tuning with transformers' `Trainer` on chats from the synthetic world (`rl.sft_data`),
  with the auxiliary losses the demo model's recipe uses (`rl.vision_aux`, `rl.attention_supervision`):
  `foveate train sft --config configs/demo.yaml` rebuilds the demo model.
- `rl.trl_sft`: TRL's `SFTTrainer` on conversational rows (`foveate train sft --data rows.jsonl`), e.g. the visual
  program distillation rows of `rl.vpd_distill` (`foveate vpd distill`).
- `rl.deepeyes_grpo`: DeepEyes — TRL `GRPOTrainer` with a zoom-tool environment and the rewards of `rl.rewards`
  (`foveate train grpo --config configs/rl/deepeyes.yaml`).
- `rl.visrl_dpo`: VisRL — self-generated focus-box preferences and TRL `DPOTrainer` in two stages
  (`foveate train dpo --config configs/rl/visrl.yaml`).
- `rl.ray_train`: the same recipes on Ray Train (`--ray-workers N`, `--ray-address ADDR`); `rl.runs` and `rl.plot`:
  run directories, per-step metrics and `foveate plot RUN_DIR`.
"""
