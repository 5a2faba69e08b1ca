"""Unit tests of the serve package's pure parts: stop filtering, chat transcripts, session ids, config, token."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.config import ConfigError
from megacontext.serve.chat import ChatFormat, ChatMessage, record_reply, text_to_append
from megacontext.serve.config import ServeConfig, read_token
from megacontext.serve.errors import ServeError
from megacontext.serve.sessions import capacity, check_session_id
from megacontext.serve.stops import StopFilter


# ---------------------------------------------------------------------- stops
@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab\nU:", max_size=40), stops=st.lists(st.text(alphabet="ab\nU:", min_size=1,
                                                                            max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stop_filter_emits_exactly_the_text_before_the_first_stop(text, stops, cuts):
    # reference: read the text one character at a time; the first stop string to complete ends it
    ends = [(e, -len(s)) for e in range(len(text) + 1) for s in stops if text[:e].endswith(s)]
    hits = min(ends, default=None)
    want = text[: hits[0] + hits[1]] if hits else text
    f, out, prev = StopFilter(stops), [], 0
    for c in sorted(set(cuts)) + [len(text)]:  # any split of the stream into pieces
        out.append(f.feed(text[prev:c]))
        prev = max(prev, c)
        for s in stops:  # nothing emitted so far may contain a stop string
            assert s not in "".join(out)
    if f.stopped_on is None:
        out.append(f.finish())
    assert "".join(out) == want
    assert (f.stopped_on is not None) == bool(hits)


# ---------------------------------------------------------------------- chat
class _NoTemplate:
    chat_template = None


PLAIN = ChatFormat(_NoTemplate())


def test_plain_format_renders_role_prefixed_lines_and_stops_at_roles():
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", " hi ")]
    assert PLAIN.render(msgs, True) == "System: Be brief.\nUser: hi\nAssistant:"
    assert "\nUser:" in PLAIN.stops and PLAIN.turn_end == "\n"
    with pytest.raises(ServeError) as e:
        PLAIN.render([ChatMessage("wizard", "x")], False)
    assert e.value.status == 400


def test_resent_history_is_not_appended_twice_and_the_stop_prefix_is_reused():
    state: dict = {}
    first = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi")]
    assert text_to_append(PLAIN, first, state, True) == "System: Be brief.\nUser: hi\nAssistant:"
    record_reply(state, "hello!", "\nUser:")  # the reply stopped on "\nUser:", which the memory now holds
    second = first + [ChatMessage("assistant", "hello!"), ChatMessage("user", "bye")]
    assert text_to_append(PLAIN, second, state, False) == " bye\nAssistant:"
    record_reply(state, "ciao", "")  # cut by the length limit: the turn's newline is still owed
    only_new = [ChatMessage("user", "again")]  # a client sending only its new message
    assert text_to_append(PLAIN, only_new, state, False) == "\nUser: again\nAssistant:"
    state["pending"] = None  # something else was appended since: start on a fresh line
    assert text_to_append(PLAIN, only_new, state, False) == "\nUser: again\nAssistant:"
    assert text_to_append(PLAIN, only_new, state, True) == "User: again\nAssistant:"


class _Templated:
    chat_template = "x"  # apply_chat_template below stands in for a jinja template

    def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_template_format_derives_its_turn_end_and_appends_the_difference():
    fmt = ChatFormat(_Templated())
    assert fmt.template and fmt.turn_end == "<|im_end|>\n" and fmt.stops == ("<|im_end|>",)
    state: dict = {}
    msgs = [ChatMessage("user", "hi")]
    assert text_to_append(fmt, msgs, state, True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    record_reply(state, "hello", "<|im_end|>")  # stopped on the end token: the newline is owed
    msgs += [ChatMessage("assistant", "hello"), ChatMessage("user", "bye")]
    assert text_to_append(fmt, msgs, state, False) == "\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------- ids, config, token
@pytest.mark.parametrize("sid", ["a", "agent-1", "A_b-9", "x" * 64])
def test_good_session_ids(sid):
    assert check_session_id(sid) == sid


BAD_IDS = ["", ".", "..", "../x", "a/b", "a\\b", "%2e%2e", "..%2f", "-lead", "_lead", "x" * 65, "a.b", "a b",
           "abc\n", "a\x00", "\uff41\uff42", "\u0430bc", "a\u0301", "\u2024\u2024", "\uff0e\uff0e", None, 7]


@pytest.mark.parametrize("sid", BAD_IDS)
def test_bad_session_ids_are_refused(sid):
    with pytest.raises(ServeError) as e:
        check_session_id(sid)
    assert e.value.status == 400 and "\n" not in e.value.message


def test_capacity_stays_below_what_the_budget_can_tile():
    from megacontext.api import EngineConfig
    from megacontext.wc.tiling import reach

    for w_max, recent in ((160, 64), (1024, 128), (4096, 256)):
        cfg = EngineConfig.from_dict({"wc": {"w_max": w_max, "recent_raw": recent}})
        assert 0 < capacity(cfg, 10**9) <= reach(w_max, recent)
        assert capacity(cfg, 1000) == 1000


def test_serve_config_validation():
    with pytest.raises(ConfigError, match="loopback"):
        ServeConfig(insecure_local=True, host="0.0.0.0")
    ServeConfig(insecure_local=True, host="::1")
    with pytest.raises(ConfigError, match="max_open"):
        ServeConfig(max_open=0)
    with pytest.raises(ConfigError, match="focus"):
        ServeConfig(focus_policies=("telepathy",))


def test_token_comes_from_file_or_environment_and_is_required(tmp_path):
    with pytest.raises(ConfigError, match="no bearer token"):
        read_token(ServeConfig(), environ={})
    assert read_token(ServeConfig(insecure_local=True), environ={}) is None
    assert read_token(ServeConfig(), environ={"MEGACONTEXT_TOKEN": "t" * 20}) == "t" * 20
    with pytest.raises(ConfigError, match="at least"):
        read_token(ServeConfig(), environ={"MEGACONTEXT_TOKEN": "short"})
    f = tmp_path / "tok"
    f.write_text("f" * 24 + "\n")
    assert read_token(ServeConfig(token_file=str(f)), environ={"MEGACONTEXT_TOKEN": "e" * 20}) == "f" * 24


def test_cli_refuses_an_open_server_on_a_public_address(monkeypatch, capsys):
    from megacontext.cli import main

    monkeypatch.delenv("MEGACONTEXT_TOKEN", raising=False)
    assert main(["serve", "--insecure-local", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    assert main(["serve"]) == 2  # no token, not insecure: refused before anything loads
    assert "no bearer token" in capsys.readouterr().err


@pytest.mark.parametrize(("cmd", "needle"), [("serve", "/v1/chat/completions"), ("mcp", "focus_map")])
def test_help_documents_the_commands(cmd, needle, capsys):
    from megacontext.cli import main

    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and needle in out and "--insecure-local" in out and "--max-body-bytes" in out
