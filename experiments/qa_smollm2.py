"""Real-document QA meta-training of a CPU-sized D2L on the embedded SmolLM2-135M-Instruct.

    python -m launch.train --config=experiments/qa_smollm2.py --workdir=runs/qa          # variant kl
    python -m launch.train --config=experiments/qa_smollm2.py:mixed --workdir=runs/mixed

The reference's main recipe (top-16 KL to the teacher, the base model with the paragraph in its prompt; the
student sees the question alone; closed-QA prompts; L1 0.1 on the combined adapters) with the changes each
field's comment names, sized so that a run learns within about two hours on a 2-core CPU, starting from the
shipped needle hypernetwork's Perceiver. Variants: ``kl`` (answer sentences for 400 steps, then whole
passages), ``mixed`` (both together throughout), ``ce`` (``kl`` on the gold answers, no teacher),
``sentences`` (a diagnostic: answer sentences only, validated on held-out answer sentences), ``per_layer``
(the reference's per-layer reader on all layers, fresh), ``grouped`` (four questions of a passage sharing its
internalization), ``swapped`` (original and answer-swapped passages mixed, see the variant), ``needles``
(keyed numbers hidden in the passages, one asked for: a reading task between NIAH and SQuAD), ``needles_squad``
(SQuAD passages mixed with keyed needles, the curriculum's next stage), ``replies`` (the teacher's own replies
as labels, offline top-16 targets; the file :data:`TEACHER_REPLIES` names). Validation
every ``eval_every`` steps: QA token F1 and the gold answer's log-likelihood on held-out SQuAD articles of the
student without the paragraph, of the control (another paragraph's adapter), and at step 0 the base model
with and without the paragraph. Runs and their curves: ``results/qa_smollm2/``.
"""

import dataclasses

import ml_collections

from d2l_jax.hypernet.config import HypernetConfig

SQUAD = "../shared/data/qa/squad-train-v1.1.json.gz"
# The teacher's own replies to SQuAD training questions (the reference's self-generated responses), written by
#   python -m launch.generate_qa --qa_set=../shared/data/qa/squad-train-v1.1.json.gz --contexts=passage \
#       --max_questions=2400 --max_new_tokens=64 --batch_size=32 --out=runs/squad_teacher_replies.parquet
TEACHER_REPLIES = "runs/squad_teacher_replies.parquet"
VARIANTS = ("kl", "ce", "mixed", "sentences", "per_layer", "grouped", "swapped", "needles", "needles_squad", "replies")


