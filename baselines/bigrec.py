"""BIGRec: the bi-step grounding paradigm's own recipe, as a preset of `sft`.

Bao et al., "A Bi-Step Grounding Paradigm for Large Language Models in Recommendation
Systems" (arXiv 2308.08434); reference code SAI990323/BIGRec @bb4dd0a (README training
command, train.py, inference.py, data/movie/process.ipynb, data/movie/evaluate.py).

What differs from `sft` (CFT's recipe without its loss), each with its source in
`BIGRecParams`: LoRA r=8, alpha=16, dropout 0.05 on q_proj and v_proj; batch 128
(micro-batch 4, accumulation 32); up to 50 epochs with early stopping on the validation
loss (patience 5); 1,024 sampled training windows of exactly 10 history items; the loss on
prompt and answer (`--train_on_inputs`); then 4 beams, only the top beam embedded, by the
base (untuned) model, and L2 over the catalog.

Permanent departures (named in every run): the 8-bit base weights with fp16 autocast
become bf16 (8-bit loading needs bitsandbytes on CUDA), and length-grouped batches
(`--group_by_length`) are drawn in random order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from baselines.sft import SFT, SFTParams
from benchmark.hparams import hp
from benchmark.llm.fields import BUNDLED_LLM, QUANTIZE
from benchmark.llm.precision import PRECISIONS
from benchmark.recipes import Budget
from benchmark.registry import register_method

BIGREC = "SAI990323/BIGRec@bb4dd0a"


@dataclass
class BIGRecParams(SFTParams):
    """BIGRec's reference values; fields not listed keep SFT's declarations."""

    llm: str | None = hp(None, none=BUNDLED_LLM, reference="LLaMA-7B",
                         why="the bundled SmolLM2-135M-Instruct unless --llm names another",
                         source=f"{BIGREC} README --base_model YOUR_LLAMA_PATH; data/movie/evaluate.py LlamaForCausalLM")
    precision: str = hp("bf16", choices=PRECISIONS, reference="int8 base weights, fp16 autocast",
                        why="8-bit loading needs bitsandbytes on CUDA; bf16 is the nearest precision the harness runs",
                        source=f"{BIGREC} train.py:114 load_in_8bit=True, train.py:243 fp16=True")
    quantize: str = hp("none", choices=QUANTIZE, reference="8bit",
                       why="8-bit loading is not implemented; quantize=4bit (CUDA) is the nearest",
                       source=f"{BIGREC} train.py:114 load_in_8bit=True")
    history_len: int = hp(10, ge=1, source=f"{BIGREC} data/movie/process.ipynb cell 3 seq_len = 10")
    min_history: int = hp(10, ge=1, source=f"{BIGREC} data/movie/process.ipynb cell 3 range(10, len): exactly 10")
    train_on_inputs: bool = hp(True, source=f"{BIGREC} README --train_on_inputs")
    group_by_length: bool = hp(False, reference=True, why="not implemented: micro-batches are drawn in random order",
                               source=f"{BIGREC} README --group_by_length")
    lora: bool = hp(True, source=f"{BIGREC} README (LoRA) and train.py:166-170")
    lora_r: int = hp(8, ge=1, source=f"{BIGREC} README --lora_r 8")
    lora_alpha: int = hp(16, ge=1, source=f"{BIGREC} README --lora_alpha 16")
    lora_dropout: float = hp(0.05, ge=0, lt=1, source=f"{BIGREC} README --lora_dropout 0.05")
    lora_targets: str = hp("q_proj,v_proj", source=f"{BIGREC} README --lora_target_modules '[q_proj,v_proj]'")
    lr: float = hp(1e-4, gt=0, source=f"{BIGREC} README lr 1e-4")
    weight_decay: float = hp(0.0, ge=0, source=f"{BIGREC} train.py:234 TrainingArguments default weight_decay=0")
    max_grad_norm: float = hp(1.0, ge=0, source=f"{BIGREC} train.py:234 TrainingArguments default max_grad_norm=1")
    warmup_steps: int = hp(20, ge=0, source=f"{BIGREC} train.py:240 warmup_steps=20")
    epochs: int = hp(50, ge=1, source=f"{BIGREC} README --num_epochs 50")
    batch_size: int = hp(4, ge=1, source=f"{BIGREC} README --micro_batch_size 4")
    grad_accum: int = hp(32, ge=1, source=f"{BIGREC} README --batch_size 128 / --micro_batch_size 4 (train.py:90)")
    max_train_examples: int | None = hp(1024, ge=1, none="all", source=f"{BIGREC} README --sample 1024 (train.py:192)")
    early_stopping: str = hp("loss", choices=("loss", "ndcg", "none"),
                             source=f"{BIGREC} train.py:246 evaluation_strategy=epoch, load_best_model_at_end")
    valid_users: int | None = hp(5000, ge=1, none="all", source=f"{BIGREC} README --val_data_path valid_5000.json")
    patience: int = hp(5, ge=1, source=f"{BIGREC} train.py:258 EarlyStoppingCallback(early_stopping_patience=5)")
    l2_merge: str = hp("top_beam", choices=("round_robin", "top_beam", "min"), role="infer",
                       source=f"{BIGREC} data/movie/evaluate.py:46 predict[0] (the top beam only)")
    embed_model: str = hp("base", choices=("tuned", "base"), role="infer",
                          source=f"{BIGREC} data/movie/evaluate.py:19-25 embeds with the base model")
    num_beams: int = hp(4, ge=1, role="infer", source=f"{BIGREC} inference.py:98 num_beams=4")
    max_new_tokens: int = hp(128, ge=1, role="infer", source=f"{BIGREC} inference.py:99 max_new_tokens=128")
    min_new_tokens: int = hp(0, ge=0, role="infer", source=f"{BIGREC} inference.py: not set (0)")
    length_penalty: float = hp(1.0, role="infer", source=f"{BIGREC} inference.py: GenerationConfig default 1.0")


@register_method("bigrec")
class BIGRec(SFT):
    """BIGRec's recipe: LoRA SFT on 1,024 windows of 10 items; top beam grounded by L2 on base-model embeddings."""

    Params = BIGRecParams
    REFERENCE: ClassVar[str] = f"{BIGREC} (Bao et al. 2023, arXiv 2308.08434)"
    BUDGETS: ClassVar[dict[str, Budget]] = {
        "cpu": Budget(
            reason="an epoch (1,024 windows, ~211k tokens) with its validation took ~33 minutes on one thread of "
                   "the 2-core CPU beside another job (bench/RESULTS-llm.md); 50 epochs would take over a day; free "
                   "generation stops at 40 new tokens (the longest MovieLens answer is 31-35)",
            changes={"epochs": 10, "valid_users": 256, "max_new_tokens": 40},
        ),
    }
