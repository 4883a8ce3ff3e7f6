"""`protege chat`: scripted stdin sessions against a local tiny model folder and against a running server."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from protege.chat_repl import Sampling, run_repl

SCRIPT = "hello\n/system Be brief.\nhi\n/reset\nhello\n/bogus\n/exit\nnever sent\n"


class EchoBackend:
    """Records what the REPL sends; replies in two pieces to exercise streaming output."""

    name = "echo"

    def __init__(self):
        self.calls: list[list[dict[str, str]]] = []

    def stream(self, messages, sampling):
        self.calls.append([dict(m) for m in messages])
        yield "you said: "
        yield messages[-1]["content"]


def test_repl_commands_shape_the_history():
    backend, out = EchoBackend(), io.StringIO()
    lines = iter(SCRIPT.splitlines())
    assert run_repl(backend, Sampling(), read=lambda _: next(lines), out=out) == 0
    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    sys_ = {"role": "system", "content": "Be brief."}
    assert backend.calls == [[u("hello")], [sys_, u("hi")], [sys_, u("hello")]]  # /system and /reset start over
    text = out.getvalue()
    assert "you said: hello" in text and "(conversation reset)" in text and "unknown command '/bogus'" in text
    assert "never sent" not in text  # /exit stopped reading


def test_repl_keeps_history_and_ends_at_eof():
    backend, lines = EchoBackend(), iter(["one", "two"])

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert run_repl(backend, Sampling(), system="S", read=read, out=io.StringIO()) == 0
    assert backend.calls[1] == [{"role": "system", "content": "S"}, {"role": "user", "content": "one"},
                                {"role": "assistant", "content": "you said: one"}, {"role": "user", "content": "two"}]


def _greedy(model, tok, messages, n=8):
    from protege.engine import Engine, SamplingParams

    eng = Engine(model, tok)
    return eng.generate([eng.chat_format.encode_prompt(messages)], SamplingParams(max_new_tokens=n))[0].text


def _run_cli(args, stdin):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "chat", *args, "--temperature", "0",
                           "--max-tokens", "8"], input=stdin, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _check_transcript(stdout, model, tok):
    hello = _greedy(model, tok, [{"role": "user", "content": "hello"}])
    brief = _greedy(model, tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    replies = [line.removeprefix("> ") for line in stdout.splitlines()[1:]]
    assert replies[0] == hello  # first turn
    assert "(system prompt set; conversation reset)" in replies[1]
    assert replies[2] == brief  # system prompt applied, previous turn forgotten
    assert "(conversation reset)" in replies[3]
    # after /reset the system prompt stays but the history is gone
    assert replies[4] == _greedy(model, tok, [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "hello"}])


def test_cli_chat_with_local_model_folder(tiny_llama_dir, tiny_llama):
    stdout = _run_cli([str(tiny_llama_dir)], SCRIPT)
    assert stdout.startswith(f"chatting with {tiny_llama_dir}")
    _check_transcript(stdout, *tiny_llama)


def test_cli_chat_with_url_of_running_server(tiny_llama):
    from protege.engine import Engine
    from protege.serve import background_server, create_app

    app = create_app(Engine(*tiny_llama), "tiny-llama")
    with background_server(app) as url:
        stdout = _run_cli(["--url", url], SCRIPT)
    assert stdout.startswith("chatting with tiny-llama")
    _check_transcript(stdout, *tiny_llama)


def test_cli_chat_needs_model_or_url():
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "chat"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "give a MODEL to load here, or --url URL" in proc.stderr


def test_cli_chat_with_url_names_the_servers_model_and_survives_a_refused_reply(tiny_llama):
    """With --url, MODEL is the server's model name; a name the server does not serve is the server's own 404,
    shown in the chat, which goes on without that message (the next turn is answered as if it were the first)."""
    from protege.engine import Engine
    from protege.serve import background_server, create_app

    app = create_app(Engine(*tiny_llama), "tiny-llama")
    with background_server(app) as url:
        stdout = _run_cli(["tiny-llama", "--url", url], SCRIPT)
        assert stdout.startswith("chatting with tiny-llama")
        _check_transcript(stdout, *tiny_llama)
        wrong = _run_cli(["no-such-model", "--url", url], "hello\n/exit\n")
    assert "(error: teacher openai:no-such-model@" in wrong and "HTTP 404: The model `no-such-model` does not exist" in wrong


def test_repl_drops_a_message_whose_reply_failed():
    from protege.chat_repl import ReplyError

    class Flaky(EchoBackend):
        def stream(self, messages, sampling):
            if messages[-1]["content"] == "too long":
                self.calls.append([dict(m) for m in messages])
                yield "half"
                raise ReplyError("prompt has 9 tokens; the model takes at most 8")
            yield from super().stream(messages, sampling)

    backend, out, lines = Flaky(), io.StringIO(), iter(["too long", "short", "/exit"])
    assert run_repl(backend, Sampling(), read=lambda _: next(lines), out=out) == 0
    assert backend.calls[-1] == [{"role": "user", "content": "short"}]  # the failed turn was not kept
    assert "half\n(error: prompt has 9 tokens; the model takes at most 8; that message was not kept)" in out.getvalue()


def test_cli_chat_refuses_an_unreachable_server_and_a_non_key_variable_in_one_line():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = subprocess.run([sys.executable, "-m", "protege.cli", "chat", "--url", f"http://127.0.0.1:{port}"],
                          input="", capture_output=True, text=True, timeout=120)
    assert down.returncode != 0 and f"cannot reach http://127.0.0.1:{port}/v1/" in down.stderr
    assert "Traceback" not in down.stderr
    secret = subprocess.run([sys.executable, "-m", "protege.cli", "chat", "--url", "http://127.0.0.1:1",
                             "--api-key-env", "HOME"], input="", capture_output=True, text=True, timeout=120)
    assert secret.returncode != 0 and "--api-key-env: " in secret.stderr and "*_API_KEY" in secret.stderr


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_cli_chat_on_builtin_models(alias):
    from conftest import builtin_model

    builtin_model(alias)
    stdout = _run_cli([alias], "What is the capital of France?\n/exit\n")
    assert stdout.startswith(f"chatting with {alias}")
    assert len(stdout.splitlines()) >= 2


def test_cli_chat_names_a_bad_sampling_flag_before_loading_anything():
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "chat", "no-such-model", "--top-p", "1.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--top-p: Input should be less than or equal to 1 (got 1.5)" in proc.stderr


def test_chat_sampling_is_the_config_sampling_with_chat_defaults():
    from protege.config import Sampling as ConfigSampling
    from protege.engine import SamplingParams

    s = Sampling(top_k=5, seed=3)
    assert isinstance(s, ConfigSampling) and (s.temperature, s.max_new_tokens) == (0.7, 512)
    p = SamplingParams.from_config(s, s.seed, ["</s>"])
    assert (p.max_new_tokens, p.temperature, p.top_k, p.seed, p.stop) == (512, 0.7, 5, 3, ["</s>"])
    assert SamplingParams.from_config(Sampling(temperature=0, seed=3), 3).seed is None  # greedy: one cache entry


def test_cli_chat_sends_the_key_from_its_variable_to_a_server_that_needs_one(tiny_llama):
    from protege.engine import Engine
    from protege.serve import background_server, create_app

    app = create_app(Engine(*tiny_llama), "tiny-llama", api_key="s3cret")
    with background_server(app) as url:
        env = dict(os.environ, PROTEGE_API_KEY="s3cret", HF_HUB_OFFLINE="1")
        ok = subprocess.run([sys.executable, "-m", "protege.cli", "chat", "--url", url, "--max-tokens", "4"],
                            input="hi\n/exit\n", capture_output=True, text=True, timeout=120, env=env)
        assert ok.returncode == 0 and ok.stdout.startswith("chatting with tiny-llama"), ok.stderr
        env.pop("PROTEGE_API_KEY")
        refused = subprocess.run([sys.executable, "-m", "protege.cli", "chat", "--url", url], input="",
                                 capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr and "Traceback" not in refused.stderr
