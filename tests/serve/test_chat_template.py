"""Chat through a real Hugging Face tokenizer with a chat template (in-process service, tiny model)."""

from __future__ import annotations

from megacontext.api import EngineConfig
from megacontext.serve.chat import ChatMessage
from megacontext.serve.config import ServeConfig
from megacontext.serve.service import MemoryService, make_params
from tests.serve.conftest import build_tiny_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_uses_the_template_and_appends_each_turn_once(tmp_path):
    model = build_tiny_model(tmp_path / "tiny-chat", chat_template=CHATML)
    cfg = ServeConfig(data_root=str(tmp_path / "data"), models=(str(model),), device="cpu",
                      engine=EngineConfig.from_dict({"wc": {"w_max": 160, "recent_raw": 64}}))
    service = MemoryService(cfg)
    try:
        service.create_session("c")
        params = make_params(max_new_tokens=4)
        first = [ChatMessage("system", "be brief"), ChatMessage("user", "hello")]
        r1 = service.chat("c", first, params)
        assert r1["format"] == "chat_template" and r1["stop_reason"] == "length"
        second = first + [ChatMessage("assistant", r1["text"]), ChatMessage("user", "second")]
        service.chat("c", second, params)
        text = service.read_text("c", 4096)["text"]
        head = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        assert text.startswith(head) and text.count("hello") == 1  # the resent history was not appended again
        # the first reply was cut by the length limit: the template's turn end is owed before the next turn
        assert "<|im_end|>\n<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n" in text
        assert text.count("<|im_start|>") == 5  # system, user, assistant, user, assistant
    finally:
        service.close()
