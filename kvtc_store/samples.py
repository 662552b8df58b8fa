"""The model's own samples as calibration text (data-free calibration).

A corpus covers the genres it holds; the model's samples cover what the model itself
writes and reads in its chat template: answers, stories, code, lists, letters. Sampling
the model from diverse prompts at temperature 1 is the standard data-free calibration
source of post-training quantisation (LLM-QAT, Liu et al. 2023, arXiv 2305.17888, §2.1:
data-free distillation from the model's own generations). The prompts below are a fixed, hand-written list of tasks in many
genres, none of them taken from the evaluation texts; generation is seeded, so the same
model on the same device gives the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, for a high-school student.",
    "Write a Python function that merges two sorted lists, with a docstring and tests.",
    "Give me a recipe for a vegetable curry, with ingredients and numbered steps.",
    "What were the main causes of the French Revolution?",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "Summarise the plot of a mystery novel you invent, chapter by chapter.",
    "Explain the difference between TCP and UDP with examples.",
    "Write a poem about autumn rain in a city.",
    "How do I set up a virtual environment in Python and install packages?",
    "Describe the water cycle step by step.",
    "Write a dialogue between a customer and a bank clerk about opening an account.",
    "List ten tips for preparing for a job interview, with a sentence on each.",
    "Explain what a hash table is and how collisions are handled.",
    "Write a JavaScript function that debounces another function, and explain it.",
    "Tell me about the history of the printing press.",
    "Write a product description for a waterproof hiking backpack.",
    "Explain photosynthesis and why it matters for life on Earth.",
    "Write a SQL query for the top five customers by order value; explain each clause.",
    "Translate into French and explain the grammar: 'I would have gone if it had not rained.'",
    "Write a cover letter for a junior data analyst position.",
    "What is the Pythagorean theorem? Prove it and give three worked examples.",
    "Write a bash script that backs up a folder to a dated archive.",
    "Describe a day in the life of a medieval blacksmith.",
    "Explain inflation and interest rates in simple terms.",
    "Write a fairy tale about a fox who learns to read.",
    "Compare electric cars and petrol cars: costs, emissions, maintenance.",
    "Write the minutes of a team meeting about a delayed software release.",
    "Explain how a neural network learns, with a small numeric example.",
    "Give a beginner's guide to growing tomatoes on a balcony.",
    "Write a C function that reverses a linked list, with comments.",
    "Describe the planets of the solar system, one paragraph each.",
    "Write a speech for a friend's wedding, warm and a little funny.",
    "Explain the rules of chess to someone who has never played.",
    "Write a news report about a new bridge opening in a small town.",
    "What is the difference between weather and climate? Give data examples.",
    "Write a Rust program that counts word frequencies in a text file.",
    "Explain the causes and effects of the Great Depression.",
    "Write a haiku sequence about the sea, then explain the imagery.",
    "Draft a privacy policy section about cookies for a small website.",
    "Explain Big-O notation with examples of common algorithms.",
    "Write a letter from a soldier to his family in 1916.",
    "How does a refrigerator work? Explain the thermodynamics.",
    "Write a role-play conversation between a doctor and a patient with a headache.",
    "Give a table of common Spanish verbs with their present-tense forms.",
    "Explain how to read a balance sheet, line by line.",
    "Write a science-fiction scene set on a generation ship.",
    "Write a YAML config for a web service with a database and a cache; explain the fields.",
    "Explain the theory of evolution by natural selection with examples.",
    "Write a troubleshooting guide for a laptop that does not turn on.",
    "Describe the architecture of ancient Rome and its influence today.",
    "Write unit tests in Python for a function that validates email addresses.",
    "Explain how the stock market works to a ten-year-old.",
    "Write a travel itinerary for three days in Kyoto.",
    "What are prime numbers? Write code to list primes below 100 and explain it.",
    "Write an apology message to a customer whose order arrived late.",
    "Explain the greenhouse effect with numbers.",
    "Write a detective's monologue as she solves a case.",
    "Explain how Git branches and merges work, with commands.",
    "Write a children's song about brushing teeth.",
    "Describe the human heart and how blood circulates.",
    "Write a debate opening statement for and against school uniforms.",
    "Explain what an API is, with a REST example request and response.",
    "Write a diary entry of an astronaut on the International Space Station.",
)


@torch.no_grad()
def model_samples(
    model,
    tokenizer,
    n_tokens: int,
    seed: int = 0,
    max_new_tokens: int = 512,
    batch: int = 16,
    temperature: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Token ids of the model's own answers to :data:`SAMPLE_PROMPTS`, in its chat template.

    Each sample is one chat (the prompt as the user's turn, the sampled answer as the
    assistant's), templated by ``tokenizer.apply_chat_template``; samples are
    concatenated until ``n_tokens`` are reached, prompts taken in turn (a second pass
    draws new answers to the same prompts).

    Args:
        model: a causal LM (transformers), on any device.
        tokenizer: its tokenizer, with a chat template (a plain ``"User: ...\\n"``
            prompt otherwise).
        n_tokens: tokens to return.
        seed: sampling seed (``torch.manual_seed``; the same model, device and seed
            give the same tokens).
        max_new_tokens: longest answer, in tokens.
        batch: prompts sampled at once (fewer when ``n_tokens`` needs fewer: a batch is
            counted at half its longest answers).
        temperature: sampling temperature (1.0: the model's own distribution, no top-k
            or top-p truncation).
        progress: ``progress(tokens_so_far, n_tokens)`` after every generation step (the
            batch's prompts and the answer tokens sampled so far, each answer counted up
            to its EOS, as they will be kept) and after each batch; on a CPU a batch of
            16 answers of 512 tokens takes many minutes, so a caller that showed only
            whole batches would look hung. Reporting changes nothing sampled.

    Returns:
        ``n_tokens`` token ids (ints).

    Raises:
        ValueError: ``n_tokens`` or ``batch`` below 1.
    """
    if n_tokens < 1 or batch < 1:
        raise ValueError(f"n_tokens and batch must be positive (got {n_tokens}, {batch})")
    device = next(model.parameters()).device
    batch = min(batch, -(-2 * n_tokens // max_new_tokens))
    torch.manual_seed(seed)
    out: list[int] = []
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    i = 0
    while len(out) < n_tokens:
        prompts = [SAMPLE_PROMPTS[(i + j) % len(SAMPLE_PROMPTS)] for j in range(batch)]
        i += batch
        chats = [_chat_ids(tokenizer, p) for p in prompts]
        width = max(len(c) for c in chats)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, c in enumerate(chats):  # left padding: generation continues at the right
            ids[r, width - len(c) :] = torch.tensor(c)
            mask[r, width - len(c) :] = 1
        streamer = None
        if progress is not None:
            base = len(out) + sum(len(c) for c in chats)
            streamer = _StepCounter(batch, tokenizer.eos_token_id, base, n_tokens, progress)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            streamer=streamer,
        )
        for r, c in enumerate(chats):
            answer = gen[r, width:].tolist()
            if tokenizer.eos_token_id in answer:
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
            out += c + answer
        if progress is not None:
            progress(min(len(out), n_tokens), n_tokens)
    log.info("model samples: %d tokens from %d prompts", len(out), i)
    return out[:n_tokens]


class _StepCounter:
    """A ``generate`` streamer that reports the tokens sampled so far, every step.

    transformers' ``generate(streamer=...)`` calls ``put`` once with the prompt ids
    ``(batch, width)``, then with each step's new tokens ``(batch,)``, then ``end``
    (the ``BaseStreamer`` protocol, transformers.generation.streamers). A row counts
    until it has sampled ``eos`` (included, as :func:`model_samples` keeps it).

    Args:
        batch: rows sampled at once.
        eos: the EOS id (None: rows count every step).
        base: tokens already done when the batch starts (earlier samples and this
            batch's prompts).
        n_tokens: the total asked (reports are capped at it).
        progress: ``progress(tokens_so_far, n_tokens)``.
    """

    def __init__(self, batch: int, eos: int | None, base: int, n_tokens: int, progress) -> None:
        self.live = torch.ones(batch, dtype=torch.bool)
        self.eos, self.done, self.n_tokens, self.progress = eos, base, n_tokens, progress
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Count one step's tokens (the first call, the prompt, counts nothing)."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.done += int(self.live.sum())
        if self.eos is not None:
            self.live &= value.reshape(-1).cpu() != self.eos
        self.progress(min(self.done, self.n_tokens), self.n_tokens)

    def end(self) -> None:
        """Generation is over (the batch's report follows in :func:`model_samples`)."""


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as a user turn in the model's chat template, ready for the answer."""
    messages = [{"role": "user", "content": prompt}]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except (ValueError, AttributeError):  # no chat template
        return tokenizer(f"User: {prompt}\nAssistant:").input_ids
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
