"""What a checkpoint is and how its networks compute: config and presets, the encoder and its resampler, the reverse
transformer, the GPT-2 decoder, the noise schedule, checkpoints and what a model folder may hold."""
