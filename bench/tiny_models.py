"""Make tiny random-weight Llama models that real vLLM can serve on a CPU.

No model can be downloaded on this machine, so benchmarks and end-to-end tests serve
models made here: a byte-level BPE tokenizer trained on synthetic text and a 2-layer
Llama with random weights. They write gibberish, but vLLM treats them like any model
(chat template, streaming, usage, /metrics, aborts). Everything is deterministic: the
tokenizer is the same for every seed, the weights depend only on the seed.

Runs inside the vLLM venv (needs torch, tokenizers, transformers; see install_vllm.sh):

    python bench/tiny_models.py OUTDIR --seed 0
    python bench/tiny_models.py DIR_A DIR_B --seed 0       # seeds 0 and 1
    python bench/tiny_models.py DIR_A DIR_B --seed 7 3     # one seed per dir

A directory that already holds a model made with the same seed and spec is skipped.

Random weights put EOS at roughly 1/vocab per token, so generations stop early at
random; send `"ignore_eos": true` (a vLLM extension) when a request must run to max_tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# The marker names what built the directory; a mismatch (older format, other seed) rebuilds it.
MARKER = "tiny_model.json"
FORMAT_VERSION = 1

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# Roles are plain text, not special tokens, so the 512-token vocabulary stays mostly BPE merges.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of the model; about 3 MB of bfloat16 weights at the defaults."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 2048
    corpus_lines: int = 4000


_SUBJECTS = (
    "the gateway",
    "a replica",
    "the router",
    "each client",
    "the scheduler",
    "a worker",
    "the server",
    "this request",
    "the stream",
    "an engine",
    "the queue",
    "my model",
)
_VERBS = (
    "sends",
    "reads",
    "forwards",
    "waits for",
    "retries",
    "drops",
    "counts",
    "streams",
    "balances",
    "returns",
    "caches",
    "measures",
    "rejects",
    "accepts",
    "closes",
)
_OBJECTS = (
    "the tokens",
    "a response",
    "every chunk",
    "the headers",
    "its metrics",
    "the prompt",
    "a timeout",
    "the error",
    "one connection",
    "the backlog",
    "new requests",
    "the usage",
)
_TAILS = (
    "quickly.",
    "again.",
    "before the deadline.",
    "under load.",
    "on port 8000.",
    "without copying.",
    "in order.",
    "when it is healthy.",
    "for the user.",
    "at once!",
    "after 3 tries.",
    "and then stops.",
    "?",
    "as JSON.",
)
_CODE = (
    "def {w}(x: int) -> int:\n    return x + {n}",
    "if {w} is None:\n    raise ValueError('{w}')",
    "{w} = [{n}, {m}, {n}]",
    "for {w} in range({n}):\n    print({w})",
    '{{"model": "{w}", "max_tokens": {n}}}',
    "async def {w}():\n    await send({n})",
)
_NAMES = ("token", "replica", "stream", "chunk", "usage", "model", "port", "queue", "health")


def corpus(lines: int) -> Iterator[str]:
    """Synthetic English-ish prose, code and JSON; fixed seed so the tokenizer never changes."""
    rng = random.Random(20240601)
    for _ in range(lines):
        if rng.random() < 0.25:
            yield rng.choice(_CODE).format(
                w=rng.choice(_NAMES), n=rng.randint(0, 999), m=rng.randint(0, 99)
            )
        else:
            words = [
                rng.choice(_SUBJECTS),
                rng.choice(_VERBS),
                rng.choice(_OBJECTS),
                rng.choice(_TAILS),
            ]
            yield " ".join(words).capitalize()


def train_tokenizer(spec: TinySpec, outdir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[BOS, EOS, PAD],
        # Every byte in the vocabulary, so any prompt (emoji, CJK) tokenizes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(spec.corpus_lines), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=spec.max_position_embeddings,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(outdir)


def write_model(spec: TinySpec, outdir: Path, *, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=0,  # BOS, EOS, PAD are the trainer's first special tokens, in that order
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    # Initialise in float32 and cast, so the weights do not depend on bf16 kernels.
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(outdir)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(outdir)


def marker_for(spec: TinySpec, seed: int) -> dict[str, object]:
    return {"format": FORMAT_VERSION, "seed": seed, "spec": dataclasses.asdict(spec)}


def is_made(outdir: Path, *, seed: int, spec: TinySpec = TinySpec()) -> bool:
    try:
        return bool(json.loads((outdir / MARKER).read_text()) == marker_for(spec, seed))
    except (OSError, ValueError):
        return False


def make_tiny_model(outdir: Path, *, seed: int, spec: TinySpec = TinySpec()) -> bool:
    """Make the model at outdir; False if an identical one is already there.

    Built in a sibling temp dir and renamed into place, so an interrupted run never leaves
    a half-written model that a later run would take as done.
    """
    if is_made(outdir, seed=seed, spec=spec):
        return False
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the model is meant to be shared like any other
    try:
        train_tokenizer(spec, tmp)
        write_model(spec, tmp, seed=seed)
        (tmp / MARKER).write_text(json.dumps(marker_for(spec, seed), indent=2) + "\n")
        if outdir.exists():
            shutil.rmtree(outdir)
        tmp.rename(outdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def seeds_for(dirs: Sequence[Path], seeds: Sequence[int]) -> list[int]:
    """One seed per dir; a single seed S for several dirs means S, S+1, ..."""
    if len(seeds) == 1:
        return [seeds[0] + i for i in range(len(dirs))]
    if len(seeds) != len(dirs):
        raise SystemExit(f"tiny_models: {len(dirs)} dirs but {len(seeds)} seeds")
    return list(seeds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make tiny random-weight Llama models for vLLM.")
    parser.add_argument("outdir", nargs="+", type=Path, help="model directory to create")
    parser.add_argument(
        "--seed",
        nargs="+",
        type=int,
        default=[0],
        help="weight seed; one per dir, or one start seed (default 0)",
    )
    args = parser.parse_args(argv)
    for outdir, seed in zip(args.outdir, seeds_for(args.outdir, args.seed), strict=True):
        started = time.monotonic()
        made = make_tiny_model(outdir, seed=seed)
        state = f"made in {time.monotonic() - started:.1f} s" if made else "already present"
        print(f"tiny_models: {outdir} seed={seed} {state}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
