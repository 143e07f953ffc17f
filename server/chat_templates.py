"""Which chat template the server renders conversations with: the setting's, else the checkpoint's, else the
default (model/chat_template.py). Chosen once, at start-up, where a bad template is a one-line error."""

from __future__ import annotations

import os

from model.chat_template import ChatTemplate
from server.config import Settings
from weights.io import chat_template_of

__all__ = ["server_chat_template"]


def server_chat_template(settings: Settings, checkpoint_folder: str | os.PathLike[str]) -> ChatTemplate:
    """--chat-template (origin "setting", with the --chat-template-stop strings) when set, else the template in
    the checkpoint's config.json, else ChatTemplate.default().

    Raises ChatTemplateError when the setting's file cannot be read or compiled, CheckpointError when the
    checkpoint's config.json cannot be read or holds a template that does not compile; both are ValueErrors
    with a one-line message naming the file.
    """
    if settings.chat_template is not None:
        return ChatTemplate.from_file(settings.chat_template, settings.chat_template_stop, "setting")
    return chat_template_of(checkpoint_folder)
