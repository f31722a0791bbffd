"""Self-generated question-answer data for offline distillation (reference-facts §7.2; §8.2 for the
questions context distillation trains on).

Per document, in three steps:

1. :func:`generate_questions`: the generator (the base model itself) reads the reference's question
   prompts (:data:`Q_GEN_SYSTEM_MESSAGE`, :data:`Q_GEN_PROMPT`) and writes ``pairs_per_round``
   "Question i: / Answer i:" pairs, greedily. Every later round reads :data:`Q_GEN_REPEAT_PROMPT`, which
   shows the document and all pairs so far and asks for more that are not redundant with them. Repeated
   questions (same words once lower-cased, punctuation and articles dropped) are removed.
2. :func:`teacher_answers`: the teacher (the base model with the document in its prompt, in the format the
   D2L training teacher reads: ``student_messages(question, context=document)``) answers every question
   greedily; a reply that does not end with an end-of-turn token within ``max_new_tokens`` is dropped, as
   the reference drops ``finish_reason != "stop"``. The top-k log-probabilities at each label position of
   the training teacher sequence (the reply's tokens through the end-of-turn token, the span
   ``sequence_with_labels`` defines) are the offline targets that ``TrainExampleBuilder`` and ``collate``
   read: the distributions the reply was generated from, or, where its text tokenizes differently, one
   teacher-forced forward over that sequence. The generator's own answers are kept as
   ``generator_answer`` but not trained on (the reference discards them).
3. :func:`generate_qa_file`: a resumable parquet writer over many documents (:func:`answer_records_file`:
   the teacher alone, on a QA data set's own questions), whose rows ``RecordSource`` reads for training.

The reference's bugs in this pipeline, fixed here:

* ``data/self_generate_qa.py`` drops the empty question lists (``len(q_list) > 0``) but keeps every
  context, so after a document that yields no question, contexts and questions are paired with the wrong
  documents (its running index also advances by a stale loop variable then). Here each document's pairs
  stay attached to it and every row names its ``document_index``.
* ``data/generate_fw_edu_qa_v2_repeat.py`` builds its ``SamplingParams`` without ``max_tokens``, so vLLM's
  default of 16 tokens cuts every later-round reply short. Here every round has the same explicit
  ``max_new_tokens``.
* ``self_generate_qa.py`` wraps questions in closed-QA instructions (``closed_qa_prob``) and overwrites the
  result on the next line, so no wrapping takes effect; there is none here either.

Differences from the reference: the generator is the base model (the reference uses gemma-3-12b-it for
training data and gemma-3-4b-it for CD); at most ``pairs_per_round`` new pairs are kept per round (a
small model loops past the fifth pair until its token budget ends); a question the generator gives no
answer is kept (the teacher answers it anyway); and the teacher reads the D2L training teacher's format
instead of the reference's self-generation prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from d2l_jax.data.examples import sequence_with_labels, student_messages
from d2l_jax.models import generate as gen
from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.decoder import label_logits
from d2l_jax.models.families import DecoderConfig

# The reference's question-generation prompts (src/ctx_to_lora/data/q_generation_template.py).
Q_GEN_SYSTEM_MESSAGE = (
    "You are a creative and helpful assistant.\n"
    "You are tasked with generating questions for reading comprehension tests.\n"
    "You will be given a context and you need to generate questions and corresponding answers from the given context.\n"
    "The questions should be highly specific to the information provided in the context, not general questions that suit any context.\n"
    "**DO NOT** hallucinate or make up information."
)

_Q_GEN_INSTRUCTIONS = (
    "### Instructions ###\n"
    "Generate questions and corresponding answers from the given context. The questions should be highly specific to the "
    "information provided in the context, not general questions that suit any context.\n\n"
    "### Context ###\n"
    "{context}\n\n\n"
)
_Q_GEN_ANSWER_RULES_AND_FORMAT = (
    "Rules to follow when generating the answers:\n"
    "1. The answers must use the (implied) information provided in the context.\n"
    "2. Phrases like 'based on the provided context', 'according to the context', 'in the context', etc., are **NOT ALLOWED** to appear in "
    "the answers.\n"
    "3. Do not just copy words from the context. Answer the question in your own words.\n"
    "4. The answers should be detailed and comprehensive. Please include additional specific details from the context.\n\n"
    "Respond with {n_qa_pairs} question-answer pairs.\n"
    "Always use proper grammar and punctuation.\n"
    "Try to use different question forms and styles.\n"
    "Use simple words and make sure that the answers are clear and comprehensive.\n\n"
    "The question-answer pairs should be in the following format:\n"
    "Question 1: {{question_1}}\n"
    "Answer 1: {{answer_1}}\n"
    "Question 2: {{question_2}}\n"
    "Answer 2: {{answer_2}}\n"
    "..."
)

# The first round's user message; fields ``context`` and ``n_qa_pairs``.
Q_GEN_PROMPT = (
    _Q_GEN_INSTRUCTIONS + "### Rules ###\n"
    "Rules to follow when generating the questions:\n"
    "1. The questions must be specific to the given context and fully answerable from information present in the given context.\n"
    "2. Ask questions that are fact-seeking based on the information provided.\n"
    "3. Make sure the questions are clear and unambiguous.\n"
    "4. Phrases like 'based on the provided context', 'according to the context', 'in the context', etc., are **NOT ALLOWED** to appear in "
    "the questions.\n"
    "5. The questions should not overlap. They should be diverse, covering many aspects of the context.\n"
    "6. Do not give away too much information in the questions. For example, ask 'Who is X?' instead of 'Who is X that did Y?' when Y is clear from the context.\n"
    "7. Ignore the text formatting of the context, e.g., bold, italic, underline, etc.\n"
    "8. Ignore typos, spacing, and grammatical errors in the context.\n\n" + _Q_GEN_ANSWER_RULES_AND_FORMAT
)

# Later rounds' user message; fields ``context``, ``qa_pairs`` (all earlier pairs, see
# :func:`format_qa_pairs`) and ``n_qa_pairs``.
Q_GEN_REPEAT_PROMPT = (
    _Q_GEN_INSTRUCTIONS + "### Example Question-Answer Pairs ###\n"
    "{qa_pairs}\n\n\n"
    "### Rules ###\n"
    "Rules to follow when generating the questions:\n"
    "1. The questions must be specific to the given context and fully answerable from information present in *or* implied from the given context.\n"
    "2. The questions must *not* be redundant with the example questions-answer pairs provided.\n"
    "3. You should prioritize fact-seeking questions. Consider reversal questions, e.g., asking 'What causes X to happen?' is valid when 'Y causes X' is presented in the context.\n"
    "4. If all the facts in the context are already covered by the provided examples, you must generate *more complicated* questions that require reasoning beyond simple information retrieval.\n"
    "This includes asking about information that can be inferred, requiring synthesizing information from multiple parts of the text, or understanding relationships between concepts, events, or individuals mentioned in the context. For example, if the context says 'The Eiffel Tower was completed in 1889 after 2 years of construction', you can ask 'When did the construction of the Eiffel Tower begin?'. Here's another example: if the context says 'Alice is Bob's mother. Bob is Charlie's Dad', you can ask 'Who is Charlie's grandmother?'.\n"
    "5. Phrases like 'based on the provided context', 'according to the context', 'in the context', etc., are **NOT ALLOWED** to appear in "
    "the questions.\n"
    "6. The questions should not overlap. They should be diverse, covering many aspects of the context.\n"
    "7. Do not give away too much information in the questions. For example, ask 'Who is X?' instead of 'Who is X that did Y?' when Y is clear from the context.\n"
    "8. Ignore the text formatting of the context, e.g., bold, italic, underline, etc.\n"
    "9. Ignore typos, spacing, and grammatical errors in the context.\n\n" + _Q_GEN_ANSWER_RULES_AND_FORMAT
)

# The reference's settings: 5 pairs per round; training data has two rounds (level_0, level_1), CD four.
PAIRS_PER_ROUND = 5
TRAINING_DATA_ROUNDS = 2
QUESTION_TOKENS = 1024  # the generator's budget per round (the reference's CD: max_new_tokens 1024)
TEACHER_TOKENS = 256  # the teacher's reply budget (the reference's self-generation: 256)
TOP_K = 16
# A teacher answer counts as overlapping its document when at least this share of its words occur there.
OVERLAP_RECALL = 0.5

_MARKER = re.compile(r"\b(?P<kind>Question|Answer)\s*\d*\s*(?:\*\*)?\s*:")
_MARKDOWN_EDGES = "*#_ \t\n"
_ARTICLES = frozenset({"a", "an", "the"})

Messages = list[dict[str, str]]


class QAPair(NamedTuple):
    """A generated (question, answer) pair; the answer is None where the generator wrote none."""

    question: str
    answer: str | None


class Reply(NamedTuple):
    """A generated reply: its token ids before the stop token, whether a stop token ended it (False: it
    reached ``max_new_tokens``), and where asked for and finished, the top-k ``(log_probs, ids)`` (float32 /
    int32 ``[len(ids) + 1, k]``) of the distributions its tokens and the stop token were chosen from."""

    ids: list[int]
    finished: bool
    top_k: tuple[np.ndarray, np.ndarray] | None = None


# Parsing ----------------------------------------------------------------------------------------------------


def _paragraph(text: str) -> str:
    """``text`` up to its first blank line, without surrounding whitespace or markdown emphasis."""
    return re.split(r"\n\s*\n", text.strip(_MARKDOWN_EDGES), maxsplit=1)[0].strip(_MARKDOWN_EDGES)


def parse_qa_pairs(text: str, finished: bool = True) -> list[tuple[str, str | None]]:
    """(question, answer) pairs from a generator's "Question i: ... / Answer i: ..." reply, in order.

    Tolerant of a small model's mistakes: numbers may be missing, repeated or out of order; markdown
    emphasis around the markers is ignored; text before the first marker and after a blank line
    following a question or answer is dropped. A question is the first line after its marker; a question
    with no answer marker before the next question has the answer None (the answers are not trained on).
    With ``finished=False`` (the reply ran out of tokens) the last pair is dropped, as it may be cut off.
    Empty questions are dropped. Returns ``[]`` when the text holds no question marker.
    """
    markers = list(_MARKER.finditer(text))
    ends = [m.start() for m in markers[1:]] + [len(text)]
    pairs = []
    for i, marker in enumerate(markers):
        if marker["kind"] != "Question":
            continue
        lines = _paragraph(text[marker.end() : ends[i]]).splitlines()
        question = lines[0].strip(_MARKDOWN_EDGES) if lines else ""
        answer = None
        if i + 1 < len(markers) and markers[i + 1]["kind"] == "Answer":
            answer = _paragraph(text[markers[i + 1].end() : ends[i + 1]]) or None
        if question:
            pairs.append((question, answer))
    if not finished and pairs:
        pairs.pop()
    return pairs


def _words(text: str) -> list[str]:
    """Lower-cased words without articles (the normal form for duplicates and overlap)."""
    return [w for w in re.findall(r"\w+", text.lower()) if w not in _ARTICLES]


def answer_overlap(answer: str, document: str) -> float:
    """The share of ``answer``'s words (lower-cased, articles dropped) that occur in ``document``; 0 for an
    answer without words. A crude answerability check: a teacher that answers from the document scores high."""
    words = _words(answer)
    if not words:
        return 0.0
    present = set(_words(document))
    return sum(w in present for w in words) / len(words)


# Question generation -------------------------------------------------------------------------------------------


def format_qa_pairs(pairs: Sequence[tuple[str, str | None]]) -> str:
    """Earlier pairs as the repeat prompt shows them: ``"Question i: q\\nAnswer i: a\\n"`` from i = 1 (the
    answer line left out where the generator gave none)."""
    lines = []
    for i, (question, answer) in enumerate(pairs, start=1):
        lines.append(f"Question {i}: {question}\n" + (f"Answer {i}: {answer}\n" if answer is not None else ""))
    return "".join(lines)


def question_messages(
    document: str, earlier: Sequence[tuple[str, str | None]], pairs_per_round: int = PAIRS_PER_ROUND, repeat: bool = False
) -> Messages:
    """The generator's conversation: the reference's system message, then :data:`Q_GEN_PROMPT`, or with
    ``repeat`` :data:`Q_GEN_REPEAT_PROMPT` showing ``earlier`` pairs."""
    if repeat:
        user = Q_GEN_REPEAT_PROMPT.format(context=document, qa_pairs=format_qa_pairs(earlier), n_qa_pairs=pairs_per_round)
    else:
        user = Q_GEN_PROMPT.format(context=document, n_qa_pairs=pairs_per_round)
    return [{"role": "system", "content": Q_GEN_SYSTEM_MESSAGE}, {"role": "user", "content": user}]


def generate_replies(base: BaseModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, top_k: int = 0) -> list[Reply]:
    """Greedy replies to already-templated prompts (token ids), with whether each ended on a stop token
    and, with ``top_k``, the top-k of each finished reply's distributions (:class:`Reply`).

    Raises ValueError when a prompt plus ``max_new_tokens`` exceeds the model's window."""
    args, buffer = base.generation_args(prompts, max_new_tokens)
    out = gen.generate_tokens(*args, buffer=buffer, top_k=top_k)
    out, log_probs, top_ids = jax.device_get(out) if top_k else (np.asarray(out), None, None)
    stops = set(base.stop_token_ids)
    replies = []
    for i, row in enumerate(out[: len(prompts)]):
        ids = gen.strip_after_stop(row, stops)
        finished = len(ids) < len(row) and int(row[len(ids)]) in stops
        distributions = None
        if top_k and finished:
            distributions = (log_probs[i, : len(ids) + 1].astype(np.float32), top_ids[i, : len(ids) + 1].astype(np.int32))
        replies.append(Reply(ids, finished, distributions))
    return replies


