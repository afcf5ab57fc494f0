"""`vllm-gateway plan`: the command line, from arguments to the printed plan."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence

from gateway.plan import render
from gateway.plan.architecture import read_architecture
from gateway.plan.budget import IN_FLIGHT_BATCHES, Instance, build
from gateway.plan.gpus import known_names, parse_gpus
from gateway.plan.kv import GPU_KERNEL_BLOCK_MULTIPLE
from gateway.plan.locate import locate
from gateway.plan.overheads import Overrides
from gateway.plan.placement import place, with_fixes
from gateway.plan.request import KEYS_HELP, ModelRequest, parse_model
from gateway.plan.sizes import parse_size
from gateway.plan.weights import computed, read

MODEL_HELP = f"Each --model is one vLLM instance: PATH_OR_ID[,key=value...], keys: {KEYS_HELP}."
EPILOG = f"""\
{textwrap.fill(MODEL_HELP, 90)}

A Hugging Face id must already be in the local cache; nothing is downloaded. Sizes are in
GiB unless they carry a unit (0.5, 900MiB, 80GiB). Known GPU names:
{known_names()}.

Exit status: 0 when every instance fits, 1 when not (the output says by how much and what
would fit), 2 for bad arguments.

Example: vllm-gateway plan --gpus 1xH100-80GB \\
             --model meta-llama/Llama-3.1-8B-Instruct,len=32768,seqs=4 \\
             --model Qwen/Qwen2.5-7B-Instruct,len=32768,seqs=4
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-gateway plan",
        description="How to set --gpu-memory-utilization when several vLLM servers share GPUs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--gpu",
        action="append",
        default=[],
        metavar="SIZE|NAME",
        help="one GPU: 79.18GiB or H100-80GB (repeatable)",
    )
    add(
        "--gpus",
        action="append",
        default=[],
        metavar="NxSIZE|NxNAME",
        help="several alike: 4x80GiB, 2xA100-40GB",
    )
    add(
        "--model",
        action="append",
        default=[],
        metavar="PATH_OR_ID[,k=v...]",
        help="one vLLM instance (repeatable)",
    )
    add(
        "--format",
        choices=("text", "json", "script"),
        default="text",
        help="text (default), json, or a start script",
    )
    add("--json", action="store_const", const="json", dest="format", help="same as --format json")
    add("--host", default="127.0.0.1", help="host for GATEWAY_BACKENDS (default 127.0.0.1)")
    add(
        "--base-port",
        type=int,
        default=8000,
        metavar="PORT",
        help="first port; one per instance (default 8000)",
    )
    add("--reserve-gib", default="0", metavar="SIZE", help="memory to leave alone on every GPU")
    estimates = parser.add_argument_group(
        "estimates (defaults come from published vLLM logs; pass the figures your own logs print)"
    )
    for flag, what in (
        ("--activation-gib", "activation peak of the profile run"),
        ("--non-torch-gib", "non-torch memory growth during profiling"),
        ("--cudagraph-gib", 'CUDA graphs ("Estimated CUDA graph memory")'),
        ("--context-gib", "CUDA context per process"),
        ("--nccl-gib", "NCCL and all-reduce buffers per process under tensor parallelism"),
        ("--margin-gib", "safety margin per process"),
    ):
        estimates.add_argument(flag, metavar="SIZE", help=what)
    advanced = parser.add_argument_group("advanced")
    advanced.add_argument(
        "--in-flight-batches",
        type=int,
        default=IN_FLIGHT_BATCHES,
        metavar="N",
        help="batches in flight (2: async scheduling, vLLM's default on GPUs; 1 without)",
    )
    advanced.add_argument(
        "--kernel-block-multiple",
        type=int,
        default=GPU_KERNEL_BLOCK_MULTIPLE,
        metavar="N",
        help="attention kernel block granularity (16: FlashAttention; 32: vLLM's CPU backend)",
    )
    return parser


def _size_or_none(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help, or argparse's own usage error
        return int(exc.code or 0)
    env = os.environ if environ is None else environ
    try:
        if not args.model:
            raise ValueError("give at least one --model")
        if not args.gpu and not args.gpus:
            raise ValueError(
                f"give the GPUs: --gpu 79.18GiB, --gpus 2x80GiB, or a name ({known_names()})"
            )
        if not 1 <= args.in_flight_batches <= 8 or not 1 <= args.kernel_block_multiple <= 4096:
            raise ValueError("--in-flight-batches must be 1..8 and --kernel-block-multiple 1..4096")
        gpus = parse_gpus(args.gpu, args.gpus)
        overrides = Overrides(
            activation=_size_or_none(args.activation_gib),
            non_torch=_size_or_none(args.non_torch_gib),
            cudagraph=_size_or_none(args.cudagraph_gib),
            context=_size_or_none(args.context_gib),
            nccl=_size_or_none(args.nccl_gib),
            margin=_size_or_none(args.margin_gib),
        )
        reserve = parse_size(args.reserve_gib)
        requests = [parse_model(text) for text in args.model]

        def rebuild(old: Instance, request: ModelRequest) -> Instance:
            return build(
                old.index,
                request,
                old.arch,
                old.weights,
                gpus,
                overrides,
                in_flight_batches=args.in_flight_batches,
                kernel_multiple=args.kernel_block_multiple,
            )

        instances = []
        for index, request in enumerate(requests):
            files = locate(request.model, env)
            arch = read_architecture(files.config, dtype=request.dtype)
            weights = read(list(files.safetensors), arch) if files.safetensors else computed(arch)
            instances.append(
                build(
                    index,
                    request,
                    arch,
                    weights,
                    gpus,
                    overrides,
                    in_flight_batches=args.in_flight_batches,
                    kernel_multiple=args.kernel_block_multiple,
                )
            )
        plan = place(gpus, instances, reserve=reserve, base_port=args.base_port)
        plan = with_fixes(plan, gpus, instances, rebuild, reserve=reserve, base_port=args.base_port)
    except ValueError as exc:
        print(f"vllm-gateway plan: {exc}", file=sys.stderr)
        return 2
    output = {"json": render.as_json, "script": render.as_script}.get(args.format, render.as_text)
    print(output(plan, args.host), end="" if args.format != "json" else "\n")
    return 0 if plan.fits else 1
