"""The teacher's side of the loss when it is not the in-process model: top-K log-probs from an in-process vLLM
engine (vllm) or from vLLM serve replicas (server)."""