def _preview(text: str, length: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= length else text[:length] + "...")


def _fitting_prompt(base: BaseModel, messages: Messages, max_new_tokens: int, what: str) -> list[int]:
    """The templated ids of ``messages``; ValueError naming ``what`` when they and ``max_new_tokens`` do not
    fit the model's window."""
    ids = base.chat_ids(messages)
    base.check_length(len(ids) + max_new_tokens, f"{what}: the prompt ({len(ids)} tokens) with max_new_tokens={max_new_tokens}")
    return ids


def _require_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r:.80}")
    return value


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _new_pairs(parsed: list[tuple[str, str | None]], seen: set[tuple[str, ...]], limit: int) -> list[QAPair]:
    """The first ``limit`` parsed pairs whose question is not in ``seen`` (normalised words), which it updates."""
    kept = []
    for question, answer in parsed:
        key = tuple(_words(question))
        if key and key not in seen and len(kept) < limit:
            seen.add(key)
            kept.append(QAPair(question, answer))
    return kept


def _questions_by_round(base, documents, first_index, rounds, pairs_per_round, max_new_tokens) -> list[list[list[QAPair]]]:
    """Per document, per round, the new pairs of that round."""
    by_round: list[list[list[QAPair]]] = [[] for _ in documents]
    seen: list[set] = [set() for _ in documents]
    for round_ in range(rounds):
        prompts = [
            _fitting_prompt(
                base,
                question_messages(doc, [p for pairs in by_round[i] for p in pairs], pairs_per_round, repeat=round_ > 0),
                max_new_tokens,
                f"document {first_index + i} ({_preview(doc)}), question round {round_ + 1}",
            )
            for i, doc in enumerate(documents)
        ]
        for i, reply in enumerate(generate_replies(base, prompts, max_new_tokens)):
            text = base.tokenizer.decode(reply.ids, skip_special_tokens=True)
            by_round[i].append(_new_pairs(parse_qa_pairs(text, reply.finished), seen[i], pairs_per_round))
    return by_round


