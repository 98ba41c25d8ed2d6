"""One LightningModule per algorithm (SFT, reward modelling, DPO, PPO, GRPO, ReMax)."""
