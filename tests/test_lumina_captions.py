"""The optional Lumina caption cleaner (``cfgzero_theory.lumina.captions``).

Parity (``pytest.mark.parity``): :func:`clean_caption` and :func:`preprocess_prompts` against
diffusers' ``LuminaPipeline._clean_caption`` / ``_text_preprocessing`` (called on an instance made
with ``__new__``: the methods use no pipeline state) on hand-written captions and on seeded random
ones assembled from the fragments the rules target; exact string equality.  Without the
references, the documented quirks, the lower+strip fallback, the ``ImportError`` naming the
``captions`` extra (the libraries hidden through ``sys.modules``) and the argument checks.
"""

import ast
import importlib
import random
import sys
import warnings
from pathlib import Path

import pytest

from cfgzero_theory.lumina import captions
from cfgzero_theory.lumina.captions import clean_caption, preprocess_prompts

# The cleaner's libraries are in the [test] extra: a missing one fails collection, it skips nothing.
for _library in ("bs4", "ftfy"):
    importlib.import_module(_library)

# diffusers' own BeautifulSoup call warns about captions that look like file names.
IGNORE_LOCATOR_WARNING = pytest.mark.filterwarnings("ignore::bs4.MarkupResemblesLocatorWarning")

CAPTIONS = [
    "",
    "   ",
    "A Photo of a CAT",
    "  \t Leading and trailing whitespace \n ",
    "line one\nline two\r\nline three",
    "escaped\\nnewline in scraped text",
    # URLs and e-mail
    "see https://example.com/path/to/page?x=1 for details",
    "http://www.site.org/index.html and www.other.net/foo-bar",
    "https://example.io/a/b only the scheme goes",
    "HTTPS://Example.COM/UPPER",
    "the community.community/page and mr.smith.co",
    "mail john.doe@example.com or jane@mail.ru",
    "b.http:aco and a.http:xcom",
    "www:x and www:// www.google.com",
    "a cat.jpg on http:x",
    # URL-encoding
    "hello%20world%21 and a+b+c",
    "c++ and 1+1=2",
    # HTML tags and entities
    "<p>A <b>bold</b> <i>move</i></p><br/>done",
    "<person> walks a <PERSON> dog",
    "<script>alert(1)</script>after the script",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &nbsp;space &copy; 2024",
    "double &amp;amp; encoded &amp;quot;x&amp;quot; &amp;lt;b&amp;gt;",
    "a < b > c and x<y",
    "&#8220;numeric&#8221; &#x2014; entities",
    # @names and hashtags
    "@john_doe and @Jane123 meet @ noon",
    "#1 #12 #123 #1234 #12345 #123456 #sunset #Art2024",
    # CJK and other scripts
    "一只猫 sitting on 桌子 with ㇀ strokes ㈱ and ㎏ and ䷀ and 㐀",
    "ひらがな カタカナ 한국어 漢字 mixed",
    "Кошка сидит на окне, 1920х1080",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ １２３",
    # dashes and quotes
    "a - b -- c --- d",
    "en – dash, em — dash, bar ― , hyphen ‐ , minus ‑ , figure ‒",
    "armenian ֊ hebrew ־ canadian ᐀ mongolian ᠆ wave 〜 wavy 〰 katakana ゠",
    "small ﹘ ﹣ fullwidth － vertical ︱ ︲ double ⸗ ⸚ ⸺ ⸻ ⹀",
    "“curly double” ‘curly single’ «guillemets» `back` ´acute´ ¨diaeresis¨",
    "'single quoted'",
    '"double quoted"',
    "\"\"\"AUSVERKAUFT\"\"\" and ''twice''",
    # IPs, article ids, digits, file names, sizes, codes
    "server at 192.168.0.1 and 10.0.0.255:8080",
    "article 3:45   ",
    "the end 1:23 http://x.com",
    "call 5551234567 or 12345 or 123456 or 1234567890123",
    "download IMG_1234.JPG and report.pdf plus photo.webp, clip.mp4, app.apk",
    "cat.pngs and vector.eps epsilon pdfs",
    "wallpaper 1920x1080 and 3.5x2.5 and 4×5 and 2х3",
    "product jc6640 and jc6640vc and 6640vc231 and j2d1a2a3 and a380",
    "mp3player b2b covid19 4k 8k60 v2",
    # shop noise
    "Worldwide Free Shipping on all items",
    "FREE DOWNLOAD free download free, downloads, reshipping",
    "click here, click for more, click on image",
    "jpg images and png image and PDF",
    "see page 12 of 30",
    # punctuation
    "wow!!! really??? yes...... no.... ok . fine",
    "***SALE*** ~~~ ||| /// \\\\\\ ((( ))) [[[ ]]] {{{ }}}",
    "® © ™ • · º ½ ¾ ¿ ¡ § & @ #",
    "this-is-my-cute-cat",
    "this_is_my_cute_cat",
    "a-b c_d e",
    "key : value and key: value and a , b",
    "hello,world.foo/bar e.g.this",
    "3.14 and 1,000 and x/y",
    "'_leading punctuation",
    "trailing punctuation_+",
    ";semicolon start",
    ".hidden",
    ".two tokens",
    " 'quoted with spaces' ",
    "- dash first",
    # mixed
    "  MiXeD CaSe <B>HTML</B> @User #42 https://t.co/xyz 漢字 — “Quote” IMG_01.PNG!!!  ",
    "A majestic lion, 4K, ultra-detailed, trending on artstation, by greg-rutkowski and alphonse_mucha",
]

