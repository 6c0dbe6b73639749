"""Merge a LoRA adapter into its base model and save a standalone model folder.

    python finetune/merge.py --adapter outputs/smollm2-support --output_dir outputs/smollm2-merged

The base is loaded in full precision (merging into a 4-bit base is refused: the merged weights
would be rounded back to 4 bits). The result loads with `AutoModelForCausalLM.from_pretrained`
and carries the tokenizer, chat template and system prompt the adapter was trained with.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import supportlm
from supportlm.errors import SupportLMError
from supportlm.train.release.merge import merge_adapter


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model.")
    parser.add_argument("--adapter", required=True, help="Adapter folder written by train.py.")
    parser.add_argument("--output_dir", required=True, help="Where the merged model is saved.")
    parser.add_argument(
        "--model_name_or_path",
        help="Base model; default: the base recorded in the adapter's adapter_config.json.",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the merged weights (float32 keeps the adapter's update exactly).",
    )
    parser.add_argument(
        "--quantization",
        default="none",
        choices=["none", "4bit", "8bit"],
        help="Only none: merging into a quantised base is refused (the merged weights would "
        "be rounded back to 4 or 8 bits, losing most of the adapter).",
    )
    parser.add_argument("--push_to_hub", metavar="REPO", help="Also upload to this Hub repo.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    supportlm.setup_logging()
    args = parse_args(argv)
    try:
        if args.quantization != "none":
            raise SupportLMError(
                f"Refusing to merge into a {args.quantization} base: rounding the merged weights "
                f"back to {args.quantization} would lose most of the adapter; merge with "
                "--quantization none."
            )
        output_dir = merge_adapter(
            args.adapter,
            args.output_dir,
            model_name_or_path=args.model_name_or_path,
            dtype=args.dtype,
        )
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=args.push_to_hub, folder_path=str(output_dir))
            print(f"Uploaded {output_dir} to https://huggingface.co/{args.push_to_hub}")
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
