"""A GGUF whose ``tokenizer.chat_template`` attacks the server, served next to a normal model.

The hostile file is SmolLM2 with its chat template rewritten by gguf-py's
writer (a model llama.cpp really loads, so the template is what fails, not the
load). Its template picks one attack by the last message's text, so one
loaded model tries every classic Jinja escape, each in its own request: reaching
``os`` through globals to ``touch`` a canary file, reading internals, and
exhausting time, memory or the stack. Each request must fail fast with a 400
in OpenAI's error shape, no canary may appear, and afterwards the hostile
model's harmless branch and the normal model still answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import pytest

from tests.conftest import SMOL, Server
from tests.security.conftest import ADMIN, ADMIN_KEY

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
    for stream in (False, True):
        reply = chat(server, HOSTILE, attack, stream=stream)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert "chat template" in error["message"]
        assert not canary.exists()
    assert HOSTILE in server_loaded(server)


def test_both_models_answer_after_the_attacks(server: Server, canary: Path) -> None:
    for attack in ATTACKS:
        chat(server, HOSTILE, attack)
    normal = chat(server, SMOL, "Say hi")
    assert normal.status_code == 200, normal.text
    assert normal.json()["choices"][0]["message"]["content"] is not None
    assert chat(server, HOSTILE, "benign").status_code == 200
    assert not canary.exists()
    assert sorted(server_loaded(server)) == sorted([SMOL, HOSTILE])


def server_loaded(server: Server) -> list[str]:
    health = httpx.get(f"{server.url}/v1/engine/health", headers=ADMIN, timeout=10).json()
    loaded: list[str] = health["engine"]["loaded_models"]
    return loaded
