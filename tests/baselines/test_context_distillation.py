"""Context distillation on a tiny random model with the SmolLM2 tokenizer: the loss falls, the LoRA has
the configured layout, it acts only through its target modules, and the train step compiles once."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import d2l_jax
from d2l_jax.baselines import distill_document, distill_oracle
from d2l_jax.baselines import context_distillation as cd
from d2l_jax.data.examples import sequence_with_labels, student_messages
from d2l_jax.models.base_model import BaseModel
from tests.conftest import random_base
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.lora import LoRA, merged_kernel
from d2l_jax.train.losses import top_k_targets

TINY = DecoderConfig(
    vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512
)
DOC = "The vault code is 4817 and the vault is in Lisbon, near the river."
QA = [("What is the vault code?", "4817"), ("Where is the vault?", "In Lisbon, near the river."), ("What is near the vault?", "The river.")]


@pytest.fixture(scope="module")
def tiny_base(smollm2):
    # Peaked next-token distributions: the teacher's top-16 carries real mass and the document changes it.
    return random_base(TINY, smollm2, seed=1, weight_scale=8)


@pytest.fixture(scope="module")
def trained(tiny_base):
    return distill_document(tiny_base, DOC, QA, steps=30, learning_rate=1e-2, response_source="given", progress=False)


def question_ids(base, question="Where is the vault?"):
    return np.array([base.chat_ids(student_messages(question))])


def test_loss_decreases(trained):
    losses = trained.losses
    assert losses.shape == (30,) and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.8 * losses[:3].mean()


def test_full_kl_decreases_towards_zero(tiny_base):
    result = distill_document(tiny_base, DOC, QA, steps=30, learning_rate=1e-2, response_source="given", loss="full_kl", progress=False)
    assert result.losses[0] > 0 and result.losses[-5:].mean() < 0.5 * result.losses[0]


def test_teacher_targets_are_each_examples_own(tiny_base):
    # Three examples in groups of two: each example's top-k targets are those of the teacher reading that
    # example alone; the padding row is never run through the teacher and holds zeros.
    questions, responses = [q for q, _ in QA], [a for _, a in QA]
    _, teacher = cd._build_examples(tiny_base, DOC, questions, responses, instruction=False)
    targets = cd._compute_teacher(tiny_base, teacher, "top_k_kl", top_k=4, rows=2)
    assert targets["teacher_log_probs"].shape == (4, teacher["label_positions"].shape[1], 4)
    for i, (question, response) in enumerate(QA):
        ids, start, end = sequence_with_labels(
            tiny_base.tokenizer, student_messages(question, response, context=DOC), tiny_base.stop_token_ids
        )
        logits = tiny_base.logits(np.array([ids]))[0, start - 1 : end - 1]
        log_probs, top_ids = top_k_targets(logits[None], 4)
        np.testing.assert_allclose(targets["teacher_log_probs"][i, : end - start], log_probs[0], atol=1e-4)
        np.testing.assert_array_equal(targets["teacher_ids"][i, : end - start], top_ids[0])
    assert not np.asarray(targets["teacher_log_probs"][3]).any() and not np.asarray(targets["teacher_ids"][3]).any()


def test_adapter_layout(trained, tiny_base):
    adapter = trained.adapter
    assert isinstance(adapter, d2l_jax.Adapter)
    assert adapter.lora.modules == ("down_proj",) and adapter.rank == 8 and adapter.num_chunks == 1
    assert adapter.A["down_proj"].shape == (1, TINY.num_layers, 8, TINY.intermediate_size)
    assert adapter.B["down_proj"].shape == (1, TINY.num_layers, 8, TINY.hidden_size)
    assert adapter.lora.alpha == pytest.approx(16.0 / 8)  # PEFT scaling lora_alpha / r
    assert np.abs(np.asarray(adapter.B["down_proj"])).max() > 0  # B starts at zero and was trained
    assert adapter.num_tokens > len(tiny_base.tokenizer(DOC)["input_ids"])  # chat affixes counted, as D2L counts


def test_untrained_or_zeroed_lora_gives_base_logits_exactly(trained, tiny_base):
    ids = question_ids(tiny_base)
    base_logits = np.asarray(tiny_base.logits(ids))
    initial = distill_document(tiny_base, DOC, QA, steps=0, response_source="given", progress=False).adapter
    a = np.asarray(initial.A["down_proj"])
    assert not np.asarray(initial.B["down_proj"]).any()
    bound = 1 / np.sqrt(TINY.intermediate_size)  # PEFT's kaiming-uniform(a=sqrt(5)) for lora_A
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    np.testing.assert_array_equal(np.asarray(tiny_base.logits(ids, lora=initial.lora)), base_logits)

    zeroed = LoRA(A=trained.adapter.A, B={m: jnp.zeros_like(b) for m, b in trained.adapter.B.items()}, alpha=trained.adapter.lora.alpha)
    np.testing.assert_array_equal(np.asarray(tiny_base.logits(ids, lora=zeroed)), base_logits)
    assert np.abs(np.asarray(tiny_base.logits(ids, lora=trained.adapter.lora)) - base_logits).max() > 1e-2


def test_lora_equals_merging_into_the_target_kernels(trained, tiny_base):
    ids = question_ids(tiny_base)
    adapter = trained.adapter
    params = jax.tree.map(lambda x: x, tiny_base.params)
    mlp = params["layers"]["mlp"]
    mlp["down_proj"] = {
        "kernel": jax.vmap(merged_kernel, in_axes=(0, 0, 0, None))(
            mlp["down_proj"]["kernel"], adapter.A["down_proj"][0], adapter.B["down_proj"][0], adapter.lora.alpha
        )
    }
    merged = BaseModel("merged", TINY, params, tiny_base.tokenizer, tiny_base.stop_token_ids)
    with_lora = np.asarray(tiny_base.logits(ids, lora=adapter.lora))
    np.testing.assert_allclose(np.asarray(merged.logits(ids)), with_lora, rtol=1e-4, atol=1e-3)


def test_query_lora_cannot_change_the_first_position(tiny_base):
    # A LoRA on q_proj only changes attention scores; the first token attends to itself alone (weight 1
    # whatever the scores), so its logits must stay the base model's while later positions move.
    result = distill_document(
        tiny_base, DOC, QA, steps=10, learning_rate=1e-2, target_modules=("q_proj",), response_source="given", progress=False
    )
    lora = result.adapter.lora
    assert lora.modules == ("q_proj",) and lora.A["q_proj"].shape == (1, TINY.num_layers, 8, TINY.hidden_size)
    ids = question_ids(tiny_base)
    base_logits, adapted = np.asarray(tiny_base.logits(ids)), np.asarray(tiny_base.logits(ids, lora=lora))
    np.testing.assert_allclose(adapted[:, 0], base_logits[:, 0], atol=1e-5)
    assert np.abs(adapted[:, 1:] - base_logits[:, 1:]).max() > 1e-2


def test_train_step_compiles_once(tiny_base, caplog):
    # rank 3 appears in no other test, so the first call must compile the step for its shapes and the
    # second document (same shape buckets) must reuse it.
    other_doc = "The garden gate is blue and the garden is in Porto, near the sea."
    other_qa = [("What colour is the gate?", "Blue"), ("Where is the garden?", "In Porto, near the sea."), ("What is near it?", "The sea.")]
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        distill_document(tiny_base, DOC, QA, steps=6, rank=3, response_source="given", progress=False)
        first = [r for r in caplog.records if "_cd_train_step" in r.getMessage() and "Compiling" in r.getMessage()]
        distill_document(tiny_base, other_doc, other_qa, steps=6, rank=3, response_source="given", progress=False)
    compiles = [r for r in caplog.records if "_cd_train_step" in r.getMessage() and "Compiling" in r.getMessage()]
    assert len(first) == 1 and len(compiles) == 1


def test_oracle_distils_on_the_teachers_reply(tiny_base):
    question = "What is the vault code?"
    result = distill_oracle(tiny_base, DOC, question, steps=3, max_response_tokens=6, progress=False)
    teacher_reply = tiny_base.generate([student_messages(question, context=DOC)], max_new_tokens=6)[0]
    assert result.questions == [question] and result.responses == [teacher_reply]
    assert result.steps == 3 and np.isfinite(result.losses).all()
    assert result.update_seconds >= result.train_seconds > 0 and result.response_seconds > 0
    assert result.peak_memory_gb >= result.baseline_memory_gb > 0
    assert set(result.summary()) >= {"update_seconds", "peak_memory_gb", "final_loss"}


def test_adapter_plugs_into_d2l(trained, tiny_base):
    hyper = d2l_jax.HypernetConfig(
        latent_size=16, n_latent_queries=2, num_blocks=1, num_heads=2, head_dim=8, num_kv_heads=1, lora_rank=2, max_chunk_len=64, max_chunks=2
    )
    # generate and logits never read the hypernetwork's parameters when given an adapter.
    d2l = d2l_jax.D2L(tiny_base, hyper, params=None)
    ids = question_ids(tiny_base)
    np.testing.assert_array_equal(
        np.asarray(d2l.logits(ids, adapter=trained.adapter)), np.asarray(tiny_base.logits(ids, lora=trained.adapter.lora))
    )
    prompts = [student_messages("Where is the vault?"), student_messages("What is the vault code?")]
    assert d2l.generate(prompts, adapter=trained.adapter, max_new_tokens=4) == tiny_base.generate(
        prompts, lora=trained.adapter.lora, max_new_tokens=4
    )


def test_bad_input_is_rejected(tiny_base):
    with pytest.raises(ValueError, match="no questions"):
        distill_document(tiny_base, DOC, [], steps=1, progress=False)
    with pytest.raises(ValueError, match="answer"):
        distill_document(tiny_base, DOC, ["What is the vault code?"], steps=1, response_source="given", progress=False)
    with pytest.raises(ValueError, match="loss"):
        distill_document(tiny_base, DOC, QA, steps=1, loss="mse", response_source="given", progress=False)
    with pytest.raises(ValueError, match="target_modules"):
        distill_document(tiny_base, DOC, QA, steps=1, target_modules=("lm_head",), response_source="given", progress=False)
    with pytest.raises(ValueError, match="empty"):
        distill_document(tiny_base, "   ", QA, steps=1, response_source="given", progress=False)
    with pytest.raises(ValueError, match="tokens"):
        distill_document(tiny_base, DOC * 60, QA, steps=1, response_source="given", progress=False)
