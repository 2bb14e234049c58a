"""The plain transcript: how a conversation is written for a model package that has no chat template.

A base model (trained on plain text, as `edgegpt train` makes) has no chat format of its own. Apps that
speak in messages (the OpenAI-compatible server, the desktop example) still need to send it one, so
edgegpt writes the conversation the way plain text writes a dialogue, and lets the model continue it:

    System: You are terse.          ◄ each message: its role, capitalised, a colon, its content
    User: Name a colour.
    Assistant: Red.
    User: Another one.
    Assistant:                      ◄ the assistant's turn opened; the reply is the continuation

The reply ends at a blank line or where the model starts the next speaker's line (TRANSCRIPT_STOPS), as
well as at the package's end-of-text token. Packages with a chat template never use this: the model's
own format is always better (Generator.chat).
"""

from __future__ import annotations

from typing import Sequence

from edgegpt.runtime.chat_template import check_messages

# Where a transcript reply ends: the model writing the next turn, or a blank line.
TRANSCRIPT_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:", "\n\n")


def plain_transcript(messages: Sequence[dict[str, str]]) -> str:
    """The transcript of `messages` (checked as chat messages are) with the assistant's turn opened."""
    lines = [f"{message['role'].capitalize()}: {message['content'].strip()}" for message in check_messages(messages)]
    return "\n".join([*lines, "Assistant:"])
