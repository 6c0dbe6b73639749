"""Fold a LoRA adapter into a full-precision copy of its base: a standalone model folder."""

from __future__ import annotations

import logging
from pathlib import Path

from supportlm.embedded import EMBEDDED_MODEL
from supportlm.errors import SupportLMError
from supportlm.modeling import load_model
from supportlm.prompts import ensure_chat_template, save_prompt_style
from supportlm.run_folder import RunFolder

logger = logging.getLogger(__name__)


def merge_adapter(
    adapter: str | Path,
    output_dir: str | Path,
    *,
    model_name_or_path: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Merge `adapter` (a run folder or ``latest``) into its base; save to `output_dir`.

    The base is loaded in full precision: merging into a 4-bit base would round the merged
    weights back to 4 bits and lose most of the adapter. The folder loads with
    `AutoModelForCausalLM.from_pretrained` alone and carries the tokenizer, chat template and
    system prompt the adapter was trained with.
    """
    from transformers import AutoTokenizer

    run = RunFolder.resolve(adapter)
    if not run.is_adapter():
        raise SupportLMError(f"{adapter} is not an adapter folder (no adapter_config.json).")
    base = model_name_or_path or run.base_model() or EMBEDDED_MODEL
    loaded = load_model(base, quantization="none", dtype=dtype, device="cpu", adapter=str(run.path))
    merged = loaded.model.merge_and_unload()
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    try:
        tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(run.path))
    except OSError:  # an adapter saved without its tokenizer: the base's is the right one
        tokenizer = loaded.tokenizer
    style = run.prompt_style()
    style.apply(tokenizer)
    save_prompt_style(output_dir, tokenizer, style.system_prompt)
    logger.info("Merged %s into %s; saved to %s", run.path, loaded.source.display_name, output_dir)
    return output_dir
