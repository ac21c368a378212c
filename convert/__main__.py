"""python -m convert: Hugging Face safetensors or GGUF -> llama_jax checkpoint, and checkpoint -> Hugging Face.

    python -m convert hf SRC_DIR DST_DIR [--dtype bfloat16|float16|float32] [--quantize int8] [--force]
    python -m convert gguf SRC.gguf DST_DIR [--dtype ...] [--quantize int8] [--force]
    python -m convert export CKPT_DIR DST_HF_DIR [--dtype ...] [--adapter LORA_DIR] [--force]

--quantize int8 stores the weights (embeddings and lm_head too) as int8 with one scale per output channel, about
half the bytes of bfloat16; norms and biases stay in --dtype. `infer` loads such a checkpoint as it is; `export`
writes its weights dequantized. `export --adapter` merges a PEFT LoRA adapter into the weights (W + scale * B A),
for tools that do not read adapters.
"""

import argparse
import sys

from llama_jax.checkpoints import export_hf, gguf_source, hf_source, open_checkpoint, to_checkpoint
from llama_jax.errors import exit_code
from llama_jax.model import QUANTIZATIONS

DTYPES = ("bfloat16", "float16", "float32")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, src, help_text in (("hf", "SRC_DIR", "HF LlamaForCausalLM directory -> checkpoint"),
                                 ("gguf", "SRC_GGUF", "llama-architecture GGUF file -> checkpoint"),
                                 ("export", "CKPT_DIR", "checkpoint -> HF LlamaForCausalLM directory")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("source", metavar=src)
        command.add_argument("destination", metavar="DST_DIR")
        command.add_argument("--dtype", choices=DTYPES,
                             help="weights dtype (default: the source's; float32 for GGUF)")
        command.add_argument("--force", action="store_true", help="replace an existing destination")
        if name == "export":
            command.add_argument("--adapter", metavar="LORA_DIR", help="merge this PEFT LoRA adapter into the weights")
        else:
            command.add_argument("--quantize", metavar="int8",
                                 help="store the weights quantized (int8: symmetric, one scale per output channel)")
    return parser.parse_args(argv)


def convert(args) -> int:
    if args.command == "export":
        out = export_hf(args.source, args.destination, dtype=args.dtype, force=args.force, adapter=args.adapter)
        if args.adapter is not None:
            print(f"note: merged the LoRA adapter {args.adapter} into the weights of {out}")
        quantization = open_checkpoint(args.source).quantization
        if quantization is not None:
            print(f"note: {args.source} holds {quantization} weights: {out} has them dequantized (values * scale), "
                  "not the weights it was quantized from")
    else:
        source = hf_source(args.source) if args.command == "hf" else gguf_source(args.source)
        out = to_checkpoint(source, args.destination, dtype=args.dtype, force=args.force, quantize=args.quantize)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if getattr(args, "quantize", None) not in (None, *QUANTIZATIONS):  # before any work: one line, exit 2
        print(f"error: unknown quantization {args.quantize!r}: choose from {', '.join(QUANTIZATIONS)}", file=sys.stderr)
        return 2
    return exit_code(lambda: convert(args), interrupted="interrupted; nothing was written")

if __name__ == "__main__":
    sys.exit(main())
