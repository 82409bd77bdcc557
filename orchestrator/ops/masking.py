"""Card tokens are never shown or logged in full: at most their last four characters."""

import re

# The shape of a card token, declared once: validation (web/schemas.py), the OpenAPI schema and
# masking all use it.
TOKEN_PATTERN = r"tok_[A-Za-z0-9_]{1,64}"
_TOKEN = re.compile(TOKEN_PATTERN)


def mask_token(token: str) -> str:
    return "••••" + token[-4:]


def mask_text(text: str) -> str:
    return _TOKEN.sub(lambda m: mask_token(m.group(0)), text)