# Fragments the random captions are assembled from (seeded, so the cases are fixed).
FRAGMENTS = [
    "cat", "A", "Photo", "of", "the", "lion", "a-b", "x_y", "-", "_", "—", "–", "“", "”", "‘", "’", "«", "»", "'",
    '"', "`", ".", "..", ",", ":", ";", "!", "?", "*", "#", "#12", "#1234", "#123456", "@bob", "@", "&", "&amp;",
    "&amp;amp;", "&quot;", "&lt;b&gt;", "<b>", "</b>", "<person>", "<p>", "<br/>", "http://", "https://", "www.",
    "www:", "site.com", "x.co", "y.ru/z", "a.it", "foo.io", "/", "\\", "\\n", "\n", "\t", "+", "%20", "%2B",
    "192.168.1.1", "1:23", "123", "123456", "1234567", "3.5", "1920x1080", "2×3", "4х5", "jc6640", "ab12cd",
    "12ab34", "j2d1a2a", "img.png", "doc.pdf", "pdf", "jpg images", "epsilon", "free shipping", "worldwide",
    "download", "free", "click for more", "page 3", "猫", "ひら", "한", "㎏", "Кот", "ＡＢ", "®", "©", "~", "(",
    ")", "[", "]", "{", "}", "|", "½", "é", "ﬁ", "",
]
SEPARATORS = ["", " ", " ", " ", "  ", "\n"]


def _random_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(FRAGMENTS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 12))]
        text = "".join(parts)
        out.append(text if rng.random() < 0.7 else f"  {text.upper()} ")
    return out


@pytest.fixture(scope="module")
def reference(diffusers):
    """A ``LuminaPipeline`` with no components: ``_clean_caption`` and ``_text_preprocessing`` use
    only the class attribute ``bad_punct_regex``."""
    from diffusers.pipelines.lumina import pipeline_lumina

    # Without either library diffusers silently falls back to lower+strip: parity would be vacuous.
    assert pipeline_lumina.is_bs4_available() and pipeline_lumina.is_ftfy_available(), \
        "diffusers must see beautifulsoup4 and ftfy for the caption-cleaning parity"
    return pipeline_lumina.LuminaPipeline.__new__(pipeline_lumina.LuminaPipeline)


