"""A model architecture: checkpoints whose config.json says architectures=["ExampleLlamaForCausalLM"]."""
from llmserve.models.llama import LlamaForCausalLM


class ExampleLlamaForCausalLM(LlamaForCausalLM):
    """A Llama variant published under its own architecture name; a real plugin overrides layers or load_weights."""
