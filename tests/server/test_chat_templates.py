"""Which chat template the server uses: the setting's, else the checkpoint's, else the default; and its flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.chat_template import ChatTemplate, ChatTemplateError
from server.chat_templates import server_chat_template
from server.cli import build_parser
from server.config import Settings, settings_from
from weights.io import CONFIG_FILE, CheckpointError, ModelConfig, save_checkpoint

CHECKPOINT_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
SETTING_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


def checkpoint(folder: Path, chat_template: ChatTemplate | None = None) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(num_tokens=256, max_seq_len=16, dim=8, depth=1, heads=1, dim_head=8, local_attn_window_size=4)
    return save_checkpoint(config.build(), folder, config=config, chat_template=chat_template)


@pytest.fixture(autouse=True)
def no_chat_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WINDOWLM_CHAT_TEMPLATE", "WINDOWLM_CHAT_TEMPLATE_STOP"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def setting_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jinja"
    path.write_text(SETTING_TEMPLATE, encoding="utf-8")
    return path


def test_the_setting_wins_over_the_checkpoint(tmp_path: Path, setting_file: Path) -> None:
    folder = checkpoint(tmp_path / "ckpt", ChatTemplate(CHECKPOINT_TEMPLATE, ("\n[user]",), "checkpoint"))
    settings = Settings(weights=folder, chat_template=setting_file, chat_template_stop=["</a>", "\n\n"])
    assert server_chat_template(settings, folder) == ChatTemplate(SETTING_TEMPLATE, ("</a>", "\n\n"), "setting")
    assert server_chat_template(Settings(weights=folder, chat_template=setting_file), folder).stop == ()


def test_the_checkpoint_wins_over_the_default(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "ckpt", ChatTemplate(CHECKPOINT_TEMPLATE, ("\n[user]",), "checkpoint"))
    chosen = server_chat_template(Settings(weights=folder), folder)
    assert chosen == ChatTemplate(CHECKPOINT_TEMPLATE, ("\n[user]",), "checkpoint")
    assert chosen.render([{"role": "user", "content": "hi"}]) == "[user] hi\n"


def test_without_either_the_default_is_used(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "ckpt")
    assert server_chat_template(Settings(weights=folder), folder) == ChatTemplate.default()


def test_a_setting_file_that_cannot_be_used_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "ckpt")
    missing = tmp_path / "missing.jinja"
    with pytest.raises(ChatTemplateError, match=f"^chat template file {missing}: cannot be read: No such file"):
        server_chat_template(Settings(weights=folder, chat_template=missing), folder)
    broken = tmp_path / "broken.jinja"
    broken.write_text("line one\n{% if messages %}", encoding="utf-8")
    with pytest.raises(ChatTemplateError) as caught:
        server_chat_template(Settings(weights=folder, chat_template=broken), folder)
    assert str(caught.value).startswith(f"chat template file {broken}: the chat template does not compile: line 2")
    assert "\n" not in str(caught.value)


def test_a_checkpoint_template_that_does_not_compile_names_its_config_json(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "ckpt")
    config = folder / CONFIG_FILE
    config.write_text(config.read_text().replace('"tokenizer"', '"chat_template": "{{ x",\n  "tokenizer"', 1))
    with pytest.raises(CheckpointError, match=f"^{config}: chat_template: the chat template does not compile"):
        server_chat_template(Settings(weights=folder), folder)


def test_the_flags_and_the_variables_set_it(
    tmp_path: Path, setting_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = build_parser().parse_args(
        ["serve", "--chat-template", str(setting_file), "--chat-template-stop", "a, b", "--chat-template-stop", "\n"]
    )
    settings = settings_from(args)
    assert settings.chat_template == setting_file and settings.chat_template_stop == ["a, b", "\n"]

    monkeypatch.setenv("WINDOWLM_CHAT_TEMPLATE", str(setting_file))
    monkeypatch.setenv("WINDOWLM_CHAT_TEMPLATE_STOP", '["\\n\\n", "a,b"]')
    assert Settings().chat_template_stop == ["\n\n", "a,b"]
    monkeypatch.setenv("WINDOWLM_CHAT_TEMPLATE_STOP", "")
    assert Settings().chat_template_stop == []
    monkeypatch.setenv("WINDOWLM_CHAT_TEMPLATE_STOP", "\\n\\n")
    with pytest.raises(ValidationError, match="must be a JSON array of strings"):
        Settings()
    monkeypatch.setenv("WINDOWLM_CHAT_TEMPLATE_STOP", '["", "x"]')
    with pytest.raises(ValidationError, match="a stop string must be a non-empty string"):
        Settings()


def test_stops_without_a_template_are_refused() -> None:
    with pytest.raises(ValidationError, match="chat_template_stop is given without chat_template"):
        Settings(chat_template_stop=["\n\n"])