def _hide(monkeypatch, *modules):
    """Make ``import module`` raise ``ImportError`` (a ``None`` entry in ``sys.modules``)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parity
@IGNORE_LOCATOR_WARNING
@pytest.mark.parametrize("text", CAPTIONS, ids=range(len(CAPTIONS)))
def test_clean_caption_matches_diffusers(reference, text):
    once = reference._clean_caption(text)
    assert clean_caption(text) == once
    assert clean_caption(once) == reference._clean_caption(once)


@pytest.mark.parity
@IGNORE_LOCATOR_WARNING
def test_preprocess_prompts_matches_diffusers(reference):
    assert preprocess_prompts(CAPTIONS, clean=True) == reference._text_preprocessing(CAPTIONS, clean_caption=True)
    assert preprocess_prompts(CAPTIONS, clean=False) == reference._text_preprocessing(CAPTIONS, clean_caption=False)
    assert preprocess_prompts(tuple(CAPTIONS[:3]), True) == reference._text_preprocessing(tuple(CAPTIONS[:3]), True)
    for text in CAPTIONS[:5]:  # a single string is one prompt
        assert preprocess_prompts(text, clean=True) == reference._text_preprocessing(text, clean_caption=True)
        assert preprocess_prompts(text) == reference._text_preprocessing(text)
    assert preprocess_prompts([], clean=True) == reference._text_preprocessing([], clean_caption=True) == []


@pytest.mark.parity
@IGNORE_LOCATOR_WARNING
def test_random_captions_match_diffusers(reference):
    texts = _random_captions(400)
    mismatches = [t for t in texts if clean_caption(t) != reference._clean_caption(t)]
    assert not mismatches, mismatches[:5]
    assert preprocess_prompts(texts, clean=True) == reference._text_preprocessing(texts, clean_caption=True)


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("text, expected", [
    ("c++ and 1+1", "c and 1 1"),                               # unquote_plus
    ("https://example.io/a", "example. io a"),                  # only the scheme of an unlisted host
    ("example.community/x ok", "ok"),                           # no boundary after ".com"
    ("b.http:aco", ""),                                         # the second URL pattern's only catch
    ("ひらがな カタカナ 한국어 漢字", "ひらがな カタカナ 한국어"),     # kana and hangul survive
    ("a\\nb", "a b"),                                           # a literal backslash-n
    ("#2024 #12 #12345 1234567", "2024"),                       # 4-digit hashtags keep the number
    ("foo 1:23 http://x.com", "foo"),                           # article id after a removal
    ("foo 1:23", "foo 1:23"),                                   # … but not otherwise
    ("epsilon pdfs downloads reshipping cat.pngs", "ilon s s re s"),
    ("a380 mp3player b2b covid19 4k", "covid19 4k"),
    ("a-b-c-d-e", "a b c d e"),                                 # more than three separators
    ("a-b-c_d", "a-b-c_d"),
    ("x &amp;amp; y", "x ; y"),
    ("1920х1080 2x3 4×5 big", "big"),
    ("“hi” ‘x’ «y»", "hi\" 'x' \"y"),                            # only the outer quotes are dropped
    (".hidden", ""),
    ("  MiXeD CaSe  ", "mixed case"),
    ("", ""),
])
def test_documented_quirks(text, expected):
    assert clean_caption(text) == expected


def test_two_passes_differ_from_one():
    """The unused ``strip`` leaves a leading space after "@bob" is removed, so the leading-mark rule
    waits for the second pass."""
    assert clean_caption("@bob - dash") == "- dash"
    assert clean_caption("@bob 'hi'") == "'hi"                 # the trailing quote went, not the leading one
    assert preprocess_prompts(["@bob - dash", "@bob 'hi'"], clean=True) == ["dash", "hi"]


def test_locator_warning_is_silenced():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clean_caption("dir/file.txt") == "dir file. txt"


@pytest.mark.parametrize("text", CAPTIONS, ids=range(len(CAPTIONS)))
def test_fallback_is_lower_strip(text):
    assert preprocess_prompts([text], clean=False) == [text.lower().strip()]
    assert preprocess_prompts(text) == [text.lower().strip()]  # off by default


def test_fallback_needs_no_libraries(monkeypatch):
    _hide(monkeypatch, "bs4", "ftfy")
    assert preprocess_prompts(["  A Cat  ", "Dog"]) == ["a cat", "dog"]


@pytest.mark.parametrize("hidden, names", [
    (("bs4",), "beautifulsoup4"),
    (("ftfy",), "ftfy"),
    (("bs4", "ftfy"), "beautifulsoup4 and ftfy"),
])
def test_missing_libraries_name_the_extra(monkeypatch, hidden, names):
    _hide(monkeypatch, *hidden)
    for call in (lambda: preprocess_prompts(["a cat"], clean=True),
                 lambda: preprocess_prompts([], clean=True),
                 lambda: clean_caption("a cat")):
        with pytest.raises(ImportError, match=r'pip install -e "\.\[captions\]"') as err:
            call()
        assert f"needs {names}, which" in str(err.value)


def test_libraries_are_imported_lazily():
    tree = ast.parse(Path(captions.__file__).read_text())
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert not top_level & {"bs4", "ftfy"}, top_level


@pytest.mark.parametrize("prompts", [[1], ["a", None], [b"bytes"]])
@pytest.mark.parametrize("clean", [False, True])
def test_non_strings_are_refused(prompts, clean):
    with pytest.raises(TypeError, match="must be a string"):
        preprocess_prompts(prompts, clean=clean)
