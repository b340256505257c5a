"""Turning generated token ids into text as they come: incremental decoding that never emits
half a UTF-8 character and decodes only a short window of recent tokens per step (the text of
tokens[prefix:] minus that of tokens[prefix:read], so a tokenizer's leading-space and merge rules
see the same context both times; it falls back to decoding everything when the window's text is
not a prefix of the longer one), and OpenAI `stop` strings (the text ends before the first match; text
that could still become a match is held back until it cannot)."""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self._text = ""  # all decoded text that is final (no trailing partial character)
        self._prefix = 0  # window start: tokens before it are never decoded again
        self._read = 0  # tokens whose text is already in _text
        self._emitted = 0  # characters of _text already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything handed out so far."""
        return self._text[:self._emitted]

    def add(self, token_id: int) -> str:
        """Append one token; the new text that may be sent now ('' while holding back)."""
        self.token_ids.append(token_id)
        if not self._advance():  # a multi-byte character still incomplete
            return ""
        if self._stop:
            start = max(0, self._emitted - self._hold)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self._text = self._text[:min(hits)]
                self.stopped = True
                return self._release(len(self._text))
            return self._release(max(self._emitted, len(self._text) - self._hold))
        return self._release(len(self._text))

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back (no stop string matched),
        including an incomplete character as the decoder renders it."""
        if not self.stopped and self._read < len(self.token_ids):
            self._advance(final=True)
        return self._release(len(self._text))

    def _advance(self, final: bool = False) -> bool:
        """Fold the tokens after _read into _text; False while they end mid-character."""
        ids = self.token_ids
        seen = self._decode(ids[self._prefix:self._read]) if self._read > self._prefix else ""
        longer = self._decode(ids[self._prefix:])
        if longer.endswith(REPLACEMENT) and not final:
            return False
        if longer.startswith(seen):
            self._text += longer[len(seen):]
        else:  # the window changed earlier text: decode everything once
            self._text = self._decode(ids)
        self._prefix, self._read = self._read, len(ids)
        return True

    def _release(self, upto: int) -> str:
        piece = self._text[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return piece
