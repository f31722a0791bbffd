"""Training examples and batches: label spans, teacher alignment, chunk sampling, static shapes, Grain state."""

import dataclasses
import itertools

import chex
import numpy as np
import pytest

from d2l_jax.data.chunking import document_affixes, tokenize_document
from d2l_jax.data.examples import EXTRA_QUERIES, BatchShapes, ChunkSampling, TrainExampleBuilder, collate, fits, student_messages
from d2l_jax.data.niah import NIAHSource
from d2l_jax.data.pipeline import training_batches

RECORD = {"context": "The vault code is 4817. The vault is in Lisbon.", "prompt": "What is the vault code?", "response": "4817"}
SHAPES = BatchShapes(max_chunk_len=64, chunks_per_context=3, max_student_len=48, max_labels=8, max_teacher_len=80)


@pytest.fixture(scope="module")
def builder(smollm2):
    tok = smollm2.tokenizer
    return TrainExampleBuilder(tok, document_affixes(tok), smollm2.stop_token_ids, 64, with_teacher=True)


def test_student_and_teacher_sequences(smollm2, builder):
    tok = smollm2.tokenizer
    ex = builder(RECORD, np.random.default_rng(0))
    labels = ex["tokens"][ex["label_start"] : ex["label_end"]]
    assert tok.decode(labels) == "4817<|im_end|>" and ex["label_end"] == len(ex["tokens"])
    assert ex["tokens"][: ex["label_start"]] == smollm2.chat_ids(student_messages(RECORD["prompt"]))
    assert "Lisbon" not in tok.decode(ex["tokens"]) and "Lisbon" in tok.decode(ex["teacher_tokens"])
    start = ex["teacher_label_start"]
    assert ex["teacher_tokens"][start : start + len(labels)] == labels
    assert len(ex["chunks"]) == 1 and tok.decode(ex["chunks"][0]).count("Lisbon") == 1


