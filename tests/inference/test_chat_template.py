"""The one chat template: token ids equal the original's piece-by-piece tokenization; the Jinja form that the
Hugging Face export writes renders the same text; malformed conversations name the message."""
import jinja2
import pytest

from lwm.text.chat_template import HF_CHAT_TEMPLATE, SYSTEM_PROMPT, conversation_ids, user_turn_ids


def test_first_and_later_turns(tok):
    first = user_turn_ids(tok, "the dog", first=True)
    assert first == [tok.bos_id] + tok.encode(f"{SYSTEM_PROMPT} USER: the dog ASSISTANT:")
    assert user_turn_ids(tok, "a fox", first=False) == tok.encode("USER: a fox ASSISTANT:")


def test_conversation(tok):
    msgs = [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "a fox"},
            {"role": "user", "content": "world"}]
    want = ([tok.bos_id] + tok.encode(f"{SYSTEM_PROMPT} USER: the dog ASSISTANT:") + tok.encode("a fox")
            + [tok.eos_id] + tok.encode("USER: world ASSISTANT:"))
    assert conversation_ids(tok, msgs) == want
    sys_msgs = [{"role": "system", "content": "Be brief."}] + msgs
    assert conversation_ids(tok, sys_msgs)[:8] == ([tok.bos_id] + tok.encode("Be brief. USER: the dog ASSISTANT:"))[:8]
    assert conversation_ids(tok, sys_msgs) != want          # the system message is used (negative control)


@pytest.mark.parametrize("msgs, where", [
    ([], "no user message"),
    ([{"role": "assistant", "content": "x"}], "messages[0]"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages[1]: the last"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": 3}], "messages[1]: content"),
])
def test_bad_conversations(tok, msgs, where):
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        conversation_ids(tok, msgs)


def test_jinja_renders_the_same_text():
    env = jinja2.Environment()
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    text = env.from_string(HF_CHAT_TEMPLATE).render(messages=msgs, bos_token="<s>", eos_token="</s>")
    assert text == "<s>You are a helpful assistant. USER: Hi ASSISTANT: Hello</s>USER: Bye ASSISTANT:"
    text = env.from_string(HF_CHAT_TEMPLATE).render(
        messages=[{"role": "system", "content": "S."}] + msgs[:1], bos_token="<s>", eos_token="</s>")
    assert text == "<s>S. USER: Hi ASSISTANT:"
