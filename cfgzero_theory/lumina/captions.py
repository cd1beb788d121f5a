"""The optional caption cleaning of diffusers' ``LuminaPipeline`` (DeepFloyd IF's cleaner).

``LuminaPipeline.encode_prompt(..., clean_caption=True)`` in diffusers passes every prompt
through ``_text_preprocessing``, which runs DeepFloyd IF's web-caption scrubber ``_clean_caption``
**twice** when BeautifulSoup (``bs4``) and ``ftfy`` are installed, and otherwise — silently, with
a logged warning — only lower-cases and strips the prompt.  This module reproduces that output
exactly, in plain Python:

* :func:`clean_caption` ``(text) -> str`` — one pass of the cleaner;
* :func:`preprocess_prompts` ``(prompts, clean=False) -> list[str]`` — ``_text_preprocessing``:
  two passes of :func:`clean_caption` per prompt when ``clean``, else ``lower().strip()``.

What one pass does, in order: URL-decoding (``unquote_plus``), lower-casing and stripping; URLs,
HTML markup (BeautifulSoup's ``get_text``), ``@nicknames``, CJK ideographs and symbols are
removed; dashes and quotes of every kind are normalised; IP addresses, article ids, ``#123``
hashtags, long digit runs, file names and punctuation runs are removed; then ``ftfy.fix_text``,
``html.unescape`` twice, and a last table of substitutions for shop-listing noise (``free
shipping``, ``download``, ``click for …``, product codes, ``1920x1080``), spacing and edge
punctuation.  The steps are the tables ``_BEFORE_HTML``, ``_AT_NAMES_CJK_DASHES``, ``_AFTER_HTML``,
``_AFTER_UNESCAPE`` and ``_EDGES`` below, applied in order around the three library calls.

Why optional
------------
The cleaner was written for scraped captions, not for prompts, and it is lossy in ways a prompt
author would not expect (the quirks below); it also needs two libraries the rest of the package
does not (``pip install -e ".[captions]"``: ``beautifulsoup4`` and ``ftfy``).  It is therefore
**off by default** in our pipeline (``clean=False``: lower-case and strip, which is what
diffusers does whenever either library is missing).  Unlike diffusers, asking for it without the
libraries raises ``ImportError`` instead of silently falling back.  The libraries are imported
when the cleaner runs, never at import time.

Quirks (reproduced on purpose, since the point is parity)
---------------------------------------------------------
* ``unquote_plus``, not ``unquote``: every ``+`` becomes a space (``"c++"`` → ``"c"``,
  ``"1+1"`` → ``"1 1"``) and ``%xx`` escapes are decoded before anything else.
* The URL patterns only delete the scheme: ``https?:`` followed by one to three slashes (or a
  single character).  The rest of a URL goes only if it is a host ending in ``.com``, ``.co``,
  ``.ru``, ``.net``, ``.org``, ``.edu``, ``.gov`` or ``.it`` (with no boundary after the
  suffix, so ``"example.community/x"`` goes too); ``"https://example.io/a"`` leaves
  ``"example. io a"``; ``"http:"`` followed by a letter eats that letter.  The second URL
  pattern was meant for ``www.`` but is spelled ``www:``; its host alternative repeats the
  first pattern's, so it only catches hosts that the first one's deletions joined up
  (``"b.http:aco"`` → ``"b.co"`` → ``""``).
* The "CJK" ranges (U+31C0–U+9FFF, listed as seven contiguous blocks in diffusers and merged into
  one class here) are ideographs, strokes, enclosed letters and compatibility symbols only:
  hiragana, katakana and hangul survive.
* The ``\\n`` rule matches a backslash followed by ``n`` (an escaped newline in scraped
  text), not a newline; real newlines are collapsed by the final whitespace rule.
* Hashtags: ``#`` with 1–3 or with 5+ digits is removed, but a 4-digit ``#2024`` only loses its
  ``#`` (to the punctuation rule) and keeps the number; bare digit runs of 6+ are removed.
* The article-id rule ``\\d:\\d\\d\\s+$`` needs trailing whitespace, which the initial strip
  removed: it fires only when a removal at the end of the caption (a URL, an IP) left a space.
* The file-name and extension rules have no boundary after the extension, and the shop-noise
  rules none around the words: ``"epsilon"`` → ``"ilon"``, ``"pdfs"`` → ``"s"``,
  ``"downloads"`` → ``"s"``, ``"reshipping"`` → ``"re"``, ``"cat.pngs"`` → ``"s"``.
* Product-code rules delete ordinary tokens that mix ASCII letters and digits: ``"a380"``,
  ``"mp3player"``, ``"b2b"`` (but not ``"covid19"`` nor ``"4k"``); more than three ``-``/``_``
  in a caption turn all of them into spaces.
* ``"&quot;"`` and ``"&amp"`` are deleted (not decoded) after BeautifulSoup has decoded the
  entities once, so they only hit doubly-encoded text (``"&amp;amp;"`` → ``"&amp;"`` → ``";"``).
* diffusers calls ``caption.strip()`` without using the result before the edge rules, so the
  anchored rules (surrounding quotes, one leading ``'_,-:;``, one trailing ``'_,-:+``, a
  caption that is one ``.``-prefixed token) do not fire when a space is left at that end;
  the second pass, which starts stripped, usually catches them.
* ``x``, Cyrillic ``х`` and ``×`` all count as the "by" of a dimension (``"1920х1080"``).

Deliberate differences, none in the text produced: BeautifulSoup's
``MarkupResemblesLocatorWarning`` (``"dir/file.txt"`` looks like a file name to it) is silenced,
and a prompt that is not a string raises ``TypeError`` (diffusers cleans ``str(prompt)``).
"""