def get_config(variant: str = "kl") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of qa_smollm2; known: {VARIANTS}")
    config = ml_collections.ConfigDict()
    config.model = "smollm2-135m-instruct"
    # The NIAH preset (early-exit encoder, a narrow 2-block Perceiver, one head per rank, B zero at
    # initialisation; 64-token chunks, at most 8 per paragraph; adapters on the last 4 layers) as the shipped
    # needle hypernetwork has it, so that its Perceiver starts from that one's (init_from), but with A
    # generated from the document as the reference does: with a shared A the adapter's input side is the same
    # 8 directions per layer for every paragraph, a fixed key for any question (runs 1-4 learned no
    # paragraph-specific answer with it).
    config.hypernet = dataclasses.asdict(HypernetConfig.niah_cpu(shared_a=False))
    config.execution = dict(dtype="bfloat16", scan_unroll=1, iterative=False, chunk_group_size=4)
    config.base_execution = dict(param_dtype="bfloat16", scan_unroll=30)
    config.train = dict(
        loss="ce" if variant == "ce" else "top_k_kl",
        # Online: the teacher's top-16 come from the step's own forward of paragraph + question + answer (the
        # reference stores them offline; one epoch is not reached here, so storing them would save nothing).
        teacher="online",
        top_k=16,
        l1_coef=0.1,
        # A short run from a hypernetwork that already reads: the rate of the NIAH recipe's fine-tuning stage
        # (12.5x the reference's 4e-5) on batches of 8 rows instead of 64 packed rows.
        learning_rate=5e-4,
        # As the NIAH recipe: the Perceiver learns at a tenth of the head's rate.
        perceiver_lr_scale=0.1,
        min_learning_rate=1e-6,
        warmup_steps=50,
        steps=3000,  # the cosine's length; the time limit ends the run earlier on this CPU
        batch_size=8,
        grad_accum_steps=1,
        encoder_chunk_rows=8,  # groups of padding chunks only are skipped
        seed=42,
        mesh=(),
    )
    squad = lambda context: dict(name="qa", options=dict(path=SQUAD, split="train", template="closed_qa", context=context))
    config.data = dict(
        # SQuAD's training articles alone. (Chosen when ROPES was thought to give the embedded model nothing to
        # read; on held-out ROPES backgrounds it gains 8.8 F1 points from the document, results/qa_ropes/.)
        source=squad("passage"),
        # A curriculum, as the NIAH recipe's: first the passage's sentence that holds the answer (median 35
        # tokens, one chunk), where the hypernetwork can learn to carry a fact, then whole passages.
        warmup_source=squad("answer_sentence"),
        warmup_steps=400,
        chunk_probs=(),
        min_chunk_len=25,
        chunks_per_context=8,
        # Questions whose answer has more than 15 tokens (3% of a sample of 600) or whose teacher sequence
        # (paragraph + student sequence, median 203 tokens) is longer than 352 (5%) are dropped and counted.
        max_student_len=80,
        max_labels=16,
        max_teacher_len=0 if variant == "ce" else 352,
    )
    config.evaluator = dict(
        name="qa", options=dict(path=SQUAD, split="validation", context="passage", questions=48, max_new_tokens=32)
    )
    config.eval_every = 200
    config.checkpoint_every = 200
    config.keep_checkpoints = 2
    config.log_every = 10
    config.time_limit_minutes = 95.0
    config.init_from = "smollm2-135m-niah"
    # Only what fits: the Perceiver, the pre-head blocks, the scalers and the bias LoRA's A (the head has
    # the A columns the needle head lacks, so it starts fresh).
    config.init_partial = True
    # The bias LoRA's B zeroed: the student starts as the base model (the needle hypernetwork's own adapters
    # took the distillation loss from 2.5 to 23 nats on SQuAD questions, run 3).
    config.init_without_b = True

    def train_on(source):
        """The variant's source from the first step, without the answer-sentence warm-up."""
        config.data.source = source
        config.data.warmup_source = None
        config.data.warmup_steps = 0

    if variant == "mixed":
        # Answer sentences and whole passages mixed equally throughout instead of one after the other: on
        # passages alone after the sentences (run 5) the paragraph's adapter lost its lead over another
        # paragraph's within 200 steps.
        train_on(squad(("answer_sentence", "passage")))
    if variant == "sentences":
        # A diagnostic: answer sentences only, validated on held-out answer sentences, to see whether the
        # hypernetwork carries a single fact when the document is that fact's sentence.
        train_on(squad("answer_sentence"))
        config.evaluator.options.context = "answer_sentence"
    if variant == "grouped":
        # Whole passages from the start, four questions of a passage sharing its internalization in a step
        # (data.queries_per_context): four contexts and 16 questions per step instead of 8 and 8, so the
        # hypernetwork's cost is paid once per four questions. Run 9 started it from the kl variant's
        # step 400 (run 5's, after the answer sentences): --config.init_from=RUN5_WORKDIR
        # --config.init_partial=False --config.init_without_b=False.
        train_on(squad("passage"))
        config.data.queries_per_context = 4
        # A group is dropped when one of its questions does not fit: room for longer answers and passages.
        config.data.max_labels = 24
        config.data.max_teacher_len = 416
        config.train.batch_size = 4
        config.train.encoder_chunk_rows = 8
        config.evaluator.options.questions = 96
    if variant == "swapped":
        # Original passages mixed equally with counterfactual ones (each passage's answer replaced by another
        # question's answer of the same kind, context="answer_swapped"), so that a question's answer depends
        # on the document: trained and validated on 16 training paragraphs, the grouped recipe learned the
        # answers of the questions themselves, the control as much as the paragraph's own adapter.
        train_on(squad(("passage", "answer_swapped")))
        config.evaluator.options.questions = 96
    if variant == "needles":
        # Three keyed numbers hidden in each passage ("The code of the red door is 4721."), one of them asked
        # for (context="keyed_needles"), validated on held-out passages' keyed needles: trained further on 16
        # paragraphs and their answer-swapped twins, run 10's hypernetwork made a paragraph's and its twin's
        # adapters 2% apart (unrelated paragraphs' 25%) and answered both alike, so its reader keeps which
        # paragraph it read, not which span answers which question. The needle hypernetwork's reader found a
        # marked number in noise; here it must find three in prose and keep each with its key.
        train_on(squad("keyed_needles"))
        config.evaluator.options.context = "keyed_needles"
        config.evaluator.options.questions = 96
    if variant == "needles_squad":
        # The curriculum's next stage: SQuAD's own questions on its passages mixed equally with keyed needles,
        # validated on held-out passages' own questions. The needles keep the reader finding spans (on them
        # run 11 learned a paragraph-specific gain that SQuAD's questions alone never gave) while the passages
        # ask for spans that are not marked. Run 12 started it from run 11's hypernetwork:
        # --config.init_from=RUN11_WORKDIR --config.init_partial=False --config.init_without_b=False.
        train_on(squad(("keyed_needles", "passage")))
        config.evaluator.options.questions = 96
    if variant == "replies":
        # The reference's labels: the teacher's own replies to the questions (median 18 tokens, up to 64)
        # instead of SQuAD's gold answers (3-5 tokens), so each question gives the KL several times the
        # positions, on the answers the teacher actually gives with the paragraph. Targets are the top-16
        # stored with the replies (offline), so a step runs no teacher forward (1.5 s instead of 2.5-3.4 s).
        # Run 13 started it from run 12r's step 1570 (--config.init_from=RUN12_WORKDIR
        # --config.init_partial=False --config.init_without_b=False): the paragraph's lead over another's grew
        # on the harness, while both adapters fell below the base model without the paragraph.
        train_on(dict(name="records", options=dict(path=TEACHER_REPLIES)))
        config.train.teacher = "offline"
        config.data.max_student_len = 144
        config.data.max_labels = 72
        config.data.max_teacher_len = 0
        config.evaluator.options.questions = 96
    if variant == "per_layer":
        # The reference's main-experiment reader instead of the needle one: layer l's adapter is generated
        # from the paragraph's own layer-l states (per_layer_activations), on every layer (not the last 4),
        # one latent per rank and a head shared by ranks as the reference has it; narrow and shallow as the
        # NIAH preset for this CPU. A fresh hypernetwork (the needle one's reader reads layer-7 states).
        config.hypernet = dataclasses.asdict(
            HypernetConfig.niah_cpu(
                encoder_type="per_layer_activations",
                n_latent_queries=8,
                max_chunk_len=96,
                adapted_layers=0,
                per_rank_head=False,
                shared_a=False,
            )
        )
        config.init_from = ""
        config.init_partial = False
        config.init_without_b = False
        # A fresh hypernetwork adapting all 30 layers: at the NIAH recipe's first-stage rate (1e-3) the
        # distillation loss went from 2.6 to 11.7 once the warm-up reached it (step 50, run 8a).
        config.train.learning_rate = 3e-4
        # Three 96-token chunks per paragraph instead of eight of 64: the Perceiver now runs once per layer
        # and chunk row, so rows of padding cost 30 times what they did (8.6 s per step with 8 x 8 rows).
        config.data.chunks_per_context = 3
        config.train.encoder_chunk_rows = 8
        # 96 held-out questions per validation instead of 48 (48 could not resolve 0.1 nats, runs 4-7).
        config.evaluator.options.questions = 96
        config.eval_every = 250
        config.checkpoint_every = 250
    return config
