"""Log hygiene: every pairing code and secret key this process has seen is replaced by <redacted> in log records."""

import logging
import threading

_known_secrets: set[str] = set()
_known_secrets_lock = threading.Lock()
REDACTED = "<redacted>"


def remember_secret(secret: str) -> None:
    """From now on, `secret` never appears in a redacted text (short strings are ignored: they are no secret)."""
    if len(secret) >= 8:
        with _known_secrets_lock:
            _known_secrets.add(secret)


def redact(text: str) -> str:
    """The text with every pairing code and secret key this process has seen replaced by <redacted>."""
    with _known_secrets_lock:
        known = sorted(_known_secrets, key=len, reverse=True)
    for secret in known:
        text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs known secrets from records; install with install_log_redaction()."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(handler: logging.Handler) -> None:
    """Attach a RedactingFilter to a log handler (the CLI and GUI do this for theirs)."""
    handler.addFilter(RedactingFilter())
