"""A GGUF whose ``tokenizer.chat_template`` attacks the server, served next to a normal model.

The hostile file is SmolLM2 with its chat template rewritten by gguf-py's
writer (a model llama.cpp really loads, so the template is what fails, not the
load). Its template picks one attack by the last message's text, so one
loaded model tries every classic Jinja escape, each in its own request: reaching
``os`` through globals to ``touch`` a canary file, reading internals, and
exhausting time, memory or the stack (the memory attacks of test_templates: filters,
joins, widths and set blocks that build gigabytes). Each request must fail fast
with a 400 in OpenAI's error shape, no canary may appear, the runner's peak
memory must not grow, and afterwards the hostile model's harmless branch and the
normal model still answer.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import pytest

from tests.conftest import SMOL, Server
from tests.security.conftest import ADMIN, ADMIN_KEY
from tests.test_templates import MEMORY_ATTACKS

HOSTILE = "hostile"
BENIGN = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
OS_CALL = "popen('touch {canary}').read()"

#: The attacks, by the message text that selects them; ``{canary}`` is a path that must never exist.
ATTACKS = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "mro-popen": "{{ ''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__['os']." + OS_CALL + " }}",
    "cycler": "{{ cycler.__init__.__globals__.os." + OS_CALL + " }}",
    "joiner": "{{ joiner.__init__.__globals__.os." + OS_CALL + " }}",
    "namespace": "{{ namespace.__init__.__globals__.os." + OS_CALL + " }}",
    "lipsum": "{{ lipsum.__globals__['os']." + OS_CALL + " }}",
    "template-reference": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os." + OS_CALL + " }}",
    "config": "{{ config.__class__.__init__.__globals__['os']." + OS_CALL + " }}",
    "request": "{{ request.application.__globals__.__builtins__.__import__('os')." + OS_CALL + " }}",
    "own-globals": "{{ raise_exception.__globals__['os']." + OS_CALL + " }}",
    "own-globals-read": "{{ strftime_now.__globals__ }}",
    "attr-filter": "{{ (''|attr('__class__')|attr('__mro__'))[1]|attr('__subclasses__')() }}",
    "format-string": "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "mutate": "{% set _ = messages.append({'role': 'system', 'content': 'x'}) %}",
    "huge-loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge-range": "{% for i in range(10 ** 9) %}{% endfor %}",
    "huge-string": "{{ 'x' * 10 ** 10 }}",
    "huge-list": "{{ [0] * 10 ** 9 }}",
    "huge-power": "{{ 9 ** 99999999 }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "division": "{{ 1 // 0 }}",
    **MEMORY_ATTACKS,
}


def hostile_template(canary: Path) -> str:
    branches = "".join(
        f"{{% elif probe == '{name}' %}}{attack.replace('{canary}', str(canary))}" for name, attack in ATTACKS.items()
    )
    return f"{{% set probe = messages[-1]['content'] %}}{{% if probe == 'benign' %}}{BENIGN}{branches}{{% endif %}}"


def with_chat_template(source: Path, target: Path, template: str) -> Path:
    """A copy of the GGUF at ``source`` whose ``tokenizer.chat_template`` is ``template``.

    gguf-py's reader is no validator (see DESIGN.md); it reads only SmolLM2 here, a file the tests trust.
    """
    reader = gguf.GGUFReader(source)
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert architecture is not None
    writer = gguf.GGUFWriter(target, architecture.contents())
    for field in reader.fields.values():
        # The writer adds the architecture and GGUF.* (header counts) itself.
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.Tokenizer.CHAT_TEMPLATE):
            continue
        if field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    writer.add_chat_template(template)
    for tensor in reader.tensors:
        data = tensor.data
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return target


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ssti") / "CANARY"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, canary: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ssti-server")
    hostile = with_chat_template(smollm2_path, root / "hostile.gguf", hostile_template(canary))
    running = Server(root, {SMOL: smollm2_path, HOSTILE: hostile}, {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY})
    running.start(path="/health")
    yield running
    running.stop()


def chat(server: Server, model: str, text: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2, "stream": stream}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=ADMIN, timeout=120)


def test_the_hostile_model_is_served_with_its_own_template(server: Server) -> None:
    card = httpx.get(f"{server.url}/v1/models/{HOSTILE}", headers=ADMIN, timeout=30).json()
    assert card["error"] is None and card["chat_template"] == "gguf"
    # Its harmless branch answers: the model loads, and what fails below is the template alone.
    reply = chat(server, HOSTILE, "benign")
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_an_attack_fails_its_request_cleanly(server: Server, canary: Path, attack: str) -> None:
    # A template renders before the stream starts, so streaming is tried with the cheaper attacks only.
    for stream in (False,) if attack in MEMORY_ATTACKS else (False, True):
        reply = chat(server, HOSTILE, attack, stream=stream)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert "chat template" in error["message"]
        assert not canary.exists()
    assert HOSTILE in server_loaded(server)


def test_both_models_answer_after_the_attacks(server: Server, canary: Path) -> None:
    runner = runner_pid(server, HOSTILE)
    linux = sys.platform.startswith("linux")
    if linux:
        Path(f"/proc/{runner}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the present RSS
        baseline = status_kib(runner, "VmRSS")
    for attack in ATTACKS:
        assert chat(server, HOSTILE, attack).status_code == 400
    assert chat(server, HOSTILE, "benign").status_code == 200
    if linux:
        # The attacks built their values in the runner's template helper, never in the runner.
        assert status_kib(runner, "VmHWM") - baseline < 128 * 1024
        helper = int(Path(f"/proc/{runner}/task/{runner}/children").read_text().split()[0])
        assert "_render" in Path(f"/proc/{helper}/cmdline").read_text()
    assert runner_pid(server, HOSTILE) == runner  # the same runner all along
    normal = chat(server, SMOL, "Say hi")
    assert normal.status_code == 200, normal.text
    assert normal.json()["choices"][0]["message"]["content"] is not None
    assert not canary.exists()
    assert sorted(server_loaded(server)) == sorted([SMOL, HOSTILE])


def runner_pid(server: Server, model: str) -> int:
    """The pid of ``model``'s runner, from the server's log line that announced its load (the last one)."""
    found = re.findall(rf"loaded model {re.escape(model)} in runner pid (\d+)", server.log_path.read_text())
    assert found, f"no runner for {model} in the server log"
    return int(found[-1])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def server_loaded(server: Server) -> list[str]:
    health = httpx.get(f"{server.url}/v1/engine/health", headers=ADMIN, timeout=10).json()
    loaded: list[str] = health["engine"]["loaded_models"]
    return loaded
