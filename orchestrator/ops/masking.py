"""Card tokens are never shown or logged in full: at most their last four characters."""

import re

_TOKEN = re.compile(r"tok_[A-Za-z0-9_]{1,64}")


def mask_token(token: str) -> str:
    return "••••" + token[-4:]


def mask_text(text: str) -> str:
    return _TOKEN.sub(lambda m: mask_token(m.group(0)), text)
