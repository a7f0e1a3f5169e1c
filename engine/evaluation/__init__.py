"""Scoring: metrics (MAUVE, BLEU, Div, Mem), `ldlm eval`, E2E's slot error rate, the demo's self-check."""
