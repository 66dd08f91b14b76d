"""The LLM layer shared by every LLM method (SFT, CFT, LlamaRec, CALRec, P2Rec).

Modules, each with one job:

- ``loading``:  `load_llm` (hub id, local directory or GGUF file; the bundled SmolLM2 by
  default), the `LLM` bundle (model, tokenizer, eos/pad ids) and `tiny_llm` for tests.
- ``prompts``:  prompt templates as data, item text, and the tokenization that training
  and decoding share (`prompt_ids`, `response_ids`, `encode_example`).
- ``training``: the fine-tuning loop (LoRA or full), logits only at labelled positions,
  checkpoints and resume.
- ``decoding``: constrained beam search over a trie of catalog item texts, free generation,
  pooled hidden-state embeddings.

This package module imports nothing heavy; import the submodule you need.
"""