from __future__ import annotations

import html
import re
import urllib.parse
import warnings
from collections.abc import Sequence

__all__ = ["clean_caption", "preprocess_prompts"]

_INSTALL_HINT = 'pip install -e ".[captions]"'

# A host name with one of the listed suffixes, its path, and not followed by "@" (an e-mail).
_HOST = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)"
# Every dash-like code point (hyphen-minus included: a run of them becomes one "-").
_DASHES = ("\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
           "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d")
# Symbols and brackets whose runs become one space (diffusers' ``bad_punct_regex``).
_BAD_PUNCT = r"#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*"
_EXTENSIONS = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
# Curly, angled and accent quotes to '"', the single curly ones to "'" (one code point each).
_QUOTES = str.maketrans({**dict.fromkeys("`´«»“”¨", '"'), **dict.fromkeys("‘’", "'")})


def _compile(steps):
    return tuple((re.compile(pattern), replacement) for pattern, replacement in steps)


# Before BeautifulSoup.
_BEFORE_HTML = _compile([
    ("<person>", "person"),                                   # IF's placeholder tag, kept as a word
    (rf"\b(?:https?:(?:/{{1,3}}|[a-zA-Z0-9%])|{_HOST})", ""),  # a scheme, or a listed host + path
    (rf"\b(?:www:(?:/{{1,3}}|[a-zA-Z0-9%])|{_HOST})", ""),     # "www:" (sic) or the same hosts again
])

