"""The orchestrator: the one place that wires the roles together (STYLE principle 14).

``loop`` runs OAPL (the step loop, the sync schedule, checkpoints, export); ``records`` turns scored groups into the
trainer's records; ``evaluation`` measures the served policy on held-out prompts; ``offline_eval`` is ``oapl-eval``'s
pass@k evaluation of a checkpoint; ``metrics`` writes metrics.jsonl/TensorBoard/console; ``warmstart`` is the demo's
supervised warm start. trainer/ and rollout/ never import each other (tests/test_walls.py).
"""
