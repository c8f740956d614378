"""The offline quickstart: batched generation and chat with the embedded default model."""
from llmserve import LLM, SamplingParams

prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
llm = LLM()  # SmolLM2-135M-Instruct, embedded
for output in llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=32)):
    print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0))
print(answer[0].outputs[0].text)
