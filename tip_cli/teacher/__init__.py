"""The teacher's side of a step: its targets (targets: the in-process model's hidden states, or top-K log-probs from
an in-process vLLM engine, vllm, or from vLLM serve replicas, server; topk turns either's answer into tensors), the
scoring pass over them (scoring), and which of them a run uses (factory)."""
