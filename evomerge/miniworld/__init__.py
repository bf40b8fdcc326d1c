"""The mini-world: a tiny, honest analogue of EvoLLM-JP's Table 1 that runs on a laptop CPU.

Questions are always posed in Japanese (``23たす38は？``); a response counts only when its last
number is right *and* it is written in Japanese (``こたえ: 61です。``), exactly the metric of the
real ja_math evaluator. The world holds a tiny Llama base (both skills latent but weak), a
Japanese-style specialist A (always answers in Japanese, weak at carries) and a math specialist B
(accurate at carries, answers in English ``answer: 61``). Neither source scores well; a merge that
takes A's response language and B's arithmetic does.

    tokenizer.py  character-level tokenizer saved as a Hugging Face tokenizer
    tasks.py      deterministic task generators and the search/test/dev splits (JSONL)
    train.py      a small trainer for the tiny LlamaForCausalLM
    build.py      base + specialists, built once into a cache and reused
"""

VERSION = "v2"
