"""Security across the chain.

- Request path and artifacts (leaves: they import only `trustmoe.io` and `trustmoe.config`):
  the prompt-injection guard, decoding of smuggled encodings, tool policy, file manifests,
  signing and safetensors header validation.
- Model audits (they may import `model`, `engine`, `train`, `eval`): privacy (canaries,
  extraction, membership inference), backdoor detection and differentially private training.
"""
