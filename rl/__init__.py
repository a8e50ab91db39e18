"""Training: supervised fine-tuning (`rl.sft`, transformers `Trainer`, on one machine) of a VLM on chats from the
synthetic world (`rl.sft_data`), with the auxiliary losses the demo model's recipe uses (`rl.vision_aux`,
`rl.attention_supervision`). `foveate train sft --config configs/demo.yaml` rebuilds the demo model.
"""