def generate_questions(
    base: BaseModel,
    documents: Sequence[str],
    rounds: int = TRAINING_DATA_ROUNDS,
    pairs_per_round: int = PAIRS_PER_ROUND,
    batch_size: int = 8,
    max_new_tokens: int = QUESTION_TOKENS,
) -> list[list[QAPair]]:
    """Question-answer pairs the base model writes about each document, greedily, in ``rounds`` rounds.

    Args:
      base: the generator (with its tokenizer).
      documents: the texts, in order.
      rounds: round 0 reads :data:`Q_GEN_PROMPT`; each later round reads :data:`Q_GEN_REPEAT_PROMPT` with all
        pairs kept so far (the reference: 2 rounds for training data, 4 for context distillation).
      pairs_per_round: pairs asked for, and the most new pairs kept, per round.
      batch_size: documents generated for together (one generate call per round).
      max_new_tokens: the generator's token budget, the same in every round.

    Returns:
      One list of :class:`QAPair` per document, in document order (possibly empty), round by round,
      without repeated questions.

    Raises:
      ValueError: a document that is not a non-empty string, a count below 1, or a prompt (document and
        earlier pairs) that with ``max_new_tokens`` does not fit the model's window, naming the document
        and the round.
    """
    _check_counts(rounds=rounds, pairs_per_round=pairs_per_round, batch_size=batch_size, max_new_tokens=max_new_tokens)
    for i, doc in enumerate(documents):
        _require_text(doc, f"document {i}")
    out: list[list[QAPair]] = []
    for start in range(0, len(documents), batch_size):
        by_round = _questions_by_round(base, documents[start : start + batch_size], start, rounds, pairs_per_round, max_new_tokens)
        out += [[p for pairs in per_round for p in pairs] for per_round in by_round]
    return out


