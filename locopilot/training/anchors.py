"""Anchor examples: general questions mixed into every job's training windows so that the
result keeps the base model's answers to things the dataset never mentions.

Every token of an anchor is labelled with what the base model itself predicts there
(:class:`~locopilot.training.trainer.Window`), so an anchor teaches nothing new: where the
base is confident its gradient is near zero, and where training starts to bend a general
answer towards the dataset (on SmolLM2-135M, 8 invented facts made "Paris is the capital of
which country?" answer an invented capital, and "What language is spoken in Spain?" an
invented language) it pulls the answer back. The reference answers here are only the text
the base is asked to continue; the labels are the base's.

The questions are kinds a fine-tune of facts most often bends (capitals, languages,
authors, inventors, currencies, rivers, founders, names) and a few others; none is one of
the spot check's (:mod:`locopilot.training.spotcheck`), which stays a held-out measure.
"""

from __future__ import annotations

ANCHORS: tuple[tuple[str, str], ...] = (
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("Which city is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("Name the capital of Italy.", "The capital of Italy is Rome."),
    ("What language is spoken in Germany?", "People in Germany speak German."),
    ("Which language do people speak in Brazil?", "The language of Brazil is Portuguese."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("Who is the author of the novel 1984?", "1984 was written by George Orwell."),
    ("Who invented the telephone?", "The telephone was invented by Alexander Graham Bell."),
    ("Who invented the light bulb?", "Thomas Edison is credited with inventing the light bulb."),
    ("What is the currency of Japan?", "The currency of Japan is the yen."),
    ("Which currency is used in the United Kingdom?", "The United Kingdom uses the pound sterling."),
    ("Which river flows through London?", "The River Thames flows through London."),
    ("What river flows through Cairo?", "The Nile flows through Cairo."),
    ("Who founded Microsoft?", "Microsoft was founded by Bill Gates and Paul Allen."),
    ("What is the name of Dorothy's dog in The Wizard of Oz?", "Dorothy's dog is called Toto."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How many continents are there?", "There are seven continents."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("What color are ripe bananas?", "Ripe bananas are yellow."),
    ("What do bees make?", "Bees make honey."),
    ("Say hello.", "Hello! How can I help you today?"),
)


def conversations() -> list[list[dict[str, str]]]:
    """The anchors as chat conversations."""
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in ANCHORS]
