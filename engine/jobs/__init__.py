"""Work over many inputs: batch jobs (batch), on Ray (ray_jobs), and `ldlm bench` (benchmark)."""