# The teacher ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "k"))
def _label_top_k(
    config: DecoderConfig, params, tokens: Int[Array, "B T"], mask: Int[Array, "B T"], positions: Int[Array, "B P"], k: int
) -> tuple[Float[Array, "B P K"], Int[Array, "B P K"]]:
    """Top-``k`` log-probabilities and token ids of the next token at ``positions`` of right-padded rows."""
    return jax.lax.top_k(jax.nn.log_softmax(label_logits(config, params, tokens, mask, positions), axis=-1), k)


def label_top_k(base: BaseModel, sequences: Sequence[tuple[list[int], int, int]], top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Teacher-forced top-k at the label positions of ``(ids, start, end)`` sequences (labels ``ids[start:end]``).

    Returns per sequence ``(log_probs float32 [end - start, top_k], ids int32 [end - start, top_k])``: row j
    is the distribution over ``ids[start + j]`` given ``ids[:start + j]``. One forward over the batch
    (padded to a power of two and to length buckets, so few programs compile); only the top-k leave the device.
    """
    rows = 1 << (len(sequences) - 1).bit_length()
    longest, window = max(len(ids) for ids, _, _ in sequences), base.config.max_position_embeddings
    length = min(gen.bucket_length(longest), max(longest, window))
    labels = gen.bucket_length(max(end - start for _, start, end in sequences))
    tokens = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, labels), np.int32)
    for i, (ids, start, end) in enumerate(sequences):
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
        positions[i, : end - start] = np.arange(start - 1, end - 1)
    log_probs, top_ids = jax.device_get(_label_top_k(base.config, base.params, tokens, mask, positions, top_k))
    return [
        (log_probs[i, : end - start].astype(np.float32), top_ids[i, : end - start].astype(np.int32))
        for i, (_, start, end) in enumerate(sequences)
    ]


@dataclasses.dataclass
class TeacherStats:
    """Counts of :func:`teacher_answers`.

    asked: questions put to the teacher; kept: answered records returned.
    unfinished: replies dropped for not ending with an end-of-turn token within ``max_new_tokens``.
    empty: replies dropped for holding no text. retokenized: kept replies whose text tokenises differently
    from the generated tokens (their labels are the tokens training will see).
    overlapping: kept answers with :func:`answer_overlap` >= :data:`OVERLAP_RECALL`.
    """

    asked: int = 0
    kept: int = 0
    unfinished: int = 0
    empty: int = 0
    retokenized: int = 0
    overlapping: int = 0

    def add(self, other: "TeacherStats") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def _record_name(record: dict[str, Any], index: int) -> str:
    of_document = f" of document {record['document_index']}" if "document_index" in record else ""
    return f"record {index}{of_document} ({_preview(record['prompt'])})"


def _answer_batch(
    base: BaseModel, records: Sequence[dict], first_index: int, top_k: int, max_new_tokens: int
) -> tuple[list[dict], TeacherStats]:
    tokenizer, stop_ids = base.tokenizer, base.stop_token_ids
    prompts = [
        _fitting_prompt(base, student_messages(r["prompt"], context=r["context"]), max_new_tokens, _record_name(r, first_index + i))
        for i, r in enumerate(records)
    ]
    stats = TeacherStats(asked=len(records))
    answered, forwarded, sequences = [], [], []
    for record, prompt, reply in zip(records, prompts, generate_replies(base, prompts, max_new_tokens, top_k)):
        response = tokenizer.decode(reply.ids, skip_special_tokens=True)
        if not reply.finished:
            stats.unfinished += 1
        elif not response.strip():
            stats.empty += 1
        else:
            ids, start, end = sequence_with_labels(tokenizer, student_messages(record["prompt"], response, record["context"]), stop_ids)
            retokenized = ids[start : end - 1] != reply.ids
            stats.retokenized += retokenized
            stats.overlapping += answer_overlap(response, record["context"]) >= OVERLAP_RECALL
            answered.append({**record, "response": response})
            if retokenized or ids[:start] != list(prompt) or reply.top_k is None:
                forwarded.append(answered[-1])
                sequences.append((ids, start, end))
            else:  # the training sequence is the generated one: its distributions are the teacher-forced ones
                answered[-1].update(teacher_log_probs=reply.top_k[0], teacher_ids=reply.top_k[1])
    if sequences:
        for record, (log_probs, top_ids) in zip(forwarded, label_top_k(base, sequences, top_k)):
            record.update(teacher_log_probs=log_probs, teacher_ids=top_ids)
    stats.kept = len(answered)
    return answered, stats


def teacher_answers(
    base: BaseModel,
    records: Sequence[dict[str, Any]],
    top_k: int = TOP_K,
    max_new_tokens: int = TEACHER_TOKENS,
    batch_size: int = 8,
) -> tuple[list[dict[str, Any]], TeacherStats]:
    """The teacher's greedy answers to ``{"context", "prompt", ...}`` records, with offline top-k targets.

    The teacher is ``base`` reading ``student_messages(prompt, context=context)``. Its reply becomes
    ``response``; ``teacher_log_probs`` (float32 ``[labels, top_k]``) and ``teacher_ids`` (int32
    ``[labels, top_k]``) are the teacher-forced top-k at the labels of the training teacher sequence
    (``sequence_with_labels`` of ``student_messages(prompt, response, context)``: the reply's tokens through
    the end-of-turn token). Where that sequence is the generated one (the reply's text tokenizes back to the
    same ids), they are the distributions the reply was generated from; otherwise one teacher-forced forward
    per batch computes them. Other fields pass through.

    Returns:
      (the answered records in input order, :class:`TeacherStats`). Replies without an end-of-turn token
      within ``max_new_tokens``, and empty replies, are dropped and counted.

    Raises:
      ValueError: a record whose ``context`` or ``prompt`` is not a non-empty string, a count below 1, or a
        teacher prompt that with ``max_new_tokens`` does not fit the model's window (naming the record).
    """
    _check_counts(top_k=top_k, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for i, record in enumerate(records):
        for key in ("context", "prompt"):
            _require_text(record.get(key), f"record {i}'s {key!r}")
    answered, stats = [], TeacherStats()
    for start in range(0, len(records), batch_size):
        part, part_stats = _answer_batch(base, records[start : start + batch_size], start, top_k, max_new_tokens)
        answered += part
        stats.add(part_stats)
    return answered, stats


# Files -----------------------------------------------------------------------------------------------------------

SCHEMA = pa.schema(
    [
        ("context", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("generator_answer", pa.string()),
        ("round", pa.int32()),
        ("document_index", pa.int64()),
        ("teacher_log_probs", pa.list_(pa.list_(pa.float32()))),
        ("teacher_ids", pa.list_(pa.list_(pa.int32()))),
    ]
)
_STATS_KEY = b"d2l_self_gen_stats"


def _table(rows: Sequence[dict[str, Any]], stats: dict[str, Any]) -> pa.Table:
    cell = lambda value: value.tolist() if isinstance(value, np.ndarray) else value
    table = pa.Table.from_pydict({name: [cell(r.get(name)) for r in rows] for name in SCHEMA.names}, schema=SCHEMA)
    return table.replace_schema_metadata({_STATS_KEY: json.dumps(stats).encode()})


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through a temporary file beside it, so a crash never leaves it half-written."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def parts_dir(out_path: str | os.PathLike) -> Path:
    """Where :func:`generate_qa_file` keeps the finished parts of ``out_path`` (``<out>.parts/``)."""
    out = Path(out_path)
    return out.with_name(out.name + ".parts")


def _claim_parts(parts: Path, settings: dict[str, Any]) -> None:
    """Creates ``parts`` with its settings, or checks that an existing one was made with the same settings."""
    file = parts / "settings.json"
    if file.is_file():
        before = json.loads(file.read_text())
        if before != settings:
            changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
            raise ValueError(
                f"{parts} holds parts made with other settings (differing: {changed}); delete it to start over or choose another output"
            )
        return
    parts.mkdir(parents=True, exist_ok=True)
    _replace_atomically(file, lambda p: p.write_text(json.dumps(settings, indent=1, sort_keys=True)))


def _fingerprint(items: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(items), ensure_ascii=False).encode()).hexdigest()


def _run_parts(out_path, units: list[Sequence[Any]], make_part, settings: dict[str, Any], progress: bool, unit_name: str) -> list[dict]:
    """Runs ``make_part(index, unit) -> (rows, stats)`` for each unit whose part is missing, writes each
    part atomically, then assembles ``out_path`` (atomically) from all parts in order. Returns every part's stats."""
    out = Path(out_path)
    parts = parts_dir(out)
    _claim_parts(parts, settings)
    stats = []
    with tqdm(total=sum(map(len, units)), unit=unit_name, disable=not progress) as bar:
        for index, unit in enumerate(units):
            path = parts / f"{index:05d}.parquet"
            if not path.is_file():
                rows, part_stats = make_part(index, unit)
                _replace_atomically(path, functools.partial(pq.write_table, _table(rows, part_stats)))
            stats.append(json.loads(pq.read_schema(path).metadata[_STATS_KEY]))
            bar.update(len(unit))

    def assemble(temporary: Path) -> None:
        with pq.ParquetWriter(temporary, SCHEMA) as writer:
            for index in range(len(units)):
                writer.write_table(pq.read_table(parts / f"{index:05d}.parquet").cast(SCHEMA))

    _replace_atomically(out, assemble)
    return stats


def _summary(out: Path, documents: int, part_stats: list[dict], seconds: float) -> dict[str, Any]:
    teacher = TeacherStats()
    for s in part_stats:
        teacher.add(TeacherStats(**s["teacher"]))
    per_document = [n for s in part_stats for n in s.get("pairs_per_document", [])]
    summary = {
        "out": str(out),
        "documents": documents,
        "questions_asked": teacher.asked,
        "pairs_kept": teacher.kept,
        "dropped_no_end_of_turn": teacher.unfinished,
        "dropped_empty": teacher.empty,
        "retokenized": teacher.retokenized,
        "answer_overlap_share": teacher.overlapping / teacher.kept if teacher.kept else None,
        "answer_overlap_rule": f"share of kept answers with at least {OVERLAP_RECALL:.0%} of their words in the document",
        "seconds_this_run": round(seconds, 1),
    }
    if per_document:
        summary["pairs_per_document"] = {
            "mean": float(np.mean(per_document)),
            "min": int(min(per_document)),
            "max": int(max(per_document)),
            "none": int(sum(n == 0 for n in per_document)),
        }
    return summary


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    path = out.with_name(out.name + ".summary.json")
    _replace_atomically(path, lambda p: p.write_text(json.dumps(summary, indent=1) + "\n"))


def generate_qa_file(
    base: BaseModel,
    documents: Sequence[str],
    out_path: str | os.PathLike,
    *,
    rounds: int = TRAINING_DATA_ROUNDS,
    pairs_per_round: int = PAIRS_PER_ROUND,
    batch_size: int = 8,
    top_k: int = TOP_K,
    question_tokens: int = QUESTION_TOKENS,
    max_new_tokens: int = TEACHER_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Self-generated training records for ``documents`` in a parquet file, resumably.

    Documents are processed in order, ``batch_size`` at a time: :func:`generate_questions` (``rounds``,
    ``pairs_per_round``, ``question_tokens`` per round), then :func:`teacher_answers` (``top_k``,
    ``max_new_tokens``). Each batch is saved as ``<out>.parts/NNNNN.parquet`` (atomically); a rerun with
    the same documents and settings skips the finished parts. At the end ``out_path`` is assembled from
    all parts (atomically) and a summary written to ``<out>.summary.json``. The parts stay (delete them
    once the file is no longer to be resumed).

    Rows (:data:`SCHEMA`): ``context``, ``prompt`` (the question), ``response`` (the teacher's answer),
    ``generator_answer`` (None where the generator gave none), ``round``, ``document_index`` (into
    ``documents``), ``teacher_log_probs`` float32 ``[labels, top_k]``, ``teacher_ids`` int32 ``[labels, top_k]``:
    a ``RecordSource`` file for training with offline teacher targets.

    Returns:
      The summary: documents, pairs per document (mean, min, max, none), questions asked, pairs kept,
      replies dropped (no end-of-turn, empty), retokenized replies, the answer-overlap share, seconds.

    Raises:
      ValueError: as :func:`generate_questions` and :func:`teacher_answers`; no documents; or an existing
        ``<out>.parts/`` made with other documents or settings.
    """
    if not documents:
        raise ValueError("no documents given")
    for i, doc in enumerate(documents):
        _require_text(doc, f"document {i}")
    _check_counts(
        rounds=rounds,
        pairs_per_round=pairs_per_round,
        batch_size=batch_size,
        top_k=top_k,
        question_tokens=question_tokens,
        max_new_tokens=max_new_tokens,
    )
    settings = {
        "mode": "generate", "model": base.name, "rounds": rounds, "pairs_per_round": pairs_per_round, "batch_size": batch_size,
        "top_k": top_k, "question_tokens": question_tokens, "max_new_tokens": max_new_tokens, "documents": _fingerprint(documents),
    }  # fmt: skip
    units = [documents[i : i + batch_size] for i in range(0, len(documents), batch_size)]

    def make_part(index: int, docs: Sequence[str]) -> tuple[list[dict], dict]:
        first = index * batch_size
        by_round = _questions_by_round(base, docs, first, rounds, pairs_per_round, question_tokens)
        records = [
            {"context": doc, "prompt": question, "generator_answer": answer, "round": round_, "document_index": first + i}
            for i, (doc, per_round) in enumerate(zip(docs, by_round))
            for round_, pairs in enumerate(per_round)
            for question, answer in pairs
        ]
        rows, stats = teacher_answers(base, records, top_k, max_new_tokens, batch_size) if records else ([], TeacherStats())
        return rows, {"pairs_per_document": [sum(map(len, r)) for r in by_round], "teacher": dataclasses.asdict(stats)}

    start = time.perf_counter()
    part_stats = _run_parts(out_path, units, make_part, settings, progress, "doc")
    summary = _summary(Path(out_path), len(documents), part_stats, time.perf_counter() - start)
    _write_summary(Path(out_path), summary)
    return summary


def answer_records_file(
    base: BaseModel,
    records: Sequence[dict[str, Any]],
    out_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    top_k: int = TOP_K,
    max_new_tokens: int = TEACHER_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """As :func:`generate_qa_file` without question generation: the teacher answers the given
    ``{"context", "prompt"}`` records (e.g. a QA data set's own questions, as the reference does for
    SQuAD, ROPES and DROP). Rows have ``generator_answer`` and ``round`` None and ``document_index`` the
    index of the record's context among the distinct contexts in order. Resumable in parts of
    ``batch_size`` records; the summary has no pairs per document."""
    if not records:
        raise ValueError("no records given")
    contexts: dict[str, int] = {}
    for i, record in enumerate(records):
        for key in ("context", "prompt"):
            _require_text(record.get(key), f"record {i}'s {key!r}")
        contexts.setdefault(record["context"], len(contexts))
    _check_counts(batch_size=batch_size, top_k=top_k, max_new_tokens=max_new_tokens)
    pairs = [{"context": r["context"], "prompt": r["prompt"], "document_index": contexts[r["context"]]} for r in records]
    settings = {
        "mode": "teacher", "model": base.name, "batch_size": batch_size, "top_k": top_k, "max_new_tokens": max_new_tokens,
        "records": _fingerprint([(r["context"], r["prompt"]) for r in pairs]),
    }  # fmt: skip
    units = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]

    def make_part(index: int, unit: Sequence[dict]) -> tuple[list[dict], dict]:
        rows, stats = teacher_answers(base, unit, top_k, max_new_tokens, batch_size)
        return rows, {"teacher": dataclasses.asdict(stats)}

    start = time.perf_counter()
    part_stats = _run_parts(out_path, units, make_part, settings, progress, "record")
    summary = _summary(Path(out_path), len(contexts), part_stats, time.perf_counter() - start)
    _write_summary(Path(out_path), summary)
    return summary


# Reading inputs ------------------------------------------------------------------------------------------------


def _json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object")
            rows.append({**row, "_where": f"{path}, line {number}"})
    return rows


def _table_rows(path: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """``columns`` of every row of a JSON Lines or parquet file, each with ``_where`` naming it."""
    if path.suffix in (".jsonl", ".json"):
        rows = _json_lines(path)
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{path} has no column {missing[0]!r} (columns: {table.column_names})")
        rows = [{**row, "_where": f"{path}, record {i}"} for i, row in enumerate(table.select(list(columns)).to_pylist())]
    else:
        raise ValueError(f"{path}: expected a .jsonl or .parquet file")
    for row in rows:
        for column in columns:
            _require_text(row.get(column), f"{row['_where']}: field {column!r}")
    return rows


def read_documents(path: str | os.PathLike, max_documents: int | None = None) -> list[str]:
    """Documents from ``path``: a ``.txt`` file (the whole file is one document), a directory of ``.txt``
    files (one document each, in name order), or a ``.jsonl``/``.parquet`` file with a ``context`` field
    (its distinct contexts, in order). At most the first ``max_documents``. Documents are stripped.

    Raises FileNotFoundError for a missing path, ValueError for another suffix, a directory without
    ``.txt`` files, or an empty document or missing field (naming the file and line or record)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"{path} holds no .txt files")
        documents = [_require_text(f.read_text(encoding="utf-8"), f"{f}").strip() for f in files]
    elif path.suffix == ".txt":
        documents = [_require_text(path.read_text(encoding="utf-8"), f"{path}").strip()]
    else:
        documents = list(dict.fromkeys(row["context"].strip() for row in _table_rows(path, ["context"])))
    return documents[:max_documents]


def read_records(path: str | os.PathLike, max_documents: int | None = None) -> list[dict[str, str]]:
    """``{"context", "prompt"}`` records from a ``.jsonl`` or ``.parquet`` file (other fields are left out),
    only those of the first ``max_documents`` distinct contexts when given.

    Raises FileNotFoundError for a missing file, ValueError for another suffix or a record whose
    ``context`` or ``prompt`` is missing or empty (naming the file and line or record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records = [{"context": row["context"], "prompt": row["prompt"]} for row in _table_rows(path, ["context", "prompt"])]
    if max_documents is not None:
        allowed = set(list(dict.fromkeys(r["context"] for r in records))[:max_documents])
        records = [r for r in records if r["context"] in allowed]
    return records
