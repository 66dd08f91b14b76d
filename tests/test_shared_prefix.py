"""Shared-prompt attention against the model's own attention, on architectures with more than
Llama's: Gemma-2 (logit soft-capping, alternating sliding-window layers), Mistral (a sliding
window), and a model it cannot reproduce (attention sinks), which falls back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.llm.decoding import ItemTrie, constrained_beam_search, generate_free
from benchmark.llm.kv_cache import cache_kwargs, output_cache
from benchmark.llm.shared_prefix import SharedPrefix, SharedPromptUnsupported, shared_prefix_attention

EOS, PAD = 1, 0
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2)


def build(kind: str):
    """A random-init tiny model of `kind` (built from a config: no download), with attention
    weights scaled up so that scores are large enough for soft-capping and windows to matter."""
    model = _build(kind)
    with torch.no_grad():
        for layer in model.model.layers:
            for name, factor in (("q_proj", 8.0), ("k_proj", 8.0), ("v_proj", 20.0)):
                getattr(layer.self_attn, name).weight.mul_(factor)
    return model


def _build(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gemma2":
        # window 4 < prompt length, so the sliding layers mask part of the prompt;
        # small soft-caps so tanh bends the scores
        cfg = tf.Gemma2Config(**COMMON, head_dim=8, sliding_window=4, attn_logit_softcapping=0.5,
                              final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                              attn_implementation="eager")
        return tf.Gemma2ForCausalLM(cfg).eval()
    if kind == "mistral":
        cfg = tf.MistralConfig(**COMMON, sliding_window=4, attn_implementation="eager")
        return tf.MistralForCausalLM(cfg).eval()
    cfg = tf.LlamaConfig(**COMMON)
    return tf.LlamaForCausalLM(cfg).eval()


def items_and_prompts():
    rng = np.random.default_rng(3)
    items = [list(map(int, rng.integers(3, 20, size=rng.integers(1, 6)))) for _ in range(25)]
    prompts = [list(map(int, rng.integers(3, 64, size=n))) for n in (9, 4, 12, 7)]
    return items, prompts


@pytest.mark.parametrize("kind", ["gemma2", "mistral", "llama"])
def test_constrained_search_shared_equals_replicated(kind, caplog):
    model = build(kind)
    items, prompts = items_and_prompts()
    trie = ItemTrie.build(items, EOS)
    exclude = [np.array([0, 4]), np.array([], dtype=np.int64), np.array([7]), np.array([1, 2, 3])]
    runs = [constrained_beam_search(model, prompts, trie, num_beams=4, k=6, exclude=exclude, pad_id=PAD,
                                    progress=False, batch_size=4, shared_prompt=flag) for flag in (True, False)]
    for shared, copied in zip(*runs):
        assert [i for i, _ in shared] == [i for i, _ in copied]
        np.testing.assert_allclose([s for _, s in shared], [s for _, s in copied], atol=1e-5)
    assert "shared_prompt=False" not in caplog.text  # the shared attention ran, no fallback


@pytest.mark.parametrize("kind", ["gemma2", "mistral"])
def test_free_generation_shared_equals_replicated(kind, caplog):
    model = build(kind)
    _, prompts = items_and_prompts()
    runs = [generate_free(model, prompts, max_new_tokens=8, num_beams=3, pad_id=PAD, eos_id=EOS, batch_size=4,
                          progress=False, shared_prompt=flag) for flag in (True, False)]
    assert runs[0] == runs[1]
    assert "shared_prompt=False" not in caplog.text


def test_sliding_window_and_softcap_change_the_scores():
    """The equality above would be vacuous if the window and cap changed nothing here."""
    model = build("gemma2")
    items, prompts = items_and_prompts()
    trie = ItemTrie.build(items, EOS)
    kwargs = dict(num_beams=4, k=6, exclude=None, pad_id=PAD, progress=False, shared_prompt=False)
    base = constrained_beam_search(model, prompts, trie, **kwargs)
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
        layer.self_attn.sliding_window = None
    plain = constrained_beam_search(model, prompts, trie, **kwargs)
    assert any(abs(a[1] - b[1]) > 1e-3 for x, y in zip(base, plain) for a, b in zip(x, y))


def test_attention_sinks_are_refused():
    query = torch.zeros(2, 4, 1, 8)
    ctx = SharedPrefix([(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))], torch.ones(1, 3))
    module = type("Attn", (), {"layer_idx": 0})()
    with pytest.raises(SharedPromptUnsupported, match="sinks"):
        shared_prefix_attention(module, query, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8), None,
                                shared_prefix=ctx, s_aux=torch.zeros(4))


def test_a_model_that_bypasses_the_interface_falls_back(caplog):
    """A model whose attention ignores transformers' AttentionInterface decodes with the
    per-beam cache (and says so) instead of failing."""
    model = build("llama")
    items, prompts = items_and_prompts()
    trie = ItemTrie.build(items, EOS)
    want = constrained_beam_search(model, prompts, trie, num_beams=3, k=4, exclude=None, pad_id=PAD,
                                   progress=False, shared_prompt=False)
    from transformers.models.llama import modeling_llama

    original = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface

    def own_attention(name, default):  # what a model with hard-wired attention does
        return original("sdpa", default)

    modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface = own_attention
    try:
        got = constrained_beam_search(model, prompts, trie, num_beams=3, k=4, exclude=None, pad_id=PAD,
                                      progress=False, shared_prompt=True)
    finally:
        modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface = original
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    assert "shared_prompt=False" in caplog.text


def test_cache_keyword_follows_the_forward_signature():
    model = build("llama")
    name = next(iter(cache_kwargs(model, None)))
    import inspect

    assert name in inspect.signature(type(model).forward).parameters
    ids = torch.tensor([[3, 4, 5]])
    out = model(input_ids=ids, use_cache=True)
    assert output_cache(out) is not None and output_cache(out).get_seq_length() == 3


@pytest.mark.parametrize("kind", ["gemma2", "llama"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_shares_the_prompt_cache_without_changing_samples(kind, temperature, caplog):
    """CALRec's sampler keeps one prompt cache per user; its samples and log-probs equal those
    drawn with the cache copied per sample (the earlier implementation), seed for seed."""
    from benchmark.llm.sampling import sample_generations

    model = build(kind)
    _, prompts = items_and_prompts()
    kwargs = dict(n_samples=5, temperature=temperature, max_new_tokens=6, pad_id=PAD, eos_id=EOS,
                  batch_size=3, seed=11, progress=False)
    shared = sample_generations(model, prompts, shared_prompt=True, **kwargs)
    copied = sample_generations(model, prompts, shared_prompt=False, **kwargs)
    assert [[s for s, _ in user] for user in shared] == [[s for s, _ in user] for user in copied]
    np.testing.assert_allclose([lp for user in shared for _, lp in user],
                               [lp for user in copied for _, lp in user], atol=1e-4)
    assert "shared_prompt=False" not in caplog.text
    if temperature:
        assert len({tuple(s) for s, _ in shared[0]}) > 1  # samples differ: the comparison is not vacuous
