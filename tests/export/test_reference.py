"""The reference implementation's checkpoints (SakanaAI/doc-to-lora ``pytorch_model.bin``) in and out."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import pickle
import sys
import textwrap
import zipfile

import jax
import numpy as np
import peft
import pytest
import torch

import d2l_jax
from d2l_jax.export import ReferenceFormatError, TorchCheckpointError, UnsafeCheckpointError, read_reference_checkpoint
from d2l_jax.hypernet.adapter import batched_adapters
from d2l_jax.train.checkpoint import CheckpointMismatchError
from tests.conftest import randomized

# A tiny configuration the reference can express (its Perceiver attention is fixed at 16 x 128, 4 KV heads).
TINY = d2l_jax.HypernetConfig(latent_size=32, n_latent_queries=4, num_blocks=2, lora_rank=2)
NAME = "tiny-llama"

# The reference's data classes with their field lists (hypernet.py, aggregator.py, configs.py at baa85db),
# so that torch.load reads our files as the reference's code would.
_REFERENCE_PACKAGE = {
    "ctx_to_lora/__init__.py": "",
    "ctx_to_lora/modeling/__init__.py": "",
    "ctx_to_lora/configs.py": """
        from dataclasses import dataclass
        @dataclass
        class CtxEncoderArguments:
            ctx_encoder_model_name_or_path: str = None
            ctx_encoder_type: str = "early_exit"
            layer_idx: int = None
            quantize_ctx_encoder: bool = False
            ctx_encoder_last_layer: int = None
        """,
    "ctx_to_lora/modeling/aggregator.py": """
        from dataclasses import dataclass
        @dataclass
        class AggregatorConfig:
            aggregator_type: str
            num_layers: int
            num_modules: int
            num_extra_modules: int
            output_size: int
            feature_size: int
            pooling_type: str
            num_latent_factor: int
            lora_r: int
            per_rank_gen: bool
            n_latent_queries: int
            num_blocks: int
            num_self_attn_per_block: int
            shared_weights: bool
            layer_to_layer_ctx_encoder: bool
        """,
    "ctx_to_lora/modeling/hypernet.py": """
        from dataclasses import dataclass
        from typing import Any
        @dataclass
        class HypernetConfig:
            latent_size: int
            use_light_weight_lora: bool
            light_weight_latent_size: int
            per_rank_gen: bool
            use_per_rank_bias: bool
            use_bias: bool
            per_layer_processing: bool
            use_token_mixing: bool
            num_pre_head_layers: int
            dropout_rate: float
            lora_config: Any
            extra_modules: Any
            base_hidden_size: int
            layer_indices: Any
            feature_sizes: Any
            aggregator_config: Any
        """,
}


@pytest.fixture
def reference_code(tmp_path_factory):
    """The reference's config classes importable as ``ctx_to_lora`` (removed again afterwards)."""
    root = tmp_path_factory.mktemp("reference_code")
    for name, text in _REFERENCE_PACKAGE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    sys.path.insert(0, str(root))
    try:
        from ctx_to_lora.configs import CtxEncoderArguments
        from ctx_to_lora.modeling.aggregator import AggregatorConfig
        from ctx_to_lora.modeling.hypernet import HypernetConfig

        yield HypernetConfig, AggregatorConfig, CtxEncoderArguments
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "ctx_to_lora" or n.startswith("ctx_to_lora.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def tiny_base(tiny_llama):
    base, _ = tiny_llama
    return dataclasses.replace(base, name=f"/models/{NAME}")


def _params_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _adapter(d2l):
    chunks = [np.random.default_rng(0).integers(3, d2l.base.config.vocab_size, 10).tolist()]
    (adapter,) = batched_adapters(d2l.config, d2l.execution, d2l.base.config, d2l.base.params, d2l.params, [(chunks, 10)])
    return adapter


@pytest.mark.parametrize(
    "config",
    [
        TINY.replace(target_modules=("down_proj", "q_proj")),
        TINY.replace(encoder_type="early_exit", early_exit_layer=2, per_layer_processing=False, num_pre_head_layers=2, use_bias=False),
    ],
    ids=["per_layer_two_modules", "early_exit_shared_resmlp"],
)
def test_export_then_import_is_bit_identical(tiny_base, tmp_path, config):
    d2l = randomized(d2l_jax.D2L.create(tiny_base, config, seed=4))
    path = d2l.save_reference_checkpoint(tmp_path)
    assert path == tmp_path / "pytorch_model.bin"
    back = d2l_jax.D2L.from_reference_checkpoint(path, tiny_base)
    assert back.config == d2l.config
    _params_equal(d2l.params, back.params)
    _params_equal(_adapter(d2l).lora, _adapter(back).lora)


def test_the_written_file_is_what_the_reference_loads(tiny_base, tmp_path, reference_code):
    hypernet_cls, aggregator_cls, ctx_cls = reference_code
    d2l = d2l_jax.D2L.create(tiny_base, TINY)
    state = torch.load(d2l.save_reference_checkpoint(tmp_path / "ckpt.bin"), weights_only=False)
    assert isinstance(state, collections.OrderedDict)
    keys = list(state)
    assert keys[0] == "aggregator.perceiver.modality_projection.gate_proj.weight"
    assert keys[-4:] == ["head.weight", "base_model_name_or_path", "hypernet_config", "ctx_encoder_args"]
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    assert len(tensors) == len(keys) - 3 and all(v.dtype == torch.float32 for v in tensors.values())
    assert tensors["aggregator.perceiver.encoder.layers.1.self_attn.q_proj.weight"].shape == (2048, 32)
    assert tensors["layers.0.layers.1.bias"].shape == (1, 3, 1, 1, 128)
    assert tensors["head.weight"].shape == (3, 32, 96 + 64)
    assert state["base_model_name_or_path"] == f"/models/{NAME}"
    hyper, ctx = state["hypernet_config"], state["ctx_encoder_args"]
    # Instances of the reference's classes, with exactly their fields (reconstructing them checks the names).
    assert type(hyper) is hypernet_cls and hypernet_cls(**vars(hyper)) == hyper
    assert type(ctx) is ctx_cls and ctx_cls(**vars(ctx)) == ctx
    assert type(hyper.aggregator_config) is aggregator_cls and aggregator_cls(**vars(hyper.aggregator_config))
    assert isinstance(hyper.lora_config, peft.LoraConfig)
    assert (hyper.lora_config.r, hyper.lora_config.target_modules) == (2, {"down_proj"})
    assert hyper.lora_config.lora_alpha == pytest.approx(2 * 2**1.5)
    assert hyper.layer_indices.dtype == torch.int64 and hyper.layer_indices.tolist() == [0, 1, 2]
    assert hyper.feature_sizes == ({"down_proj": 96}, {"down_proj": 64})
    assert ctx.ctx_encoder_type == "per_layer_activations" and ctx.ctx_encoder_model_name_or_path is None


def _reference_state(reference_code, L=3, F=64, H=32, queries=4, blocks=2, r=2, d_in=96, d_out=64, name=NAME):
    """A checkpoint as the reference writes it for down_proj (reference-facts §9.1 with tiny sizes), random values."""
    hypernet_cls, aggregator_cls, ctx_cls = reference_code
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g)
    state = collections.OrderedDict()
    P = "aggregator.perceiver."
    state[P + "modality_projection.gate_proj.weight"] = t(4 * F, F)
    state[P + "modality_projection.up_proj.weight"] = t(4 * F, F)
    state[P + "modality_projection.down_proj.weight"] = t(H, 4 * F)
    for part, n in (("encoder", blocks), ("decoder", 1)):
        state[f"{P}{part}.latents_q"] = t(queries if part == "encoder" else r, H)
        for i in range(n):
            p = f"{P}{part}.layers.{i}."
            state[p + "input_latents_layernorm.weight"] = t(H)
            state[p + "input_context_layernorm.weight"] = t(H)
            state[p + "self_attn.q_proj.weight"] = t(2048, H)
            state[p + "self_attn.k_proj.weight"] = t(512, H)
            state[p + "self_attn.v_proj.weight"] = t(512, H)
            state[p + "self_attn.o_proj.weight"] = t(H, 2048)
            state[p + "post_attention_layernorm.weight"] = t(H)
            state[p + "pre_ff_layernorm.weight"] = t(H)
            state[p + "post_ff_layernorm.weight"] = t(H)
            state[p + "mlp.gate_proj.weight"] = t(4 * H, H)
            state[p + "mlp.up_proj.weight"] = t(4 * H, H)
            state[p + "mlp.down_proj.weight"] = t(H, 4 * H)
        state[f"{P}{part}.layernorm.weight"] = t(H)
    state["layers.0.layers.0.weight"], state["layers.0.layers.0.bias"] = t(H), t(H)
    state["layers.0.layers.1.weight"], state["layers.0.layers.1.bias"] = t(L, H, 4 * H), t(1, L, 1, 1, 4 * H)
    state["layers.0.layers.3.weight"], state["layers.0.layers.3.bias"] = t(L, 4 * H, H), t(1, L, 1, 1, H)
    state["layers.0.layers.4.weight"], state["layers.0.layers.4.bias"] = t(H), t(H)
    state["bias_A.down_proj"], state["bias_B.down_proj"] = t(L, r, d_in), t(L, r, d_out)
    state["scaler_A.down_proj"], state["scaler_B.down_proj"] = t(1, L, r, 1), t(1, L, r, 1)
    state["head.weight"] = t(L, H, d_in + d_out)
    lora = peft.LoraConfig(r=r, lora_alpha=2 * r**1.5, target_modules=["down_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    aggregator = aggregator_cls("perceiver", L, 1, 0, H, F, "mean", 8, r, True, queries, blocks, 0, False, True)
    state["base_model_name_or_path"] = name
    state["hypernet_config"] = hypernet_cls(
        H, False, 128, True, False, True, True, False, 1, 0.0, lora, None, F, torch.arange(L), ({"down_proj": d_in}, {"down_proj": d_out}), aggregator
    )
    state["ctx_encoder_args"] = ctx_cls(None, "per_layer_activations", L // 4, True, None)
    return state


def test_a_reference_checkpoint_imports_into_the_expected_tree(tiny_base, tmp_path, reference_code):
    state = _reference_state(reference_code)
    torch.save(state, tmp_path / "pytorch_model.bin")
    d2l = d2l_jax.D2L.from_reference_checkpoint(tmp_path / "pytorch_model.bin", tiny_base)
    assert d2l.config == TINY
    # Every tensor, placed by hand (independently of the library's table).
    W = lambda key: state[key].numpy()
    P = "aggregator.perceiver."
    expected = {
        ("perceiver", "modality_projection", "gate_proj", "kernel"): W(P + "modality_projection.gate_proj.weight").T,
        ("perceiver", "modality_projection", "up_proj", "kernel"): W(P + "modality_projection.up_proj.weight").T,
        ("perceiver", "modality_projection", "down_proj", "kernel"): W(P + "modality_projection.down_proj.weight").T,
        ("head", "pre_head_0", "norm_in", "scale"): W("layers.0.layers.0.weight"),
        ("head", "pre_head_0", "norm_in", "bias"): W("layers.0.layers.0.bias"),
        ("head", "pre_head_0", "mix1_kernel"): W("layers.0.layers.1.weight"),
        ("head", "pre_head_0", "mix1_bias"): W("layers.0.layers.1.bias")[0, :, 0, 0],
        ("head", "pre_head_0", "mix2_kernel"): W("layers.0.layers.3.weight"),
        ("head", "pre_head_0", "mix2_bias"): W("layers.0.layers.3.bias")[0, :, 0, 0],
        ("head", "pre_head_0", "norm_out", "scale"): W("layers.0.layers.4.weight"),
        ("head", "pre_head_0", "norm_out", "bias"): W("layers.0.layers.4.bias"),
        ("head", "bias_A_down_proj"): W("bias_A.down_proj"),
        ("head", "bias_B_down_proj"): W("bias_B.down_proj"),
        ("head", "scaler_A_down_proj"): W("scaler_A.down_proj")[0, :, :, 0],
        ("head", "scaler_B_down_proj"): W("scaler_B.down_proj")[0, :, :, 0],
        ("head", "head"): W("head.weight"),
    }
    norms = {"input_latents_layernorm": "input_latents_norm", "input_context_layernorm": "input_context_norm",
             "post_attention_layernorm": "post_attention_norm", "pre_ff_layernorm": "pre_ff_norm", "post_ff_layernorm": "post_ff_norm"}
    for part, n in (("encoder", 2), ("decoder", 1)):
        expected[("perceiver", part, "latents_q")] = W(f"{P}{part}.latents_q")
        expected[("perceiver", part, "norm", "scale")] = W(f"{P}{part}.layernorm.weight")
        stack = lambda suffix, transpose: np.stack([W(f"{P}{part}.layers.{i}.{suffix}").T if transpose else W(f"{P}{part}.layers.{i}.{suffix}") for i in range(n)])
        for theirs, ours in norms.items():
            expected[("perceiver", part, "layers", ours, "scale")] = stack(f"{theirs}.weight", False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected[("perceiver", part, "layers", proj)] = stack(f"self_attn.{proj}.weight", True)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            expected[("perceiver", part, "layers", "mlp", proj, "kernel")] = stack(f"mlp.{proj}.weight", True)
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(d2l.params)[0]}
    assert set(flat) == set(expected)
    assert sum(math.prod(v.shape) for v in flat.values()) == sum(v.numel() for v in state.values() if torch.is_tensor(v))
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg="/".join(key))
    assert np.isfinite(np.asarray(_adapter(d2l).B["down_proj"])).all()


def _write(state, path):
    torch.save(state, path)
    return path


def test_wrong_base_model_key_or_shape_is_named(tiny_base, tmp_path, reference_code):
    path = _write(_reference_state(reference_code), tmp_path / "ok.bin")
    with pytest.raises(CheckpointMismatchError, match=f"'{NAME}'.*'gemma-2-2b-it'"):
        d2l_jax.D2L.from_reference_checkpoint(path, tiny_base, base_name="gemma-2-2b-it")
    with pytest.raises(CheckpointMismatchError, match="layer_indices"):
        read_reference_checkpoint(path, tiny_base.config.replace(num_layers=4), NAME)
    with pytest.raises(CheckpointMismatchError, match="base_hidden_size"):
        read_reference_checkpoint(path, tiny_base.config.replace(hidden_size=48), NAME)

    state = _reference_state(reference_code)
    del state["aggregator.perceiver.encoder.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ReferenceFormatError, match=r"missing \['aggregator.perceiver.encoder.layers.1.mlp.up_proj.weight'\]"):
        d2l_jax.D2L.from_reference_checkpoint(_write(state, tmp_path / "missing.bin"), tiny_base)
    state = _reference_state(reference_code)
    state["aggregator.perceiver.encoder.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 32)
    with pytest.raises(ReferenceFormatError, match=r"unexpected \['aggregator.perceiver.encoder.layers.2.mlp.up_proj.weight'\]"):
        d2l_jax.D2L.from_reference_checkpoint(_write(state, tmp_path / "extra.bin"), tiny_base)
    state = _reference_state(reference_code)
    state["head.weight"] = torch.zeros(3, 32, 159)
    with pytest.raises(ReferenceFormatError, match=r"head.weight has shape \(3, 32, 159\), expected \(3, 32, 160\)"):
        d2l_jax.D2L.from_reference_checkpoint(_write(state, tmp_path / "shape.bin"), tiny_base)
    state = _reference_state(reference_code)
    state["hypernet_config"].aggregator_config.num_self_attn_per_block = 1
    with pytest.raises(ReferenceFormatError, match="num_self_attn_per_block=1"):
        d2l_jax.D2L.from_reference_checkpoint(_write(state, tmp_path / "self_attn.bin"), tiny_base)
    state = _reference_state(reference_code)
    del state["ctx_encoder_args"]
    with pytest.raises(ReferenceFormatError, match="ctx_encoder_args"):
        d2l_jax.D2L.from_reference_checkpoint(_write(state, tmp_path / "no_ctx.bin"), tiny_base)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(shared_a=True), "shared_a"),
        (dict(adapted_layers=2), "adapted_layers"),
        (dict(per_rank_head=True), "per_rank_head"),
        (dict(center_head_input=True), "center_head_input"),
        (dict(l2_eps=1e-3), "l2_eps"),
        (dict(num_heads=8, num_kv_heads=2), "num_heads"),
    ],
)
def test_export_names_what_the_reference_cannot_express(tiny_base, tmp_path, change, field):
    d2l = d2l_jax.D2L.create(tiny_base, TINY.replace(**change))
    with pytest.raises(ReferenceFormatError, match=f"HypernetConfig.{field}="):
        d2l.save_reference_checkpoint(tmp_path)
    assert not (tmp_path / "pytorch_model.bin").exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_unpickler_refuses_a_pickle_that_would_run_code(tiny_base, tmp_path):
    # The payload is real: PyTorch's unrestricted loader runs it.
    proof = tmp_path / "ran_under_torch_load"
    torch.save({"head.weight": torch.zeros(1), "x": _RunsCode(proof)}, tmp_path / "proof.bin")
    torch.load(tmp_path / "proof.bin", weights_only=False)
    assert proof.exists()

    marker = tmp_path / "must_not_exist"
    torch.save({"head.weight": torch.zeros(1), "x": _RunsCode(marker)}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match=rf"{os.system.__module__}\.system.*nothing was executed"):
        d2l_jax.D2L.from_reference_checkpoint(tmp_path / "evil.bin", tiny_base)
    assert not marker.exists()


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
    return path


def test_the_unpickler_refuses_callables_and_unknown_classes(tiny_base, tmp_path):
    marker = tmp_path / "must_not_exist"
    evaluate = f"cbuiltins\neval\n(V__import__('pathlib').Path('{marker}').touch()\ntR.".encode()
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
        d2l_jax.D2L.from_reference_checkpoint(_zip_with_pickle(tmp_path / "eval.bin", evaluate), tiny_base)
    assert not marker.exists()
    unknown = pickle.dumps({"x": _RunsCode}, protocol=2)  # a class outside the allow-list
    with pytest.raises(UnsafeCheckpointError, match=r"tests\.export\.test_reference\._RunsCode"):
        d2l_jax.D2L.from_reference_checkpoint(_zip_with_pickle(tmp_path / "unknown.bin", unknown), tiny_base)
    (tmp_path / "plain.bin").write_bytes(pickle.dumps({"head.weight": 1}))
    with pytest.raises(TorchCheckpointError, match="not a torch.save zip archive"):
        d2l_jax.D2L.from_reference_checkpoint(tmp_path / "plain.bin", tiny_base)
