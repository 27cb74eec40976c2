//! Anchors and aliases in front matter are refused before serde_yaml_ng reads it.
//!
//! serde_yaml_ng replays an alias's events wherever it is used, up to 100 times the document's own event count, so
//! nested aliases turn 100 KB of front matter into hundreds of millions of values (gigabytes), and any client can
//! send a policy inline. No policy needs them. They are looked for with the parser serde_yaml_ng itself runs on
//! (libyaml), one event at a time: an alias there is a single event, expanded by nobody, and a `*` or `&` inside a
//! quoted string, a block scalar or a comment is text, as it is to serde_yaml_ng.

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr;

use unsafe_libyaml::{
    YAML_ALIAS_EVENT, YAML_MAPPING_START_EVENT, YAML_NO_EVENT, YAML_SCALAR_EVENT, YAML_SEQUENCE_START_EVENT,
    YAML_STREAM_END_EVENT, YAML_UTF8_ENCODING, yaml_event_delete, yaml_event_t, yaml_parser_delete,
    yaml_parser_initialize, yaml_parser_parse, yaml_parser_set_encoding, yaml_parser_set_input_string, yaml_parser_t,
};

/// Why the front matter is refused, at a 0-based line of the YAML text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub line: usize,
    pub message: &'static str,
}

const REFERENCES: &str = "YAML anchors (`&name`) and aliases (`*name`) are not allowed in front matter (an alias \
                          repeats what its anchor names, and nested ones can expand a few kilobytes into \
                          gigabytes); write the values out";

/// Refuses the first anchor or alias in `text`.
///
/// A syntax error ends the search without a refusal: serde_yaml_ng's parse fails at the same event and reports it,
/// and what it reads before failing is what was searched here.
pub(crate) fn refuse_references(text: &str) -> Result<(), Refused> {
    // Only if libyaml cannot allocate its buffers: the text is refused rather than read unchecked.
    let mut parser =
        Parser::new(text.as_bytes()).ok_or(Refused { line: 0, message: "the YAML parser could not start" })?;
    while let Some(event) = parser.next() {
        match event {
            Event::End => return Ok(()),
            Event::Reference { line } => return Err(Refused { line, message: REFERENCES }),
            Event::Other => {}
        }
    }
    Ok(())
}

enum Event {
    /// An alias, or a node carrying an anchor, starting at this 0-based line.
    Reference {
        line: usize,
    },
    /// The end of the stream.
    End,
    Other,
}

struct Parser<'input> {
    /// Boxed: libyaml's string reader keeps a pointer to the parser inside the parser, so it must not move.
    raw: Box<MaybeUninit<yaml_parser_t>>,
    input: PhantomData<&'input [u8]>,
}

impl<'input> Parser<'input> {
    fn new(input: &'input [u8]) -> Option<Self> {
        let mut raw = Box::new(MaybeUninit::<yaml_parser_t>::uninit());
        let parser = raw.as_mut_ptr();
        // SAFETY: `parser` is valid for writes of a whole `yaml_parser_t`, which `yaml_parser_initialize` zeroes
        // and fills in.
        if unsafe { yaml_parser_initialize(parser) }.fail {
            return None;
        }
        // SAFETY: the parser is initialised and has neither input nor encoding yet. libyaml only reads `input`,
        // which outlives the parser (`'input`); the parser does not move (boxed) and is deleted on drop.
        unsafe {
            yaml_parser_set_encoding(parser, YAML_UTF8_ENCODING);
            yaml_parser_set_input_string(parser, input.as_ptr(), input.len() as u64);
        }
        Some(Parser { raw, input: PhantomData })
    }

    /// The next event, `None` on a syntax error.
    fn next(&mut self) -> Option<Event> {
        let parser = self.raw.as_mut_ptr();
        let mut event = MaybeUninit::<yaml_event_t>::uninit();
        let event = event.as_mut_ptr();
        // SAFETY: the parser was initialised in `new` and its input is alive. `yaml_parser_parse` zeroes the event
        // and, when it succeeds, fills it in; only then is it read and deleted, once. Each union field read is the
        // one `type_` says is set, and an anchor pointer is only compared with null.
        unsafe {
            if yaml_parser_parse(parser, event).fail {
                return None;
            }
            let anchor = match (*event).type_ {
                YAML_SCALAR_EVENT => (*event).data.scalar.anchor,
                YAML_SEQUENCE_START_EVENT => (*event).data.sequence_start.anchor,
                YAML_MAPPING_START_EVENT => (*event).data.mapping_start.anchor,
                _ => ptr::null_mut(),
            };
            let line = usize::try_from((*event).start_mark.line).unwrap_or(usize::MAX);
            let found = match (*event).type_ {
                YAML_ALIAS_EVENT => Event::Reference { line },
                _ if !anchor.is_null() => Event::Reference { line },
                // After the stream's end libyaml hands out empty events (`YAML_NO_EVENT`).
                YAML_STREAM_END_EVENT | YAML_NO_EVENT => Event::End,
                _ => Event::Other,
            };
            yaml_event_delete(event);
            Some(found)
        }
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        // SAFETY: a `Parser` exists only once `yaml_parser_initialize` succeeded; it is deleted exactly once.
        unsafe { yaml_parser_delete(self.raw.as_mut_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_and_aliases_are_found_on_their_lines() {
        assert_eq!(refuse_references("a: &x [1, 2]\nb: *x\n").unwrap_err().line, 0);
        assert_eq!(refuse_references("a: 1\nb:\n  - &x {k: v}\n").unwrap_err().line, 2);
        assert_eq!(refuse_references("a: 1\nb: [1,\n  *x]\n").unwrap_err().line, 2);
        assert_eq!(refuse_references("a: &x plain\n").unwrap_err().line, 0);
        assert_eq!(refuse_references("? &k key\n: v\n").unwrap_err().line, 0);
    }

    #[test]
    fn stars_and_ampersands_in_text_are_not_references() {
        for text in [
            "a: \"*x\"\nb: '&y'\n",
            "a: x*y & z\n",
            "a: |\n  *x\n  &y\nb: >\n  *z\n",
            "# *x &y\na: [\"*\", '&', a*b]\n",
            "a: {k: \"*v\"}\n",
            "",
            "a:\n",
        ] {
            assert_eq!(refuse_references(text), Ok(()), "{text:?}");
        }
    }

    /// A syntax error is left to serde_yaml_ng to report; what comes before it is still searched.
    #[test]
    fn syntax_errors_end_the_search() {
        assert_eq!(refuse_references("a: [1, 2\nb: c\n"), Ok(()));
        assert_eq!(refuse_references("a: *x\nb: [\n").unwrap_err().line, 0);
    }
}
