"""The model the plan counts: Llama dimensions (presets or an HF config.json) and its
parameter tensors, with LoRA adapters when asked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ngdiff_ds.errors import ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_MODEL_TYPES = ("llama", "mistral")  # the same decoder block and parameter shapes


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of a Llama-architecture causal LM that decide its parameter shapes."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _preset(name, vocab, hidden, intermediate, layers, heads, kv_heads) -> ModelDims:
    return ModelDims(name, vocab, hidden, intermediate, layers, heads, kv_heads, hidden // heads)


# The public config.json values of each model (none of them ties its embeddings).
PRESETS = {dims.name: dims for dims in (
    _preset("llama2-7b", 32000, 4096, 11008, 32, 32, 32),
    _preset("llama2-13b", 32000, 5120, 13824, 40, 40, 40),
    _preset("llama2-70b", 32000, 8192, 28672, 80, 64, 8),
    _preset("llama3-8b", 128256, 4096, 14336, 32, 32, 8),
    _preset("llama3-70b", 128256, 8192, 28672, 80, 64, 8),
)}


def dims_from_config(path: str | Path) -> ModelDims:
    """``ModelDims`` from an HF model directory (or its ``config.json``); ConfigError names
    the file and the missing or unsupported field."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--config {path}: no config.json there")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--config {file}: not readable JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise ConfigError(f"--config {file}: model_type {model_type!r} is not one the plan "
                          f"counts (a Llama-architecture block: {', '.join(LLAMA_MODEL_TYPES)})")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        raise ConfigError(f"--config {file}: needs integer {', '.join(missing)}")
    heads = config["num_attention_heads"]
    return ModelDims(
        name=str(path), vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)))


# ----- the parameters ---------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """``count`` parameters of ``numel`` elements each, belonging to modules named ``module``."""

    module: str
    numel: int
    count: int
    trainable: bool = True


def _linear(name: str, in_features: int, out_features: int, bias: bool, count: int):
    tensors = [Tensor(name, in_features * out_features, count)]
    if bias:
        tensors.append(Tensor(name, out_features, count))
    return tensors


def _layer_linears(dims: ModelDims) -> dict[str, tuple[int, int, bool]]:
    """(in_features, out_features, bias) of each projection of one decoder layer."""
    h, i = dims.hidden_size, dims.intermediate_size
    return {"q_proj": (h, dims.q_dim, dims.attention_bias),
            "k_proj": (h, dims.kv_dim, dims.attention_bias),
            "v_proj": (h, dims.kv_dim, dims.attention_bias),
            "o_proj": (dims.q_dim, h, dims.attention_bias),
            "gate_proj": (h, i, dims.mlp_bias), "up_proj": (h, i, dims.mlp_bias),
            "down_proj": (i, h, dims.mlp_bias)}


def model_tensors(dims: ModelDims) -> list[Tensor]:
    """Every parameter of ``LlamaForCausalLM`` (a tied head shares the embedding's)."""
    h, layers = dims.hidden_size, dims.num_layers
    tensors = [Tensor("embed_tokens", dims.vocab_size * h, 1)]
    for name, (fan_in, fan_out, bias) in _layer_linears(dims).items():
        tensors += _linear(name, fan_in, fan_out, bias, layers)
    tensors += [Tensor("input_layernorm", h, layers), Tensor("post_attention_layernorm", h, layers),
                Tensor("norm", h, 1)]
    if not dims.tie_word_embeddings:
        tensors.append(Tensor("lm_head", dims.vocab_size * h, 1))
    return tensors


def lora_tensors(dims: ModelDims, rank: int, targets) -> list[Tensor]:
    """peft's adapters: per targeted projection ``lora_A`` (rank x in) and ``lora_B``
    (out x rank), each its own module."""
    linears = _layer_linears(dims)
    tensors = []
    for name in targets:
        fan_in, fan_out, _ = linears[name]
        tensors += [Tensor(f"{name}.lora_A", rank * fan_in, dims.num_layers),
                    Tensor(f"{name}.lora_B", fan_out * rank, dims.num_layers)]
    return tensors


def frozen(tensors: list[Tensor]) -> list[Tensor]:
    return [Tensor(t.module, t.numel, t.count, trainable=False) for t in tensors]


def count_parameters(tensors: list[Tensor], trainable_only: bool = False) -> int:
    return sum(t.numel * t.count for t in tensors if t.trainable or not trainable_only)


def largest_module(tensors: list[Tensor], trainable_only: bool = False) -> int:
    """Parameters of the largest module (what ZeRO-3 gathers at once, DeepSpeed's
    ``largest_layer_params``)."""
    per_module = {}
    for t in tensors:
        if t.trainable or not trainable_only:
            per_module[t.module] = per_module.get(t.module, 0) + t.numel
    return max(per_module.values(), default=0)
