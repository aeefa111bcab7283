"""grit_jax.data.documents: each document type parsed into a title and sections of prose
(markup, code and directives dropped), and passages that keep every word within their length."""

from grit_jax.data import documents

MARKDOWN = """---
layout: page
---
# The Lighthouse Keeper's Guide

Lighthouses guide ships along dangerous coasts. Each tower shows a light with its own pattern
of flashes, so that a sailor can tell which one he sees. See [the list](http://x.org/list).

## Lamps and **lenses**

Early lamps burned whale oil or kerosene. A `Fresnel` lens gathers the light into a narrow beam.

```python
print("code is not prose")
```

- Modern lights use electric lamps and need little care.
"""

RST = """Tides and Currents
==================

The tide rises and falls twice a day on most coasts. The moon pulls the ocean into two bulges.

.. note::
   :class: aside

   A note's body is prose of its section.

.. code-block:: python

   print("a code block is not prose")

.. function:: tide_height(hour)

   Return the height of the tide at an hour of the day, in metres.

   >>> tide_height(3)
   1.5

Spring tides
------------

When the sun and moon line up the tides are highest. See :func:`tide_table` for numbers::

    def tide_table(): pass

Tidal currents flow in and out of bays and estuaries.
"""


def test_markdown_title_sections_and_markup():
    doc = documents.parse("guide.md", MARKDOWN, "markdown", min_words=3)
    assert doc.title == "The Lighthouse Keeper's Guide"
    assert [s.heading for s in doc.sections] == [None, "Lamps and lenses"]
    text = " ".join(doc.passages)
    assert "See the list." in text and "http" not in text and "layout" not in text
    assert "code is not prose" not in text and "`" not in text
    assert "Fresnel lens" in text and "Modern lights use electric lamps" in text


def test_rst_title_sections_directives_and_literal_blocks():
    doc = documents.parse("tides.rst", RST, "rst", min_words=3)
    assert doc.title == "Tides and Currents"
    assert [s.heading for s in doc.sections] == [None, "tide_height(hour)", "Spring tides"]
    text = " ".join(doc.passages)
    assert "A note's body is prose of its section." in doc.sections[0].passages[0]
    assert doc.sections[1].passages == ("Return the height of the tide at an hour of the day, "
                                        "in metres.",)
    assert "print" not in text and "aside" not in text and ">>>" not in text
    assert "def tide_table" not in text
    assert "See tide_table for numbers:" in text and "Tidal currents flow" in text


def test_plain_text_title_line_and_file_name_fallback():
    doc = documents.parse("a/sailing_knots.txt", "Knots\n\nA bowline makes a fixed loop at the "
                          "end of a rope.\n", "text", min_words=3)
    assert doc.title == "Knots" and doc.passages == ["A bowline makes a fixed loop at the end of "
                                                     "a rope."]
    doc = documents.parse("a/sailing_knots.txt", "A bowline makes a fixed loop. It holds.\n",
                          "text", min_words=3)
    assert doc.title == "sailing knots"


def test_passages_keep_every_word_within_the_length():
    sents = [f"Sentence number {i} has exactly seven words." for i in range(40)]
    paras = [" ".join(sents[i:i + 5]) for i in range(0, 40, 5)]
    out = documents.passages_of(paras, passage_words=30, min_words=5)
    assert " ".join(out).split() == " ".join(paras).split()
    assert all(documents.words(p) <= 30 for p in out) and len(out) >= 280 // 30
    # Passages end at sentence ends.
    assert all(p.endswith(".") for p in out)
    # A section under min_words yields nothing; a long sentence is cut at words.
    assert documents.passages_of(["Too short."], 30, 5) == []
    assert [documents.words(p) for p in documents.passages_of([" ".join(["w"] * 70)], 30, 5)] \
        == [30, 30, 10]
