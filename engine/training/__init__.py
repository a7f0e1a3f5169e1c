"""Training: the two stages (train), their saved state, conditions in training, reading data, and the plain GPT-2
baseline."""