def test_collate_positions_and_padding(builder):
    examples = [builder(RECORD, np.random.default_rng(i)) for i in range(4)]
    batch = collate(examples, SHAPES, micro_batches=2)
    chex.assert_shape(batch["tokens"], (2, 2, 48))
    chex.assert_shape(batch["ctx_tokens"], (2, 6, 64))
    ex = examples[0]
    n = ex["label_end"] - ex["label_start"]
    positions = batch["label_positions"][0, 0, :n]
    # The logits at position p predict token p + 1: the labels.
    np.testing.assert_array_equal(batch["tokens"][0, 0][positions + 1], batch["labels"][0, 0, :n])
    np.testing.assert_array_equal(batch["teacher_tokens"][0, 0][batch["teacher_label_positions"][0, 0, :n] + 1], batch["labels"][0, 0, :n])
    assert batch["label_mask"][0, 0].sum() == n and batch["mask"][0, 0].sum() == len(ex["tokens"])
    # One chunk per context here; the other reserved rows are padding owned by "row B" (dropped).
    np.testing.assert_array_equal(batch["chunk_document"][0], [0, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(batch["num_chunks"], [[1, 1], [1, 1]])


def test_examples_beyond_the_shapes_are_rejected(builder):
    ex = builder(RECORD, np.random.default_rng(0))
    with pytest.raises(ValueError, match="exceeds the batch shapes"):
        collate([ex], BatchShapes(max_chunk_len=64, chunks_per_context=1, max_student_len=10, max_labels=8))


def test_chunk_sampling_follows_the_reference_rule(smollm2):
    sampling = ChunkSampling(probs=((1, 0.5), (2, 0.25), (8, 0.25)), min_chunk_len=25)
    rng = np.random.default_rng(0)
    draws = [sampling.draw(60, 1, rng) for _ in range(400)]
    # 60 tokens allow at most ceil(60 / 25) = 3 chunks: k=8 is never drawn; 1 and 2 keep their 2:1 odds.
    assert set(draws) == {1, 2} and 0.55 < draws.count(1) / 400 < 0.78
    assert sampling.draw(600, 3, rng) == 8  # fewer than 3 chunks cannot hold 600 tokens
    assert ChunkSampling().draw(600, 3, rng) == 3
    tok = smollm2.tokenizer
    builder = TrainExampleBuilder(tok, document_affixes(tok), smollm2.stop_token_ids, 64, ChunkSampling(((3, 1.0),), 5))
    ex = builder(RECORD, rng)
    assert len(ex["chunks"]) == 3
    assert "".join(tok.decode(c) for c in ex["chunks"]).count("4817") == 1


def test_pipeline_state_round_trip(smollm2, builder):
    source = NIAHSource(smollm2.tokenizer, "train", 8, 37, 100)
    shapes = BatchShapes(max_chunk_len=64, chunks_per_context=1, max_student_len=48, max_labels=8, max_teacher_len=96)
    iterator = iter(training_batches([source, source], builder, shapes, batch_size=2, seed=3))
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["tokens"] for _ in range(3)]
    iterator.set_state(state)
    chex.assert_trees_all_equal([next(iterator)["tokens"] for _ in range(3)], expected)


def test_a_source_none_of_whose_records_fit_fails_instead_of_waiting_forever(smollm2, builder):
    source = NIAHSource(smollm2.tokenizer, "train", 200, 256, 100)  # 4+ chunks of 64 tokens each
    shapes = BatchShapes(max_chunk_len=64, chunks_per_context=1, max_student_len=48, max_labels=8, max_teacher_len=96)
    with pytest.raises(ValueError, match=r"none of the first 16 records of NIAHSource\(split='train', lo=200.* fits the batch shapes"):
        training_batches([source], builder, shapes, batch_size=2)
    training_batches([source], builder, dataclasses.replace(shapes, chunks_per_context=6, max_teacher_len=300), batch_size=2)


def test_curriculum_draws_its_first_records_from_the_warmup_sources(smollm2, builder):
    tok = smollm2.tokenizer
    records = lambda answer: [dict(RECORD, response=answer)] * 5
    shapes = BatchShapes(max_chunk_len=64, chunks_per_context=1, max_student_len=48, max_labels=8, max_teacher_len=96)
    stream = training_batches([records("1111")], builder, shapes, batch_size=2, seed=3, warmup_sources=[records("2222")], warmup_records=6)
    answers = [tok.decode(row[: row.argmin()])[-len("2222<|im_end|>") :] for batch in itertools.islice(stream, 5) for row in batch["labels"][0]]
    assert answers == ["2222<|im_end|>"] * 6 + ["1111<|im_end|>"] * 4
    with pytest.raises(ValueError, match="warmup_records=4 needs warmup_sources"):
        training_batches([records("1111")], builder, shapes, batch_size=2, warmup_records=4)


def test_a_document_with_a_lone_surrogate_is_rejected_with_its_position(smollm2, builder):
    tok = smollm2.tokenizer
    with pytest.raises(ValueError, match=r"the document is not valid Unicode text: character 3 is '\\ud800', a lone surrogate") as error:
        tokenize_document(tok, "abc\ud800def", document_affixes(tok))
    assert isinstance(error.value.__cause__, UnicodeEncodeError)
    with pytest.raises(ValueError, match=r"character 30 is '\\udfff'"):  # through the training example builder
        builder(dict(RECORD, context="The vault code is 4817. \n And \udfff."), np.random.default_rng(0))
    assert tokenize_document(tok, "abc \U0001F600 def", document_affixes(tok))  # a surrogate pair's character is fine


def test_a_contexts_questions_take_consecutive_rows(smollm2, builder):
    tok = smollm2.tokenizer
    grouped = dict(RECORD, extra_queries=[{"prompt": "Where is the vault?", "response": "Lisbon"}])
    shapes = dataclasses.replace(SHAPES, queries_per_context=2)
    examples = [builder(grouped, np.random.default_rng(0)), builder(RECORD, np.random.default_rng(1))]
    assert fits(examples[0], shapes) and not fits(examples[0], SHAPES)
    batch = collate(examples, shapes)
    chex.assert_shape([batch["tokens"], batch["teacher_tokens"], batch["labels"]], [(1, 4, 48), (1, 4, 80), (1, 4, 8)])
    np.testing.assert_array_equal(batch["num_chunks"], [[1, 1]])
    np.testing.assert_array_equal(batch["chunk_document"][0], [0, 1, 2, 2, 2, 2])  # owned by contexts, not by query rows
    labels = [tok.decode(batch["labels"][0, row][batch["label_mask"][0, row] == 1]) for row in range(4)]
    assert labels == ["4817<|im_end|>", "Lisbon<|im_end|>", "4817<|im_end|>", ""]  # row 3: context 1 has one question
    assert batch["mask"][0, 3].sum() == 0 and "Where is the vault?" in tok.decode(batch["tokens"][0, 1])
    extra = examples[0][EXTRA_QUERIES][0]
    positions = batch["teacher_label_positions"][0, 1, : extra["label_end"] - extra["label_start"]]
    np.testing.assert_array_equal(batch["teacher_tokens"][0, 1][positions + 1], batch["labels"][0, 1, : len(positions)])