# Between BeautifulSoup and ftfy (the quote translation comes after the dash rule).
_AT_NAMES_CJK_DASHES = _compile([
    (r"@\w+", ""),                                            # @nickname
    (r"[\u31c0-\u9fff]+", ""),                                # CJK strokes … unified ideographs
    (rf"[{_DASHES}]+", "-"),
])
_AFTER_HTML = _compile([
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),             # IPv4 address
    (r"\d:\d\d\s+$", ""),                                     # article id at the very end
    (r"\\n", " "),                                            # a literal backslash-n
    (r"#\d{1,3}\b", ""),                                      # #123
    (r"#\d{5,}\b", ""),                                       # #12345…
    (r"\b\d{6,}\b", ""),                                      # 123456…
    (rf"\S+\.{_EXTENSIONS}", ""),                             # file names
    (r"[\"']{2,}", '"'),                                      # runs of quotes
    (r"\.{2,}", " "),                                         # ellipses
    (rf"[{_BAD_PUNCT}]+", " "),                               # ***SALE***, #tag, (…), a/b
    (r"\s+\.\s+", " "),                                       # a lone " . "
])
_SEPARATOR = re.compile(r"[-_]")                              # this-is-my-cute-cat / this_is_my_cat

# After ftfy and html.unescape.
_AFTER_UNESCAPE = _compile([
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),                       # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),                       # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),                             # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b{_EXTENSIONS}(\simage[s]?)?", ""),                  # "jpg images"
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),     # j2d1a2a…
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),                     # 1920x1080 (Latin x, Cyrillic х, ×)
    (r"\b\s+:\s+", ": "),
    (r"(\D[,./])\b", r"\1 "),                                 # a space after , . / before a word
    (r"\s+", " "),
])

# Anchored at the ends of the caption, which is *not* stripped first (module docstring).
_EDGES = _compile([
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),                        # surrounding quotes
    (r"^['_,\-:;]", ""),                                      # one leading punctuation mark
    (r"['_,\-:+]$", ""),                                      # one trailing punctuation mark
    (r"^\.\S+$", ""),                                         # a caption that is one ".token"
])


def _apply(steps, text: str) -> str:
    for pattern, replacement in steps:
        text = pattern.sub(replacement, text)
    return text


def _libraries():
    """``(BeautifulSoup, MarkupResemblesLocatorWarning, ftfy)``, or ``ImportError`` naming the extra."""
    missing = []
    try:
        from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning
    except ImportError:
        missing.append("beautifulsoup4")
    try:
        import ftfy
    except ImportError:
        missing.append("ftfy")
    if missing:
        raise ImportError(f"caption cleaning (clean=True / clean_caption) needs {' and '.join(missing)}, "
                          f"which are not installed: {_INSTALL_HINT}")
    return BeautifulSoup, MarkupResemblesLocatorWarning, ftfy


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a string, got {type(text).__name__}: {text!r}")
    return text


def clean_caption(text: str) -> str:
    """One pass of DeepFloyd IF's caption cleaner, as diffusers' ``LuminaPipeline._clean_caption``
    (module docstring); needs ``beautifulsoup4`` and ``ftfy`` (``ImportError`` naming the extra)."""
    beautiful_soup, locator_warning, ftfy = _libraries()
    text = urllib.parse.unquote_plus(_check_text(text)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", locator_warning)
        text = beautiful_soup(text, features="html.parser").get_text()
    text = _apply(_AT_NAMES_CJK_DASHES, text).translate(_QUOTES)
    text = _apply(_AFTER_HTML, text)
    if len(_SEPARATOR.findall(text)) > 3:
        text = _SEPARATOR.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = _apply(_AFTER_UNESCAPE, text)
    return _apply(_EDGES, text).strip()


def preprocess_prompts(prompts: str | Sequence[str], clean: bool = False) -> list[str]:
    """``prompts`` (a string or a sequence of strings) as diffusers' ``_text_preprocessing`` makes
    them: :func:`clean_caption` twice each when ``clean``, else ``lower().strip()``.

    ``clean=True`` needs ``beautifulsoup4`` and ``ftfy`` and raises ``ImportError`` naming the
    ``captions`` extra without them (diffusers falls back to lower+strip silently).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = [_check_text(p) for p in prompts]
    if not clean:
        return [p.lower().strip() for p in prompts]
    _libraries()  # fail before any work, even for an empty list
    return [clean_caption(clean_caption(p)) for p in prompts]
